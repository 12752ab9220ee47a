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

A transformers model whose quantized Linear weights include some that compressed-tensors' ``pack-quantized``
format describes (uniform int4 / int8, per channel, per group or per tensor, zero point on the integer grid) is
also written so that ``transformers`` (with ``compressed-tensors`` installed) loads its weights without compressx:
those layers' codes go to ``model.safetensors`` as ``<layer>.weight_packed`` (int32 words), ``weight_scale``,
``weight_zero_point`` (asymmetric only, int32 words along the output dimension) and ``weight_shape`` instead of
``quantized.safetensors``, ``config.json`` gets the matching ``quantization_config``, and every other quantized
weight (the patch-embedding Conv2d, 3-bit layers, ...) is also stored de-quantized as ``<layer>.weight``. The
activation quantizers are not expressed there: transformers runs the model with quantized weights and
full-precision activations.

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
    pack_int32_rows,
    unpack_codes,
    unpack_int32_rows,
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


CT_FORMAT = "pack-quantized"
CT_BITS = (4, 8)  # the bit-widths this export describes to compressed-tensors


def _ct_problem(layer: nn.Module) -> str | None:
    """Why compressed-tensors' ``pack-quantized`` cannot describe this layer's weight, or None if it can."""
    wq = layer.weight_quantizer
    if not isinstance(layer, QuantLinear):
        return "a convolution (compressed-tensors packs Linear weights)"
    if not isinstance(wq, UniformQuantizer) or wq.bits not in CT_BITS:
        return f"{wq.kind} {wq.bits}-bit (int4 / int8 only)"
    if wq.granularity == "channel" and wq.axis not in (0, -2):
        return "per-channel scales along the input dimension"
    zero = wq.zero_point
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 2**wq.bits - 1:
        return "zero point off the integer code grid"
    return None


def _ct_scheme(wq: UniformQuantizer) -> dict[str, Any]:
    """The compressed-tensors ``QuantizationArgs`` of a weight quantizer (a tensor's one scale is repeated per
    channel, which describes the same values)."""
    group = wq.granularity == "group"
    return {
        "num_bits": wq.bits,
        "type": "int",
        "symmetric": bool(wq.symmetric),
        "strategy": "group" if group else "channel",
        "group_size": wq.group_size if group else None,
        "dynamic": False,
    }


