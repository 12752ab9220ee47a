"""``compressx validate`` predicts what ``apply`` refuses about the model (issues 11 and 17): pass families, vtw/fastv
model classes, cutdiffusion pipelines and schedulers, layer-wise passes without findable decoder layers, GPT-2 as
a causal LM. Each is found on the meta model (config files only), before any weights load."""

from __future__ import annotations

import json

import pytest
import transformers

from compressx.cli import main
from compressx.errors import RecipeError
from compressx.recipe import parse_recipe
from compressx.runner import check_recipe

CALIBRATION = {"calibration": {"source": "stdlib_text", "split": "train", "samples": 2, "seq_len": 16}}
PERPLEXITY = {"metric": "perplexity", "data": {"source": "stdlib_text", "split": "test", "samples": 2, "seq_len": 16}}


def hf_dir(tmp_path, config) -> str:
    """A model directory holding only ``config.json``: enough for validate, which never reads weights."""
    directory = tmp_path / type(config).__name__
    config.save_pretrained(directory)
    return str(directory)


def validate(model: dict, steps: list[dict], **extra) -> str | None:
    """The problems ``check_recipe`` finds (None when there are none)."""
    recipe = parse_recipe({"model": model, "steps": steps, **extra})
    try:
        check_recipe(recipe)
    except RecipeError as err:
        return str(err)
    return None


def tiny_gpt2(tmp_path) -> str:
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return hf_dir(tmp_path, config)


# ---- families (issue 11) ----------------------------------------------------------------------------------------


def test_vtw_on_a_plain_lm_is_refused_by_its_families(tmp_path):
    problems = validate({"source": "hf", "id": tiny_gpt2(tmp_path)}, [{"pass": "vtw", "config": {"layer": 1}}])
    assert problems is not None and "pass 'vtw' applies to mllm models; this model is llm" in problems


def test_a_family_problem_does_not_hide_the_other_steps_problems(tmp_path):
    steps = [{"pass": "magnitude", "targets": ["lm_head"]}, {"pass": "vtw", "config": {"layer": 1}}]
    problems = validate({"source": "hf", "id": tiny_gpt2(tmp_path)}, steps)
    assert problems is not None and "2 problem(s)" in problems
    assert "steps[0]: module 'lm_head' shares its weight" in problems and "steps[1]: pass 'vtw' applies" in problems


def test_wanda_on_a_cnn_is_refused_by_its_families():
    problems = validate({"source": "zoo", "id": "resnet_digits"}, [{"pass": "wanda"}], data=CALIBRATION)
    assert problems is not None and "pass 'wanda' applies to llm models; this model is cnn" in problems


# ---- GPT-2 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_name", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_gpt2_validates_with_default_targets_and_perplexity(pass_name, tmp_path):
    steps = [{"pass": pass_name, "config": {"sparsity": 0.5}}]
    assert validate({"source": "hf", "id": tiny_gpt2(tmp_path)}, steps, data=CALIBRATION, eval=[PERPLEXITY]) is None


def test_gpt2_tied_lm_head_is_refused_by_validate(tmp_path):
    steps = [{"pass": "magnitude", "targets": ["lm_head"]}]
    problems = validate({"source": "hf", "id": tiny_gpt2(tmp_path)}, steps)
    assert problems is not None and "tied" in problems and "transformer.wte.weight" in problems


@pytest.mark.parametrize("pass_name", ["wanda", "sparsegpt", "dsnot"])
def test_calibration_passes_on_fused_moe_experts_are_checked_by_layout_in_validate(pass_name, tmp_path):
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    model = {"source": "hf", "id": hf_dir(tmp_path, config)}
    assert validate(model, [{"pass": pass_name}], data=CALIBRATION) is None  # calibrated per expert
    assert validate(model, [{"pass": "magnitude"}]) is None  # magnitude prunes them per expert too
    # gpt-oss experts (biases, clamped activation): a layout the calibration cannot recompute
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2)  # fmt: skip
    model = {"source": "hf", "id": hf_dir(tmp_path, config)}
    problems = validate(model, [{"pass": pass_name}], data=CALIBRATION)
    assert problems is not None and "'model.layers.0.mlp.experts' (GptOssExperts" in problems
    assert "cannot calibrate this experts layout: prune it with magnitude, or add it to ignore" in problems
    assert validate(model, [{"pass": pass_name, "ignore": ["re:.*\\.experts"]}], data=CALIBRATION) is None


