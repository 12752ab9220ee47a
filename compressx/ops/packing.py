"""Bitmask packing of sparse tensors: the non-zero values plus one bit per element saying where they go.

Layout (``sparse_format: bitmask`` of an export, see ``docs/export.md``):

* ``values``: the non-zero elements (``tensor != 0``) in row-major order, in the tensor's dtype;
* ``bitmask``: uint8, ``ceil(numel / 8)`` bytes. Element ``i`` of the row-major flattened tensor is bit ``i % 8``
  (value ``1 << (i % 8)``, little-endian bit order) of byte ``i // 8``; 1 means non-zero. Padding bits are 0;
* ``zero_signs`` (only needed when the tensor holds ``-0.0``, which ``w * mask`` pruning produces for negative
  weights): the sign bits of the zero elements, in row-major order, packed the same way, ``ceil(zeros / 8)``
  bytes. Without it every zero unpacks as ``+0.0``; with it the round trip is bit-identical.

Everything is vectorised torch; no Python loop over elements.
"""

from __future__ import annotations

import torch


def _shifts(device: torch.device) -> torch.Tensor:
    """Bit positions 0..7: bit ``i`` of a byte has value ``1 << i`` (little-endian bit order)."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def packed_length(count: int) -> int:
    """Bytes needed for ``count`` bits: ``ceil(count / 8)``."""
    return (count + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) 8 bits per byte, little-endian bit order; uint8 result."""
    flat = bits.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, packed_length(flat.numel()) * 8 - flat.numel()))
    return (padded.reshape(-1, 8) << _shifts(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` bits of ``packed`` as a flat boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(count):
        raise ValueError(
            f"expected a 1-D uint8 tensor of {packed_length(count)} byte(s) for {count} bit(s), "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def _sign_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The IEEE sign bit of each element (read through a same-width integer view, so float8 works too)."""
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(as_int) < 0


def pack_bitmask(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, bitmask)`` of ``tensor``: its non-zeros in row-major order and their packed positions."""
    flat = tensor.reshape(-1)
    keep = flat != 0
    return flat[keep], pack_bits(keep)


def pack_zero_signs(tensor: torch.Tensor) -> torch.Tensor | None:
    """The packed sign bits of the zeros of ``tensor`` (row-major), or None when it holds no ``-0.0``."""
    flat = tensor.reshape(-1)
    signs = _sign_bits(flat[flat == 0])
    return pack_bits(signs) if bool(signs.any()) else None


def unpack_bitmask(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    zero_signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the dense tensor from ``pack_bitmask`` output (and ``pack_zero_signs``, to restore ``-0.0``)."""
    count = 1
    for size in shape:
        count *= int(size)
    keep = unpack_bits(bitmask, count)
    kept = int(keep.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise ValueError(f"the bitmask marks {kept} non-zero(s) but {values.numel()} value(s) were given")
    out = torch.zeros(count, dtype=dtype, device=values.device)
    out[keep] = values.to(dtype)
    if zero_signs is not None:
        negative = unpack_bits(zero_signs, count - kept)
        out[~keep] = torch.where(negative, -0.0, 0.0).to(dtype)
    return out.reshape(tuple(shape))
