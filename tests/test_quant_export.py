"""Quantized exports: integer codes packed in safetensors, reloaded by compressx.load to identical outputs."""

import json

import pytest
import torch
from conftest import VIT_PTQ_PASSES as PASSES
from conftest import tiny_hf_vit, tiny_timm_swin, tiny_timm_vit
from safetensors import safe_open

import compressx
from compressx.ops.quant import QuantLinear, unpack_codes


@pytest.fixture
def images():
    return torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_timm_export_stores_packed_codes_and_reloads_identically(tmp_path, images, bits):
    model = tiny_timm_vit()
    config = {"w_bits": bits, "a_bits": max(bits, 4)}
    result = compressx.apply(model, [{"pass": "repq_vit", "config": config}], data=images, progress=False)
    expected = logits(model, images[:8])
    out = compressx.save(model, tmp_path / "export", result)
    manifest = json.loads((tmp_path / "export" / "compressx.json").read_text())
    entry = manifest["model"]
    assert entry["format"] == "quantized" and entry["weight_bits"] == [bits]
    assert "quantized.safetensors" in manifest["files"]
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        assert "blocks.0.attn.qkv.weight" not in set(f.keys())  # no float copy of a quantized weight
        assert "blocks.0.norm1.weight" in set(f.keys())
    with safe_open(str(tmp_path / "export" / "quantized.safetensors"), framework="pt") as f:
        packed = f.get_tensor("blocks.0.attn.qkv.qweight")
    assert packed.dtype == torch.uint8 and packed.numel() == -(-96 * 32 * bits // 8)
    assert int(unpack_codes(packed, bits, (96, 32)).max()) <= 2**bits - 1
    if bits == 4:
        assert 0.25 <= entry["sizes"]["ratio_to_fp16"] < 0.4  # W4: a quarter of fp16 plus the scales
    reloaded = compressx.load(out, model=tiny_timm_vit(seed=5))
    assert isinstance(reloaded.blocks[0].attn.qkv, QuantLinear)
    assert torch.equal(logits(reloaded, images[:8]), expected)
    assert "fake-quantized" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("pass_name", ["ptq_minmax", "isvit"])
def test_hf_export_reloads_identically_without_the_model(tmp_path, images, pass_name, one_thread):
    model = tiny_hf_vit()
    result = compressx.apply(model, [{"pass": pass_name, "config": PASSES[pass_name]}], data=images, progress=False)
    expected = logits(model, images[:8])
    out = compressx.save(model, tmp_path / "export", result)
    reloaded = compressx.load(out)
    assert type(reloaded).__name__ == "ViTForImageClassification"
    assert torch.equal(logits(reloaded, images[:8]), expected)


def test_a_tampered_quantized_file_is_refused(tmp_path, images):
    model = tiny_timm_vit()
    result = compressx.apply(model, [{"pass": "ptq_minmax"}], data=images, progress=False)
    out = compressx.save(model, tmp_path / "export", result)
    path = tmp_path / "export" / "quantized.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(compressx.errors.ExportError, match="quantized.safetensors.*corrupt"):
        compressx.load(out, model=tiny_timm_vit())


def test_swin_export_reloads_identically(tmp_path, images, one_thread):
    model = tiny_timm_swin()
    result = compressx.apply(model, [{"pass": "isvit", "config": PASSES["isvit"]}], data=images, progress=False)
    expected = logits(model, images[:8])
    out = compressx.save(model, tmp_path / "export", result)
    reloaded = compressx.load(out, model=tiny_timm_swin(seed=3))
    assert torch.equal(logits(reloaded, images[:8]), expected)


TIMM_RECIPE_MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 2},
    ),
}


@pytest.mark.parametrize("kind", list(TIMM_RECIPE_MODELS))
def test_timm_recipe_exports_and_reloads_identically(tmp_path, kind, one_thread):
    from compressx.api import run_recipe
    from compressx.images import digits_tensors, parse_image_data_spec
    from compressx.recipe import parse_recipe

    model_id, kwargs = TIMM_RECIPE_MODELS[kind]
    recipe = parse_recipe(
        {
            "model": {"source": "timm", "id": model_id, "pretrained": False,
                      "kwargs": {**kwargs, "in_chans": 1, "num_classes": 10}},
            "data": {"calibration": {"source": "digits", "split": "train"}},
            "steps": [{"pass": "isvit", "config": {**PASSES["isvit"], "w_bits": 3, "a_bits": 3}}],
            "export": {"dir": str(tmp_path / "export")},
        }
    )  # fmt: skip
    run = run_recipe(recipe, progress=False)
    images, _ = digits_tensors(parse_image_data_spec({"source": "digits", "split": "test"}))
    expected = run.model(images[:16])
    reloaded = compressx.load(run.export_dir)  # rebuilt from the recorded timm architecture, no model= needed
    assert torch.equal(reloaded(images[:16]), expected)
    manifest = json.loads((tmp_path / "export" / "compressx.json").read_text())
    assert manifest["model"]["base"]["format"] == "timm" and manifest["model"]["weight_bits"] == [3]
