"""Masked weights for N:M sparsity learned in training: SR-STE, shared by the ``sr_ste`` and ``spre`` passes.

* ``sr_ste`` — SR-STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
  ICLR 2021, arXiv:2102.04010): forward keeps the N largest ``|w|`` of every M-block; backward passes the gradient
  straight through to every weight and adds ``decay * w`` on the pruned ones (the sparse-refined term, λ_W).
  Used by the ``sr_ste`` pass and by SpRe's main branch.

Pruned entries are returned as ``+0.0`` (``torch.where``, not ``w * mask``), so exports hold no ``-0.0``.
Blocks follow ``compressx.ops.sparsity``: M consecutive input weights, channels-last for convs.
"""

from __future__ import annotations

import torch

from compressx.ops.sparsity import nm_mask


class _SrSte(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:  # type: ignore[override]
        keep = nm_mask(weight.detach().abs(), n, m)
        ctx.save_for_backward(weight, keep)
        ctx.decay = decay
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weight, keep = ctx.saved_tensors
        refine = torch.where(keep, torch.zeros((), dtype=weight.dtype, device=weight.device), weight)
        return grad + ctx.decay * refine, None, None, None


def sr_ste(weight: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
    """N:M-masked ``weight`` whose backward is SR-STE's: ``∂L/∂w = ∂L/∂ŵ + decay · (1 − mask) ⊙ w``."""
    return _SrSte.apply(weight, n, m, decay)
