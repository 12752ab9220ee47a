"""Sparsity masks shared by the pruning passes: unstructured magnitude masks and N:M masks.

N:M convention (used by every compressx pass): a mask is N:M when, in every block of M consecutive weights along
the *input* dimension, at most N are kept (so ``2:4`` keeps half). For a Linear weight ``[out, in]`` the blocks
are M consecutive input features of a row. For a Conv weight ``[out, in, *kernel]`` the weight is viewed as
``[out, *kernel, in]`` (channels-last, "OHWI") and the blocks are M consecutive input channels at a fixed output
channel and kernel position — the layout of the LBC and SpRe reference code and of sparse tensor cores.
"""

from __future__ import annotations

import math

import torch


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``. Raises ValueError unless ``0 < N < M``."""
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def to_input_last(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear ``[O, I]`` or Conv ``[O, I, *k]`` weight with the input dimension last (``[O, *k, I]``)."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1)


def from_input_last(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_input_last`` for a tensor shaped like ``to_input_last(like)``."""
    # clone, not contiguous(): with 1x1 kernels the moved view counts as contiguous but keeps channels-last
    # strides, which would make masked weights (and convs on them) channels-last.
    return tensor if like.dim() == 2 else tensor.movedim(-1, 1).clone(memory_format=torch.contiguous_format)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask with the N highest ``scores`` of every M-block along the input dimension.

    ``scores`` has the weight's shape (Linear or Conv). The input dimension must be divisible by M.
    Ties are broken towards the lower index, so the mask is deterministic.
    """
    blocks_last = to_input_last(scores)
    if blocks_last.shape[-1] % m:
        raise ValueError(f"input dimension {blocks_last.shape[-1]} is not divisible by M={m}")
    blocks = blocks_last.reshape(-1, m)
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, order, True)
    return from_input_last(keep.reshape(blocks_last.shape), scores)


def pruned_count(sparsity: float, count: int) -> int:
    """How many of ``count`` weights a ``sparsity`` fraction prunes: floor, as Wanda, SparseGPT and DSnoT do.

    (The small epsilon keeps 0.29 * 100 at 29 despite floating-point error.)
    """
    return math.floor(sparsity * count + 1e-6)


def resolve_pattern(sparsity: float | None, pattern: str) -> tuple[float, tuple[int, int] | None]:
    """Check a pass's ``sparsity`` / ``pattern`` pair; return the sparsity and ``(N, M)`` (None if unstructured).

    Unstructured needs 0 <= sparsity < 1 (default 0.5). An N:M pattern fixes the sparsity at 1 - N/M; a given
    sparsity must equal it. Raises ``ConfigError`` naming the field.
    """
    from compressx.errors import ConfigError

    if pattern == "unstructured":
        sparsity = 0.5 if sparsity is None else sparsity
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"got {sparsity}; sparsity must be in [0, 1)", path="sparsity")
        return sparsity, None
    try:
        n, m = parse_nm(pattern)
    except ValueError as err:
        raise ConfigError(f"{err}; allowed: 'unstructured' or 'N:M' with 0 < N < M", path="pattern") from err
    implied = 1.0 - n / m
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ConfigError(
            f"pattern {pattern} fixes sparsity at {implied:g}, got {sparsity}; leave sparsity out", path="sparsity"
        )
    return implied, (n, m)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest entries of each row of ``scores`` ``[rows, n]``; ties take the lower
    index first — the first ``count`` of a stable ascending sort, found by selection (``kthvalue``), not sorting."""
    if count <= 0 or count >= scores.shape[1]:
        return torch.full_like(scores, count > 0, dtype=torch.bool)
    threshold = None if scores.shape[1] <= 16 else torch.kthvalue(scores, count, dim=1, keepdim=True).values
    # short rows (N:M groups) sort faster than they select; NaN sorts last, which the comparisons below would not do
    if threshold is None or torch.isnan(threshold).any():
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    below = scores < threshold
    ties = scores == threshold
    return below | (ties & (ties.cumsum(dim=1) <= count - below.sum(dim=1, keepdim=True)))


def topk_mask(scores: torch.Tensor, sparsity: float, dim: int | None = None) -> torch.Tensor:
    """Boolean keep-mask that drops the ``pruned_count(sparsity, count)`` lowest scores.

    With ``dim=None`` the count is over the whole tensor (per-layer); with ``dim=1`` it is per output row
    (each row of a Linear weight, each output channel of a Conv weight). Ties drop the lower index first.
    """
    flat = scores.reshape(1, -1) if dim is None else scores.reshape(scores.shape[0], -1)
    return ~lowest_mask(flat, pruned_count(sparsity, flat.shape[1])).reshape(scores.shape)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every M-block along the input dimension has at most N non-zeros."""
    blocks_last = to_input_last(weight)
    if blocks_last.shape[-1] % m:
        return False
    return bool(((blocks_last.reshape(-1, m) != 0).sum(dim=1) <= n).all())


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((tensor == 0).sum()) / tensor.numel()


def zero_counts(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``name -> (exact zeros, numel)`` of each weight."""
    return {name: (int((w == 0).sum()), w.numel()) for name, w in weights.items()}


def sparsity_report(counts: dict[str, tuple[int, int]]) -> dict:
    """The report pruning passes return, from ``zero_counts``: overall and per-module sparsity."""
    zeros = sum(z for z, _ in counts.values())
    total = sum(n for _, n in counts.values())
    return {
        "sparsity": round(zeros / total, 6) if total else 0.0,
        "pruned_weights": zeros,
        "target_weights": total,
        "modules": len(counts),
        "per_module": {name: round(z / n, 6) for name, (z, n) in counts.items()},
    }


def nm_shape_problems(weights: dict[str, torch.Tensor], nm: tuple[int, int] | None) -> list[str]:
    """One message per weight whose input dimension an N:M pattern cannot divide (none when unstructured)."""
    if nm is None:
        return []
    m = nm[1]
    return [
        f"module '{name}' has input dimension {to_input_last(w).shape[-1]}, not divisible by M={m}; add it to ignore"
        for name, w in weights.items()
        if to_input_last(w).shape[-1] % m
    ]


def check_finite(weights: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Raise ``CompressxError`` naming every tensor that holds NaN or Inf: scores and masks built on them are
    meaningless (and SparseGPT's Cholesky factorisation fails), so a pass refuses them instead of going on."""
    from compressx.errors import CompressxError

    bad = [name for name, w in weights.items() if w.device.type != "meta" and not bool(torch.isfinite(w).all())]
    if bad:
        listed = ", ".join(f"'{n}'" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CompressxError(f"the {what} of {listed} hold NaN or Inf values; fix the model (or ignore these) first")
