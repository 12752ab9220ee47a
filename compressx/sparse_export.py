"""Sparse storage in an export: the sparsity census of the manifest and the packed ``sparse.safetensors``.

Every floating-point ``*weight`` tensor of dimension >= 2 that has zeros gets a sparsity record
(``sparsity_entry``): its fraction of exact zeros and its pattern (``"2:4"``, …, or ``"unstructured"``). With
``sparse_format="bitmask"`` those tensors are also written packed as non-zero values plus a 1-bit-per-element mask;
with ``"nm"`` every N:M one as its kept values plus their in-block indices (both in ``compressx.ops.packing``).
``read_packed`` unpacks such a file; ``compressx.export.load_sparse_state_dict`` verifies the export first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compressx.ops.packing import pack_bitmask, pack_nm, pack_zero_signs, unpack_bitmask, unpack_nm
from compressx.ops.sparsity import is_nm_sparse

log = logging.getLogger(__name__)

SPARSE_FORMATS = ("none", "bitmask", "nm")
SPARSE_FILE = "sparse.safetensors"
# The N:M patterns a sparsity record can name, tightest first (by N/M, then by M: 1:4 implies 2:8).
NM_PATTERNS = ((1, 16), (1, 8), (2, 16), (1, 4), (2, 8), (4, 16), (2, 4), (4, 8), (8, 16))


def sparsity_entry(weight: torch.Tensor) -> dict[str, Any]:
    """The manifest's sparsity record of one weight: ``{"sparsity": <zero fraction>, "pattern": <pattern>}``.

    The pattern is the tightest of ``NM_PATTERNS`` that ``weight`` satisfies along its input dimension (OHWI for
    convs, as the pruning passes use) *and* whose sparsity ``1 - N/M`` is exactly the measured one (within 1e-9);
    otherwise ``"unstructured"``. So a 2:4 weight with one extra zero reads as unstructured.
    """
    sparsity = int((weight == 0).sum()) / weight.numel()
    pattern = "unstructured"
    for n, m in NM_PATTERNS:
        if abs((1 - n / m) - sparsity) <= 1e-9 and is_nm_sparse(weight, n, m):
            pattern = f"{n}:{m}"
            break
    return {"sparsity": round(sparsity, 6), "pattern": pattern}


def _sparse_weights(directory: Path, files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The saved tensors a sparsity record covers: floating point, named ``*weight``, dim >= 2, some zero."""
    from safetensors import safe_open

    for file in files:
        if not file.endswith(".safetensors"):
            continue
        with safe_open(str(directory / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if not name.endswith("weight"):
                    continue
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and tensor.dim() >= 2 and bool((tensor == 0).any()):
                    yield name, tensor


def _save_packed(packed: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, dense: int) -> dict[str, Any]:
    """Write packed tensors to ``path``; return the manifest's ``sparse_format`` entry (size against dense)."""
    from safetensors.torch import save_file

    save_file(packed, str(path), metadata=metadata)
    size = path.stat().st_size
    if not packed:
        log.warning(
            "sparse_format %s: no weight tensor qualifies, so %s packs nothing", metadata["sparse_format"], path
        )
    return {
        "format": metadata["sparse_format"],
        "file": path.name,
        "bytes": size,
        "dense_bytes": dense,
        "ratio": round(size / dense, 6) if dense else None,
    }


def _dense_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_packed(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Write ``tensors`` bitmask-packed to ``path``; return the manifest's ``sparse_format`` entry."""
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in tensors.items():
        packed[f"{name}.values"], packed[f"{name}.bitmask"] = pack_bitmask(tensor)
        signs = pack_zero_signs(tensor)
        if signs is not None:
            packed[f"{name}.zero_signs"] = signs
        shapes[name] = list(tensor.shape)
    metadata = {"sparse_format": "bitmask", "shapes": json.dumps(shapes)}
    return _save_packed(packed, metadata, path, _dense_bytes(tensors))


def _write_nm_packed(tensors: dict[str, torch.Tensor], patterns: dict[str, str], path: Path) -> dict[str, Any]:
    """Write the N:M tensors packed (values + in-block indices, ``ops.packing.pack_nm``); the manifest entry."""
    packed: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        n, m = (int(x) for x in patterns[name].split(":"))
        packed[f"{name}.values"], packed[f"{name}.indices"] = pack_nm(tensor, n, m)
        layout[name] = {"shape": list(tensor.shape), "pattern": patterns[name]}
    metadata = {"sparse_format": "nm", "layout": json.dumps(layout)}
    return {**_save_packed(packed, metadata, path, _dense_bytes(tensors)), "tensors": len(tensors)}


def write_sparse(
    directory: Path, files: list[str], sparse_format: str
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The sparsity census of the weight ``files`` saved in ``directory`` and, unless ``sparse_format`` is
    ``"none"``, their packed form written to ``directory / SPARSE_FILE``: the manifest's ``sparsity`` record and
    its ``sparse_format`` entry (None when nothing was packed)."""
    sparsity: dict[str, dict[str, Any]] = {}
    to_pack: dict[str, torch.Tensor] = {}
    for name, tensor in _sparse_weights(directory, files):
        sparsity[name] = sparsity_entry(tensor)
        if sparse_format == "bitmask" or (sparse_format == "nm" and sparsity[name]["pattern"] != "unstructured"):
            to_pack[name] = tensor
    packed_entry = None
    if sparse_format == "bitmask":
        packed_entry = _write_packed(to_pack, directory / SPARSE_FILE)
    elif sparse_format == "nm":
        patterns = {name: sparsity[name]["pattern"] for name in to_pack}
        packed_entry = _write_nm_packed(to_pack, patterns, directory / SPARSE_FILE)
    return sparsity, packed_entry


def read_packed(path: Path, sparse_format: str) -> dict[str, torch.Tensor]:
    """The dense tensors of a packed file written by ``write_sparse`` (``"bitmask"`` or ``"nm"``), unpacked and
    validated (sizes, index range, distinct positions). Raises what safetensors, JSON or the unpacking raise."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        packed = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    if sparse_format == "nm":
        layout = json.loads(metadata["layout"])
        return {
            name: unpack_nm(
                packed[f"{name}.values"],
                packed[f"{name}.indices"],
                tuple(item["shape"]),
                *(int(x) for x in item["pattern"].split(":")),
            )
            for name, item in layout.items()
        }
    shapes = json.loads(metadata["shapes"])
    return {
        name: unpack_bitmask(
            packed[f"{name}.values"],
            packed[f"{name}.bitmask"],
            tuple(shape),
            packed[f"{name}.values"].dtype,
            packed.get(f"{name}.zero_signs"),
        )
        for name, shape in shapes.items()
    }
