"""The ViT post-training quantization passes (ptq_minmax, repq_vit, isvit) on tiny timm and transformers ViTs."""

import pytest
import torch
from conftest import VIT_PTQ_PASSES as PASSES
from conftest import logits, randomise_layernorms, tiny_hf_deit, tiny_hf_vit, tiny_timm_swin, tiny_timm_vit

import compressx
from compressx.errors import CompressxError, ConfigError
from compressx.ops.quant import set_quant_state
from compressx.ops.vit_quant import QuantSettings, find_layout, fold_all, wrap
from compressx.passes._vit_ptq import initialise
from compressx.passes.isvit import IsvitConfig


@pytest.fixture
def images():
    return torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_timm_swin, tiny_hf_vit], ids=["timm", "swin", "hf"])
@pytest.mark.parametrize("pass_name", list(PASSES))
def test_pass_runs_changes_outputs_and_is_undoable(build, pass_name, images, one_thread):
    model = build()
    reference = logits(model, images[:8])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compressx.apply(model, [{"pass": pass_name, "config": PASSES[pass_name]}], data=images, progress=False)
    out = logits(model, images[:8])
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, reference, atol=1e-4)
    report = result.steps[0].report
    assert report["w_bits"] == 4 and report["a_bits"] == 4
    layers = report["layers"]
    assert any(v["kind"] == ("sulq" if pass_name == "isvit" else "log" if pass_name == "repq_vit" else "uniform")
               for k, v in layers.items() if "matmul_av.a_quantizer" in k)  # fmt: skip
    assert all("scale_mean" in v or "eta" in v or "scale" in v for v in layers.values())
    if pass_name == "isvit":
        stage3 = report["reconstruction"]["stage3"]
        assert set(report["reconstruction"]) == {"stage1", "stage3"}
        layout = find_layout(model)
        assert list(stage3) == [layout.patch_embed, *layout.units, layout.head]
        assert all(v["loss_before"] >= 0 for v in stage3.values())
    result.steps[0].handle.remove()
    assert not any("quantizer" in k for k in model.state_dict())
    if pass_name == "ptq_minmax":  # weights untouched: removing the quantizers gives the model back exactly
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert torch.equal(logits(model, images[:8]), reference)


@pytest.mark.parametrize(
    "build", [tiny_timm_vit, tiny_timm_swin, tiny_hf_vit, tiny_hf_deit], ids=["timm", "swin", "hf", "hf_deit"]
)
def test_stage2_fold_keeps_float64_outputs_and_codes(build, images):
    model = build().double()
    randomise_layernorms(model, torch.Generator().manual_seed(3))
    images = images.double()
    layout = find_layout(model)
    wrap(model, layout, QuantSettings(w_bits=4, a_bits=4))
    initialise(model, images[:32], weights=False, activations=True)
    first = model.get_submodule(layout.post_layernorm[0][1][0])
    ln_out = {}
    hook = model.get_submodule(layout.post_layernorm[0][0]).register_forward_hook(
        lambda m, a, o: ln_out.__setitem__("x", o)
    )
    set_quant_state(model, weights=False, activations=False)
    reference = logits(model, images)
    set_quant_state(model, weights=False, activations=True)
    logits(model, images)
    codes_before = first.input_quantizer.codes(ln_out["x"])
    folds = fold_all(model, layout)
    assert len(folds) == 2 * len(layout.blocks)
    assert max(f["scale_ratio_max"] for f in folds.values()) > 1.01  # the fold did something
    set_quant_state(model, weights=False, activations=False)
    assert (logits(model, images) - reference).abs().max() < 1e-5
    set_quant_state(model, weights=False, activations=True)
    logits(model, images)
    codes_after = first.input_quantizer.codes(ln_out["x"])
    hook.remove()
    assert first.input_quantizer.granularity == "tensor"
    assert (codes_after != codes_before).float().mean() < 1e-3  # exact up to float rounding at .5 boundaries


def test_isvit_stages_and_presets(images, one_thread):
    config = IsvitConfig(preset="fast")
    assert (config.calibration_images, config.iterations, config.lr) == (256, 100, 1e-4)
    assert (IsvitConfig().calibration_images, IsvitConfig().iterations, IsvitConfig().lr) == (1024, 1000, 4e-5)
    assert IsvitConfig(preset="fast", iterations=7).iterations == 7
    model = tiny_timm_vit()
    cfg = dict(PASSES["isvit"], stages=1)
    report = compressx.apply(model, [{"pass": "isvit", "config": cfg}], data=images, progress=False).steps[0].report
    assert set(report["reconstruction"]) == {"stage1"} and report["reparameterised"] == {}
    assert report["layers"]["blocks.0.attn.qkv.input_quantizer"]["granularity"] == "channel"
    assert not any(q.enabled for n, q in model.named_modules() if n.endswith("weight_quantizer"))


