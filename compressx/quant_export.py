"""Exports of fake-quantized models (``ptq_minmax``, ``repq_vit``, ``isvit``): integer weights stored for real.

``compressx.save`` hands a model that holds quantizers (``compressx.ops.quant``) to ``write_quantized``, and
``compressx.load`` hands an export whose model entry has ``format: quantized`` to ``read_quantized``. The export
directory then holds:

* ``model.safetensors`` — every tensor of the model *except* the quantized weights and the quantizer parameters
  (LayerNorms, biases, embeddings, ...), in their dtype;
* ``quantized.safetensors`` — for every quantized weight ``W`` (shape, bits ``b``), ``<name>.qweight``: its integer
  codes ``clamp(round(W / Δ) + z, 0, 2^b - 1)`` packed by ``compressx.ops.quant.pack_codes`` (one byte per code at
  8 bits; a little-endian bit stream below: two int4 codes per byte, eight int3 codes in three bytes); and for
  every quantizer (weights and activations) its parameters ``<quantizer>.<buffer>`` (``scale``, ``zero_point``;
  SULQ's ``eta``, ``y_min``, ``y_max``); the metadata holds each quantizer's kind and settings;
* ``config.json`` — how to rebuild the architecture (the transformers config, or the timm / zoo / torch entry).

On load the plain architecture is rebuilt, the other tensors loaded, every quantized layer, attention and
quantizer reinstalled, and each quantized weight set to its de-quantized codes ``(q - z) Δ``. Since fake
quantization of ``(q - z) Δ`` gives ``(q - z) Δ`` back, the reloaded model's outputs equal the in-memory model's
bit for bit. The model stays fake-quantized at inference: no integer kernels are involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compressx.errors import ExportError
from compressx.ops.quant import (
    SULQ,
    LogQuantizer,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    dequantize_codes,
    grouped_view,
    pack_codes,
    unpack_codes,
)

QUANT_FILE = "quantized.safetensors"
FAKE_QUANT_NOTE = (
    "fake-quantized: weights are stored as integer codes with scales and zero points, and de-quantized on load; "
    "inference runs in floating point on the quantized values (no integer kernels)"
)


def has_quantizers(model: Any) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, Quantizer) for m in model.modules())


def _quantizer_config(q: Quantizer) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": q.kind, "bits": q.bits, "role": q.role, "enabled": bool(q.enabled)}
    if isinstance(q, UniformQuantizer):
        config.update(
            granularity=q.granularity,
            axis=q.axis,
            group_size=q.group_size,
            symmetric=q.symmetric,
            method=q.method,
            percentile=q.percentile,
            candidates=list(q.candidates),
        )
    elif isinstance(q, LogQuantizer):
        config.update(base=q.base, candidates=list(q.candidates))
    elif isinstance(q, SULQ):
        config.update(etas=list(q.etas), official=q.official)
    return config


def _build_quantizer(config: dict[str, Any]) -> Quantizer:
    kind = config["kind"]
    if kind == "uniform":
        q: Quantizer = UniformQuantizer(
            config["bits"],
            config["role"],
            granularity=config["granularity"],
            axis=config["axis"],
            group_size=config["group_size"],
            symmetric=config["symmetric"],
            method=config["method"],
            percentile=config["percentile"],
            candidates=config["candidates"],
        )
    elif kind == "log":
        q = LogQuantizer(config["bits"], base=config["base"], candidates=config["candidates"])
    elif kind == "sulq":
        q = SULQ(config["bits"], etas=config["etas"], official=config["official"])
    else:
        raise ExportError(f"unknown quantizer kind {kind!r}; this compressx reads uniform, log, sulq")
    q.enabled = bool(config["enabled"])
    return q


def _quantized_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weight is quantized (enabled, calibrated weight quantizer): name -> layer."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear | QuantConv2d)
        and m.weight_quantizer is not None
        and m.weight_quantizer.enabled
        and m.weight_quantizer.calibrated
    }


def _base_entry(model: nn.Module, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """How to rebuild the architecture (written as ``config.json``); mirrors ``export._write_weights``."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        model.config.save_pretrained(directory)
        return {"format": "transformers", "class": type(model).__name__}
    entry: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if source and source.get("source") == "timm":
        entry.update(format="timm", architecture=source["id"], kwargs=source.get("kwargs", {}))
    elif source and source.get("source") == "zoo":
        entry.update(format="zoo", member=source["id"])
    else:
        entry.update(format="torch")
    (directory / "config.json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def write_quantized(model: nn.Module, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``model.safetensors``, ``quantized.safetensors`` and ``config.json``; return the manifest entry."""
    from safetensors.torch import save_file

    from compressx.ops.vit_quant import find_layout

    weights = _quantized_weights(model)
    quantizer_modules = {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
    packed: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    fp32_bytes = quant_bytes = 0
    for name, layer in weights.items():
        wq = layer.weight_quantizer
        codes = wq.codes(layer.weight.detach())
        packed[f"{name}.qweight"] = pack_codes(codes, wq.bits)
        layout[name] = {"shape": list(layer.weight.shape), "bits": wq.bits}
        fp32_bytes += layer.weight.numel() * 4
        quant_bytes += packed[f"{name}.qweight"].numel() + (wq.scale.numel() + wq.zero_point.numel()) * 4
    for name, q in quantizer_modules.items():
        for buffer_name, buffer in q.named_buffers(recurse=False):
            packed[f"{name}.{buffer_name}"] = buffer.detach().contiguous()
    excluded = {f"{name}.weight" for name in weights} | {
        f"{name}.{b}" for name, q in quantizer_modules.items() for b, _ in q.named_buffers(recurse=False)
    }
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in excluded}
    save_file(rest, str(directory / "model.safetensors"))
    spec = {
        "family": find_layout(model).family,
        "linears": [n for n, m in model.named_modules() if isinstance(m, QuantLinear)],
        "convs": [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)],
        "attentions": [n for n, m in model.named_modules() if isinstance(getattr(m, "matmul_qk", None), QuantMatMul)],
        "quantizers": {name: _quantizer_config(q) for name, q in quantizer_modules.items()},
        "weights": layout,
    }
    save_file(packed, str(directory / QUANT_FILE), metadata={"compressx_quantization": json.dumps(spec)})
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    entry = {
        "format": "quantized",
        "class": type(model).__name__,
        "base": _base_entry(model, directory, source),
        "file": QUANT_FILE,
        "note": FAKE_QUANT_NOTE,
        "weight_bits": sorted({v["bits"] for v in layout.values()}),
        "quantized_weights": len(layout),
        "sizes": {
            "quantized_weight_bytes": quant_bytes,  # packed codes + scales + zero points
            "fp32_bytes": fp32_bytes,
            "fp16_bytes": fp32_bytes // 2,
            "ratio_to_fp16": round(quant_bytes / (fp32_bytes / 2), 4) if fp32_bytes else None,
        },
    }
    if len(dtypes) == 1:
        entry["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    return entry


def _rebuild_architecture(directory: Path, base: dict[str, Any], model: nn.Module | None) -> nn.Module:
    fmt = base.get("format")
    with torch.random.fork_rng():  # the init is overwritten: leave the caller's RNG alone
        if fmt == "transformers":
            import transformers

            cls = getattr(transformers, base["class"], None)
            if cls is None:
                raise ExportError(f"this transformers has no class {base['class']!r} to rebuild the model with")
            return cls(transformers.AutoConfig.from_pretrained(directory))
        if fmt == "timm":
            import timm

            return timm.create_model(base["architecture"], pretrained=False, **base.get("kwargs", {}))
        if fmt == "zoo":
            from compressx import zoo

            return zoo.get_member(base["member"]).build_empty()
    if fmt == "torch" and model is not None:
        return model
    if fmt == "torch":
        raise ExportError(
            f"{directory} holds a plain torch module ({base.get('class')}); pass model=<an instance of it> "
            "to load the weights into"
        )
    raise ExportError(f"{directory}: unknown base model format {fmt!r}; known: transformers, timm, zoo, torch")


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def read_quantized(directory: Path, entry: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized export (hashes already verified by ``export.load``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from compressx.ops.vit_quant import attention_forward

    file = entry.get("file")
    if not isinstance(file, str) or Path(file).name != file or not (directory / file).is_file():
        raise ExportError(f"the quantized weights file {file!r} is not a file listed in the export's manifest")
    model = _rebuild_architecture(directory, entry["base"], model)
    if isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype):
        model = model.to(getattr(torch, entry["dtype"]))
    with safe_open(str(directory / entry["file"]), framework="pt") as f:
        spec = json.loads(f.metadata()["compressx_quantization"])
    tensors = load_file(str(directory / entry["file"]))
    quantizers = {}
    for name, config in spec["quantizers"].items():
        q = _build_quantizer(config)
        for buffer_name in list(q._buffers):
            key = f"{name}.{buffer_name}"
            if key in tensors:
                setattr(q, buffer_name, tensors[key])
        quantizers[name] = q
    for name in spec["linears"]:
        linear = model.get_submodule(name)
        if linear.bias is None and f"{name}.bias" in _keys(directory / "model.safetensors"):
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
        _set_child(
            model,
            name,
            QuantLinear.from_linear(
                linear, quantizers.get(f"{name}.input_quantizer"), quantizers.get(f"{name}.weight_quantizer")
            ),
        )
    for name in spec["convs"]:
        _set_child(
            model, name, QuantConv2d.from_conv(model.get_submodule(name), quantizers[f"{name}.weight_quantizer"])
        )
    for name in spec["attentions"]:
        attn = model.get_submodule(name)
        attn.matmul_qk = QuantMatMul(quantizers.get(f"{name}.matmul_qk.a_quantizer"),
                                     quantizers.get(f"{name}.matmul_qk.b_quantizer"))  # fmt: skip
        attn.matmul_av = QuantMatMul(quantizers.get(f"{name}.matmul_av.a_quantizer"),
                                     quantizers.get(f"{name}.matmul_av.b_quantizer"))  # fmt: skip
        attention_forward(attn, spec["family"])
    rest = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    expected_missing = {f"{n}.weight" for n in spec["weights"]}
    missing = {k for k in missing if k not in expected_missing and ".matmul_" not in k and "_quantizer." not in k}
    if missing or unexpected:
        raise ExportError(f"{directory}: weights do not fit the architecture: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    with torch.no_grad():
        for name, layout in spec["weights"].items():
            layer = model.get_submodule(name)
            wq = layer.weight_quantizer
            codes = unpack_codes(tensors[f"{name}.qweight"], layout["bits"], layout["shape"]).to(layer.weight.dtype)
            view = grouped_view(codes, wq.granularity, wq.group_size)
            layer.weight.copy_(dequantize_codes(view, wq.scale, wq.zero_point).reshape(layer.weight.shape))
    return model.eval()


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