def _ct_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """``<name>.weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` in the layout of
    compressed-tensors' ``pack-quantized`` (its ``PackedQuantizationCompressor``)."""
    wq = layer.weight_quantizer
    weight = layer.weight.detach()
    rows, cols = weight.shape
    shape = (rows, cols // wq.group_size if wq.granularity == "group" else 1)
    scale = wq.scale.detach().reshape(-1, shape[1]).expand(shape)  # a per-tensor scale: repeated per channel
    zero = wq.zero_point.detach().reshape(-1, shape[1]).expand(shape)
    out = {
        f"{name}.weight_packed": pack_int32_rows(wq.codes(weight), wq.bits),
        f"{name}.weight_scale": scale.contiguous().clone(),
        f"{name}.weight_shape": torch.tensor([rows, cols]),
    }
    if not wq.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32_rows(zero.round().long().T, wq.bits).T.contiguous()
    return out


def _ct_config(weights: dict[str, nn.Module], packed: list[str]) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: one config group per distinct weight scheme, its targets the
    layer names; activations are not described (left in full precision by transformers)."""
    groups: dict[str, dict[str, Any]] = {}
    for name in packed:
        scheme = _ct_scheme(weights[name].weight_quantizer)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None,
                                "output_activations": None, "format": CT_FORMAT})  # fmt: skip
        groups[key]["targets"].append(name)
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": [],
    }


def _base_entry(model: nn.Module, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """How to rebuild the architecture (written as ``config.json``); mirrors ``export._write_weights``."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        model.config.save_pretrained(directory)
        return {"format": "transformers", "class": type(model).__name__}
    from compressx.manifest import write_module_entry

    return write_module_entry(model, directory, source)


def write_quantized(model: nn.Module, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``model.safetensors``, ``quantized.safetensors`` and ``config.json``; return the manifest entry."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    from compressx.ops.vit_quant import find_layout

    weights = _quantized_weights(model)
    quantizer_modules = {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
    packed: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    fp32_bytes = quant_bytes = 0
    # compressed-tensors layout, for transformers models: the layers it describes, and why not the others
    describe = isinstance(model, PreTrainedModel)
    problems = {name: _ct_problem(layer) for name, layer in weights.items()} if describe else {}
    ct_layers = [name for name, problem in problems.items() if problem is None]
    ct_tensors: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, layer in weights.items():
        wq = layer.weight_quantizer
        codes = wq.codes(layer.weight.detach())
        layout[name] = {"shape": list(layer.weight.shape), "bits": wq.bits}
        fp32_bytes += layer.weight.numel() * 4
        if name in ct_layers:
            own = _ct_tensors(name, layer)
            ct_tensors.update(own)
            layout[name]["storage"] = CT_FORMAT
            quant_bytes += sum(t.numel() * t.element_size() for k, t in own.items() if not k.endswith("_shape"))
            continue
        packed[f"{name}.qweight"] = pack_codes(codes, wq.bits)
        quant_bytes += packed[f"{name}.qweight"].numel() + (wq.scale.numel() + wq.zero_point.numel()) * 4
        if ct_layers:  # transformers reads this weight de-quantized (what compressx.load gives back)
            view = grouped_view(codes.to(layer.weight.dtype), wq.granularity, wq.group_size)
            dense[f"{name}.weight"] = dequantize_codes(view, wq.scale, wq.zero_point).reshape(layer.weight.shape)
    for name, q in quantizer_modules.items():
        for buffer_name, buffer in q.named_buffers(recurse=False):
            packed[f"{name}.{buffer_name}"] = buffer.detach().contiguous()
    excluded = {f"{name}.weight" for name in weights} | {
        f"{name}.{b}" for name, q in quantizer_modules.items() for b, _ in q.named_buffers(recurse=False)
    }
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in excluded}
    rest.update(ct_tensors)
    rest.update({k: v.detach().contiguous() for k, v in dense.items()})
    save_file(rest, str(directory / "model.safetensors"), metadata={"format": "pt"})
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
    if ct_layers:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = _ct_config(weights, ct_layers)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        entry["compressed_tensors"] = {
            "format": CT_FORMAT,
            "packed_layers": len(ct_layers),
            "dense_layers": {name: problem for name, problem in problems.items() if problem is not None},
            "dense_copy_bytes": sum(t.numel() * t.element_size() for t in dense.values()),
        }
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
    ct_codes = {name: _ct_codes(rest, name, layout) for name, layout in spec["weights"].items()
                if layout.get("storage") == CT_FORMAT}  # fmt: skip
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
            codes = (
                ct_codes[name]
                if name in ct_codes
                else unpack_codes(tensors[f"{name}.qweight"], layout["bits"], layout["shape"])
            )
            codes = codes.to(layer.weight.dtype)
            view = grouped_view(codes, wq.granularity, wq.group_size)
            layer.weight.copy_(dequantize_codes(view, wq.scale, wq.zero_point).reshape(layer.weight.shape))
    return model.eval()


def _ct_codes(tensors: dict[str, torch.Tensor], name: str, layout: dict[str, Any]) -> torch.Tensor:
    """The unsigned codes of a layer stored in compressed-tensors' layout; its tensors are removed from
    ``tensors`` (they are not parameters of the rebuilt model)."""
    keys = [f"{name}.{suffix}" for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
    if keys[0] not in tensors:
        raise ExportError(f"model.safetensors lacks {keys[0]}, which the quantization metadata says is there")
    words = tensors[keys[0]]
    for key in keys:
        tensors.pop(key, None)
    try:
        return unpack_int32_rows(words, layout["bits"], layout["shape"][1]).reshape(layout["shape"])
    except ValueError as err:
        raise ExportError(f"model.safetensors: {keys[0]}: {err}") from err


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
