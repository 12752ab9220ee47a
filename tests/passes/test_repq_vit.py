"""repq_vit: log√2 post-Softmax quantizer and the reparameterised post-LayerNorm quantizers (shared ViT tests are
in test_isvit)."""

import math

import torch
from conftest import randomise_layernorms, tiny_timm_vit

import compressx


def _run(round_zero_point):
    images = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = tiny_timm_vit()
    randomise_layernorms(model, torch.Generator().manual_seed(1))
    config = {"round_zero_point": round_zero_point}
    result = compressx.apply(model, [{"pass": "repq_vit", "config": config}], data=images, progress=False)
    return model, result.steps[0].report


def test_post_layernorm_quantizers_end_per_tensor_with_an_integer_zero_point():
    model, report = _run(True)
    qkv = model.blocks[0].attn.qkv.input_quantizer
    assert qkv.granularity == "tensor" and float(qkv.zero_point) == round(float(qkv.zero_point))
    assert set(report["reparameterised"]) == {f"blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)}
    softmax = model.blocks[0].attn.matmul_av.a_quantizer
    assert softmax.kind == "log" and softmax.base == math.sqrt(2.0)


def test_reference_unrounded_zero_point_is_available():
    model, _ = _run(False)
    zero = float(model.blocks[0].attn.qkv.input_quantizer.zero_point)
    assert zero != round(zero)
