"""ptq_minmax: min-max ranges, per-tensor activations, weights untouched (the shared ViT tests are in test_isvit)."""

import pytest
import torch
from conftest import tiny_timm_vit

import compressx


def test_minmax_ranges_cover_the_calibration_activations_exactly():
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = tiny_timm_vit()
    config = {"calibration_images": 16, "w_bits": 8, "a_bits": 8}
    result = compressx.apply(model, [{"pass": "ptq_minmax", "config": config}], data=images, progress=False)
    fc2 = model.blocks[0].mlp.fc2
    seen = {}  # fc2's input in the quantized model (its quantizer sits inside fc2): what calibration saw
    hook = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    model(images)
    hook.remove()
    q = fc2.input_quantizer
    assert q.granularity == "tensor" and q.method == "minmax"
    low, high = min(float(seen["x"].min()), 0.0), max(float(seen["x"].max()), 0.0)
    assert float(q.scale) == torch.tensor((high - low) / 255).item()
    assert float(q.zero_point) == round(-low / float(q.scale))
    assert fc2.weight_quantizer.scale.shape == (fc2.out_features, 1)  # per output channel
    w = fc2.weight.detach()
    expected = (w.max(dim=1).values.clamp(min=0) - w.min(dim=1).values.clamp(max=0)) / 255
    assert torch.allclose(fc2.weight_quantizer.scale.reshape(-1), expected)
    assert result.steps[0].report["layers"]["blocks.0.attn.matmul_av.a_quantizer"]["kind"] == "uniform"


def test_tensor_weight_granularity():
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = tiny_timm_vit()
    compressx.apply(model, [{"pass": "ptq_minmax", "config": {"weight_granularity": "tensor"}}], data=images)
    assert model.blocks[0].attn.qkv.weight_quantizer.scale.dim() == 0


@pytest.mark.parametrize("pass_name", ["ptq_minmax", "repq_vit", "isvit"])
def test_validate_refuses_a_model_without_a_supported_vit(pass_name):
    """``check_model`` runs on the meta model: a ViT-family model the passes cannot quantize is refused before
    any calibration (here a timm ViT whose blocks use a non-standard attention module)."""
    import timm

    from compressx.engine import _as_step, check_steps_on_model

    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1)
    assert check_steps_on_model(model, [_as_step({"pass": pass_name}, 0)]) == []
    model.blocks[0].attn = torch.nn.Identity()
    problems = check_steps_on_model(model, [_as_step({"pass": pass_name}, 0)])
    assert len(problems) == 1 and problems[0].startswith("steps[0]: ") and "blocks.0" in problems[0], problems