def test_isvit_reconstruction_lowers_the_loss(images, one_thread):
    model = tiny_timm_vit()
    cfg = {"preset": "fast", "iterations": 40, "lr": 1e-3, "calibration_images": 64, "w_bits": 3, "a_bits": 3}
    report = compressx.apply(model, [{"pass": "isvit", "config": cfg}], data=images, progress=False).steps[0].report
    stage3 = report["reconstruction"]["stage3"]
    assert sum(v["loss_after"] for v in stage3.values()) < sum(v["loss_before"] for v in stage3.values())


def test_unsupported_model_is_a_clear_error(tiny_cnn, images):
    with pytest.raises(CompressxError, match="supported: timm VisionTransformer"):
        compressx.apply(tiny_cnn, [{"pass": "ptq_minmax"}], data=images, progress=False)


def test_calibration_must_be_images(images):
    with pytest.raises(CompressxError, match=r"\[N, C, H, W\]"):
        compressx.apply(tiny_timm_vit(), [{"pass": "ptq_minmax"}], data=torch.zeros(4, 16), progress=False)


@pytest.mark.parametrize(
    "values, path",
    [
        ({"w_bits": 1}, "w_bits"),
        ({"a_bits": 9}, "a_bits"),
        ({"keep_full_precision": ["norm"]}, "keep_full_precision[0]"),
        ({"stages": 4}, "stages"),
        ({"lr": 0}, "lr"),
        ({"weight_granularity": "row"}, "weight_granularity"),
    ],
)
def test_config_errors(values, path):
    with pytest.raises(ConfigError) as err:
        IsvitConfig.from_dict(values)
    assert err.value.path == path


def test_keep_full_precision_leaves_head_and_patch_embed_plain(images):
    model = tiny_timm_vit()
    cfg = {"keep_full_precision": ["head", "patch_embed"]}
    compressx.apply(model, [{"pass": "ptq_minmax", "config": cfg}], data=images, progress=False)
    assert type(model.head) is torch.nn.Linear
    assert type(model.patch_embed.proj) is torch.nn.Conv2d


STAGES = {"ptq_minmax": ["calibrated"], "repq_vit": ["reparameterised", "calibrated"],
          "isvit": ["stage1", "stage2", "stage3"]}  # fmt: skip


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_stage_eval_reports_the_callers_metric_after_each_stage(pass_name, images, one_thread):
    held_out = images[32:48]

    def mean_logit(model):
        with torch.no_grad():
            return {"mean_logit": logits(model, held_out).mean().item()}

    step = {"pass": pass_name, "config": PASSES[pass_name]}
    plain = tiny_timm_vit()
    plain_report = compressx.apply(plain, [step], data=images, progress=False).steps[0].report
    assert "stage_eval" not in plain_report  # no evaluation set, no key
    model = tiny_timm_vit()
    report = compressx.apply(model, [step], data=images, progress=False, evaluate=mean_logit).steps[0].report
    stage_eval = report["stage_eval"]
    assert list(stage_eval) == STAGES[pass_name]
    assert stage_eval[STAGES[pass_name][-1]] == mean_logit(model)  # the last stage is the model returned
    assert torch.equal(logits(model, held_out), logits(plain, held_out))  # measuring changed nothing
    values = list(stage_eval.values())
    if pass_name != "ptq_minmax":  # measured on the model as it then was (weights quantized only at the end)
        assert values[0] != values[-1]


def test_recipe_eval_reaches_the_stages(tmp_path, one_thread):
    from compressx.api import run_recipe
    from compressx.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "model": {"source": "timm", "id": "vit_tiny_patch16_224", "pretrained": False,
                      "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                 "in_chans": 1, "num_classes": 10}},
            "data": {"calibration": {"source": "digits", "split": "train"}},
            "steps": [{"pass": "isvit", "config": PASSES["isvit"]}],
            "eval": [{"metric": "top1", "data": {"source": "digits", "split": "test"}, "batch_size": 256}],
        }
    )  # fmt: skip
    run = run_recipe(recipe, progress=False, export=False)
    stage_eval = run.result.steps[0].report["stage_eval"]
    assert list(stage_eval) == ["stage1", "stage2", "stage3"]
    assert stage_eval["stage3"] == run.eval_after
    assert all(0 <= value <= 100 for values in stage_eval.values() for value in values.values())