# ---- vtw / fastv on multimodal models they cannot hook ------------------------------------------------------------

UNSUPPORTED_MLLMS = [
    ("Idefics3Config", "Idefics3ForConditionalGeneration", {}),
    ("SmolVLMConfig", "SmolVLMForConditionalGeneration", {}),
    ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", {}),
    (
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        {
            "text_config": {
                "model_type": "qwen2",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 64,
            }
        },  # fmt: skip
    ),
]


@pytest.mark.parametrize("pass_name", ["vtw", "fastv"])
@pytest.mark.parametrize(("config_name", "class_name", "kwargs"), UNSUPPORTED_MLLMS)
def test_token_withdrawal_refuses_unsupported_mllms_in_validate(pass_name, config_name, class_name, kwargs, tmp_path):
    config = getattr(transformers, config_name)(**kwargs)
    model = {"source": "hf", "id": hf_dir(tmp_path, config), "class": class_name}
    problems = validate(model, [{"pass": pass_name, "config": {"layer": 1}}])
    assert problems is not None and "token withdrawal supports" in problems and f"got {class_name}" in problems


# ---- cutdiffusion / multidiffusion on pipelines and schedulers they cannot sample with ----------------------------


def pipeline_dir(tmp_path, pipeline: str, scheduler: str) -> str:
    directory = tmp_path / f"{pipeline}-{scheduler}"
    directory.mkdir()
    index = {"_class_name": pipeline, "_diffusers_version": "0.30.0", "scheduler": ["diffusers", scheduler]}
    (directory / "model_index.json").write_text(json.dumps(index))
    return str(directory)


@pytest.mark.parametrize(
    ("pipeline", "scheduler", "expected"),
    [
        ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", "got StableDiffusion3Pipeline"),
        ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", "got FluxPipeline"),
        ("StableDiffusionPipeline", "PNDMScheduler", "cannot sample with PNDMScheduler"),
        ("StableDiffusionXLPipeline", "DPMSolverMultistepScheduler", "cannot sample with DPMSolverMultistepScheduler"),
    ],
)
@pytest.mark.parametrize("pass_name", ["cutdiffusion", "multidiffusion"])
def test_cutdiffusion_refuses_pipelines_and_schedulers_in_validate(pass_name, pipeline, scheduler, expected, tmp_path):
    model = {"source": "diffusers", "id": pipeline_dir(tmp_path, pipeline, scheduler)}
    problems = validate(model, [{"pass": pass_name}])
    assert problems is not None and expected in problems


def test_cutdiffusion_accepts_a_supported_pipeline_in_validate(tmp_path):
    model = {"source": "diffusers", "id": pipeline_dir(tmp_path, "StableDiffusionPipeline", "EulerDiscreteScheduler")}
    assert validate(model, [{"pass": "cutdiffusion"}]) is None


# ---- layer-wise passes on a causal LM outside the old table of model types: its layers are found --------------------


@pytest.mark.parametrize("pass_name", ["wanda", "sparsegpt", "dsnot"])
def test_layerwise_passes_validate_on_gpt_neox(pass_name, tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64)  # fmt: skip
    assert validate({"source": "hf", "id": hf_dir(tmp_path, config)}, [{"pass": pass_name}], data=CALIBRATION) is None


def test_validate_cli_exits_2_on_vtw_for_a_plain_lm(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{source: hf, id: {tiny_gpt2(tmp_path)}}}\nsteps: [{{pass: vtw, config: {{layer: 1}}}}]\n"
    )
    assert main(["validate", str(recipe)]) == 2
    assert "applies to mllm models" in capsys.readouterr().err
