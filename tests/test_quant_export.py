"""Quantized exports: integer codes packed in safetensors, reloaded by compressx.load to identical outputs."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import VIT_PTQ_PASSES as PASSES
from conftest import tiny_hf_vit, tiny_timm_swin, tiny_timm_vit
from safetensors import safe_open
from safetensors.torch import load_file

import compressx
from compressx.ops.quant import QuantLinear, UniformQuantizer, unpack_codes


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


# Loads an export with transformers alone (compressx made unimportable) and saves its state dict: argv = export,
# output file, "dequantize" (CompressedTensorsConfig(dequantize=True)) or "plain" (decompressed by a forward).
HF_ONLY_LOAD = """
import sys
sys.modules["compressx"] = None
import torch, transformers
from safetensors.torch import save_file
kwargs = {}
if sys.argv[3] == "dequantize":
    kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
model = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1], **kwargs)
model(pixel_values=torch.zeros(1, 1, 16, 16))  # compressed-tensors decompresses packed weights on the first forward
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
"""


def _symmetric_weights(model):
    """Re-calibrate every weight quantizer symmetrically (zero point 2^(b-1), i.e. signed codes)."""
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer) and module.role == "weight":
            module.symmetric = True
            module.calibrate(model.get_submodule(name.rpartition(".")[0]).weight.detach())


def _per_group(model, symmetric=False, names=None):
    """Weights quantized per group of 8 input columns (the ViT passes quantize per channel): every Linear's, or
    those in ``names``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and (names is None or name in names):
            quantizer = UniformQuantizer(4, "weight", granularity="group", group_size=8, symmetric=symmetric,
                                         method="minmax")  # fmt: skip
            quantizer.calibrate(module.weight.detach())
            quantizer.enabled = True
            module.weight_quantizer = quantizer


def _symmetric_with_group_head(model):
    _symmetric_weights(model)
    _per_group(model, symmetric=True, names={"classifier"})


@pytest.mark.parametrize(
    "bits, granularity, change, load",
    [
        (4, "channel", None, "dequantize"),
        (8, "tensor", None, "dequantize"),
        (4, "channel", _per_group, "dequantize"),
        (4, "channel", _symmetric_weights, "plain"),
        (4, "channel", _symmetric_with_group_head, "plain"),
    ],
    ids=["int4-channel", "int8-tensor", "int4-group", "int4-symmetric", "int4-symmetric-group-head"],
)
def test_hf_export_loads_in_transformers_without_compressx(tmp_path, images, bits, granularity, change, load):
    """compressed-tensors' pack-quantized layout: transformers alone gives the weights compressx.load gives.
    Asymmetric (zero-point) exports load with CompressedTensorsConfig(dequantize=True): transformers 5.23 with
    compressed-tensors 0.20 refuses them otherwise (the packed zero point's shape, llm-compressor issue 1618)."""
    pytest.importorskip(
        "compressed_tensors", reason="compressed-tensors is not installed (pip install compressed-tensors)"
    )
    model = tiny_hf_vit()
    config = {"w_bits": bits, "a_bits": 8, "weight_granularity": granularity}
    result = compressx.apply(model, [{"pass": "ptq_minmax", "config": config}], data=images, progress=False)
    if change:
        change(model)
    out = compressx.save(model, tmp_path / "export", result)
    quant_config = json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]
    assert quant_config["format"] == "pack-quantized"
    groups = list(quant_config["config_groups"].values())
    symmetric = load == "plain"
    assert all(g["weights"]["num_bits"] == bits and g["weights"]["symmetric"] is symmetric for g in groups)
    strategies = [(g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups]
    if change is _symmetric_with_group_head:  # two schemes: two config groups
        assert strategies == [("channel", None), ("group", 8)] and groups[1]["targets"] == ["classifier"]
    else:
        assert strategies == [("group", 8) if change is _per_group else ("channel", None)]
    targets = [name for g in groups for name in g["targets"]]
    assert "vit.layers.0.attention.q_proj" in targets and "classifier" in targets
    entry = json.loads((tmp_path / "export" / "compressx.json").read_text())["model"]["compressed_tensors"]
    assert list(entry["dense_layers"]) == ["vit.embeddings.patch_embeddings.projection"]  # a Conv2d
    expected = logits(model, images[:8])
    reloaded_model = compressx.load(out)
    assert torch.equal(logits(reloaded_model, images[:8]), expected)  # compressx reads weight_packed back exactly
    hf_file = tmp_path / "hf.safetensors"
    run = subprocess.run([sys.executable, "-c", HF_ONLY_LOAD, str(out), str(hf_file), load], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    hf = load_file(str(hf_file))
    reloaded = reloaded_model.state_dict()
    weights = [f"{name}.weight" for name in [*targets, *entry["dense_layers"]]]
    assert all(key in hf for key in weights)
    shared = [key for key in hf if key in reloaded]
    assert set(weights) <= set(shared) and len(shared) >= len(reloaded) - sum("quantizer" in k for k in reloaded)
    assert all(torch.equal(hf[key], reloaded[key]) for key in shared)  # weights identical, bit for bit


def test_hf_export_without_int4_or_int8_weights_has_no_quantization_config(tmp_path, images):
    model = tiny_hf_vit()
    result = compressx.apply(model, [{"pass": "ptq_minmax", "config": {"w_bits": 3}}], data=images, progress=False)
    out = compressx.save(model, tmp_path / "export", result)
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert "compressed_tensors" not in json.loads((tmp_path / "export" / "compressx.json").read_text())["model"]
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith(("weight_packed", "q_proj.weight")) for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    assert torch.equal(logits(compressx.load(out), images[:8]), logits(model, images[:8]))


def test_hf_export_with_a_zero_point_off_the_grid_keeps_that_layer_dense(tmp_path, images):
    model = tiny_hf_vit()
    result = compressx.apply(model, [{"pass": "ptq_minmax"}], data=images, progress=False)
    quantizer = model.classifier.weight_quantizer
    quantizer.zero_point = quantizer.zero_point + 20  # codes clamp, but the zero point is no int4 code
    expected = logits(model, images[:8])
    out = compressx.save(model, tmp_path / "export", result)
    entry = json.loads((tmp_path / "export" / "compressx.json").read_text())["model"]["compressed_tensors"]
    assert entry["dense_layers"]["classifier"] == "zero point off the integer code grid"
    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as f:
        assert "classifier.weight" in set(f.keys()) and "classifier.weight_packed" not in set(f.keys())
    assert torch.equal(logits(compressx.load(out), images[:8]), expected)
