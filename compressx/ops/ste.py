"""Masked weights for N:M sparsity learned in training: the autograd functions the training passes share.

* ``sr_ste`` — SR-STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
  ICLR 2021, arXiv:2102.04010): forward keeps the N largest ``|w|`` of every M-block; backward passes the gradient
  straight through to every weight and adds ``decay * w`` on the pruned ones (the sparse-refined term, λ_W).
  Used by the ``sr_ste`` pass and by SpRe's main branch.
* ``lbc_masked`` — LBC's forward/backward (see ``compressx.passes.lbc``): the mask is the union of the alive
  candidate combinations of each block; weights get the masked gradient, scores the straight-through gradient
  ``Σ_{j∈c} w_j · ∂L/∂ŵ_j`` of each alive candidate ``c``.

Pruned entries are returned as ``+0.0`` (``torch.where``, not ``w * mask``), so exports hold no ``-0.0``.
Blocks follow ``compressx.ops.sparsity``: M consecutive input weights, channels-last for convs.
"""

from __future__ import annotations

import torch

from compressx.ops.sparsity import from_input_last, nm_mask, to_input_last


def to_blocks(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``[blocks, M]`` view (a copy for convs) of a weight-shaped tensor, blocks along the input dimension."""
    return to_input_last(tensor).reshape(-1, m)


def from_blocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_blocks``: a tensor shaped like the weight ``like``."""
    return from_input_last(blocks.reshape(to_input_last(like).shape), like)


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


def candidate_union(alive: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[blocks, M]`` boolean: the positions covered by at least one alive candidate of each block."""
    return (alive.to(candidates.dtype) @ candidates) > 0


class _LBCMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, keep, alive, candidates):  # type: ignore[override]
        ctx.save_for_backward(weight, keep, alive, candidates)
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, keep, alive, candidates = ctx.saved_tensors
        grad_weight = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        grad_scores = None
        if ctx.needs_input_grad[1]:  # not once the scores are frozen
            # Straight-through to the binarised union: ∂L/∂s_j = w_j · ∂L/∂ŵ_j; s = α·B gives ∂L/∂α = (·) Bᵀ.
            per_position = to_blocks(grad * weight, candidates.shape[1]).to(candidates.dtype)
            grad_scores = (per_position @ candidates.t()) * alive.to(candidates.dtype)
        return grad_weight, grad_scores, None, None, None


def lbc_masked(
    weight: torch.Tensor,
    scores: torch.Tensor,
    alive: torch.Tensor,
    candidates: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight`` masked by the union of alive candidates; gradients to ``weight`` and ``scores`` as in LBC.

    ``scores`` and ``alive`` are ``[blocks, C]``; ``candidates`` is the ``[C, M]`` 0/1 matrix of the N-subsets.
    ``keep``, the weight-shaped union mask ``from_blocks(candidate_union(alive, candidates), weight)``, may be
    passed in by a caller that caches it between changes of ``alive``.
    """
    if keep is None:
        keep = from_blocks(candidate_union(alive, candidates), weight)
    return _LBCMask.apply(weight, scores, keep, alive, candidates)
