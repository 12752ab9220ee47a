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


# N:M packing (``sparse_format: nm``): for a weight that is N:M along its input dimension (the convention of
# ``compressx.ops.sparsity``: blocks of M consecutive input weights, channels-last for convs), the N kept values of
# every block and their positions inside the block. ``values`` and ``indices`` are ``[blocks, N]``, blocks in the
# row-major order of the input-last view, positions ascending within a block; indices are uint8 (M <= 256). A block
# with fewer than N non-zeros (a kept weight that is exactly 0) stores zeros at its lowest unused positions, so the
# decode is exact.


def pack_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of an N:M ``weight``; raises ValueError naming the first block with more than N."""
    from compressx.ops.sparsity import to_input_last

    if m > 256:
        raise ValueError(f"M={m} does not fit uint8 in-block indices (M <= 256)")
    blocks_last = to_input_last(weight)
    if blocks_last.shape[-1] % m:
        raise ValueError(f"input dimension {blocks_last.shape[-1]} is not divisible by M={m}")
    blocks = blocks_last.reshape(-1, m)
    nonzero = blocks != 0
    counts = nonzero.sum(dim=1)
    if bool((counts > n).any()):
        first = int(torch.nonzero(counts > n)[0])
        raise ValueError(f"block {first} has {int(counts[first])} non-zeros, more than N={n}: not {n}:{m} sparse")
    # Non-zeros first (stable: ascending positions), then the lowest zero positions to fill up to N.
    order = torch.sort((~nonzero).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    indices = torch.sort(order, dim=1).values
    return torch.gather(blocks, 1, indices), indices.to(torch.uint8)


def check_packed_nm(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...], n: int, m: int) -> None:
    """Validate a packed N:M tensor against the dense ``shape``: sizes, index range, distinct positions per block.

    Raises ValueError saying what is wrong.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    input_dim = shape[1] if len(shape) >= 2 else 0
    if len(shape) < 2 or input_dim % m:
        raise ValueError(f"shape {tuple(shape)} has no input dimension divisible by M={m}")
    blocks = numel // m
    if tuple(values.shape) != (blocks, n) or tuple(indices.shape) != (blocks, n):
        raise ValueError(
            f"expected values and indices of shape ({blocks}, {n}) for {tuple(shape)} at {n}:{m}, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if indices.dtype != torch.uint8:
        raise ValueError(f"indices must be uint8, got {indices.dtype}")
    wide = indices.long()
    if bool((wide >= m).any()):
        raise ValueError(f"an in-block index is >= M={m}")
    if n > 1 and bool((wide[:, 1:] <= wide[:, :-1]).any()):
        raise ValueError("in-block indices must be strictly ascending (distinct positions) in every block")


def unpack_nm(
    values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...] | torch.Size, n: int, m: int
) -> torch.Tensor:
    """The dense weight of ``pack_nm`` output, after ``check_packed_nm``."""
    from compressx.ops.sparsity import from_input_last

    shape = tuple(int(s) for s in shape)
    check_packed_nm(values, indices, shape, n, m)
    blocks = torch.zeros(values.shape[0], m, dtype=values.dtype, device=values.device)
    blocks.scatter_(1, indices.long(), values)
    input_last = (shape[0], *shape[2:], shape[1])
    like = torch.empty(shape, device="meta")
    return from_input_last(blocks.reshape(input_last), like)
