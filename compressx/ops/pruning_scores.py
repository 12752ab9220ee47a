"""Pruning from calibration statistics, shared by the layer-by-layer passes (wanda, sparsegpt, dsnot).

* Wanda (Sun et al., arXiv:2306.11695, section 3): the score ``|W_qr| * ||X_r||`` of each weight.
* SparseGPT (Frantar, Alistarh, arXiv:2301.00774, Algorithm 1; reference code ``IST-DASLab/sparsegpt``): the
  upper Cholesky factor ``U`` of the damped inverse Hessian, the saliency ``W^2 / diag(U)^2``, and the column sweep
  that prunes and spreads each pruned weight's error onto the columns not yet processed (the OBS update). What
  each pass does with them: ``compressx.passes.sparsegpt`` (its module docstring lists the differences from the
  reference code) and ``compressx.passes.dsnot``.
"""

from __future__ import annotations

import logging

import torch

from compressx.errors import CompressxError
from compressx.ops.sparsity import lowest_mask, pruned_count

log = logging.getLogger(__name__)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` per weight, from the squared input-channel norms ``sq_norm`` ``[C_in]``."""
    return weight.detach().float().abs() * sq_norm.float().sqrt()[None, :]


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor ``U`` of the damped ``H^-1``, and the dead inputs (``diag H = 0``,
    set to ``H_rr = 1``), whose weight columns the caller zeroes.

    Computed in float32, as the reference code does. Where float32 rounding leaves the damped Hessian (or its
    inverse) not positive definite — the reference code stops there with an error — the factorisation is redone
    in float64 and that is logged.
    """
    hessian = hessian.detach().float().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(percdamp * torch.mean(torch.diag(hessian)))
    upper = _upper_inverse_factor(hessian)
    if upper is None:
        log.warning(
            "SparseGPT: the damped %d x %d Hessian is not positive definite in float32; factorised in float64 "
            "(a larger percdamp avoids this)", *hessian.shape,
        )  # fmt: skip
        upper = _upper_inverse_factor(hessian.double())
        if upper is None:
            raise CompressxError(
                f"SparseGPT: the damped {hessian.shape[0]} x {hessian.shape[0]} Hessian is not positive definite "
                f"even in float64 (percdamp {percdamp}); raise percdamp"
            )
    return upper.float(), dead


def _upper_inverse_factor(hessian: torch.Tensor) -> torch.Tensor | None:
    """``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, or None where a factorisation fails."""
    lower, info = torch.linalg.cholesky_ex(hessian)  # finite inputs (checked by the caller) give finite factors
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if info.item() == 0 else None


def sparsegpt_scores(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's saliency ``W^2 / diag(U)^2`` of the dense weights (used by DSnoT to rank within N:M groups)."""
    u, dead = inverse_hessian_factor(hessian, percdamp)
    w = weight.detach().float().masked_fill(dead[None, :], 0.0)
    return w.pow(2) / torch.diag(u).pow(2)[None, :]


def _block_prune_counts(columns: int, blocksize: int, sparsity: float) -> list[int]:
    """Per-row pruned count of each column block so that the totals add up to ``floor(sparsity * columns)``."""
    ends = list(range(blocksize, columns, blocksize)) + [columns]
    cumulative = [pruned_count(sparsity, end) for end in ends]
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]])]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    scope: str = "block",
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[rows, cols]`` with SparseGPT; returns ``(new_weight, keep_mask)`` (input not modified).

    ``factor``: ``inverse_hessian_factor(hessian, percdamp)`` when the caller already has it (Linears fed the
    same inputs share their Hessian, so one factorisation serves them all).
    """
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)  # a Conv1D view is transposed
    rows, cols = w.shape
    u, dead = factor if factor is not None else inverse_hessian_factor(hessian.to(w.device), percdamp)
    w[:, dead] = 0.0
    pruned = torch.zeros_like(w, dtype=torch.bool)
    row_counts = _block_prune_counts(cols, blocksize, sparsity) if scope == "row" else None
    for block, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1, d1 = w[:, start:end].clone(), torch.diag(u)[start:end]
        # the block's rows of U divided by their diagonal: the error of pruning w[:, i] is w[:, i] / U_ii, spread
        # over the later columns by U[i, i+1:]; with 1/U_ii folded in, it is the pruned value times this row
        spread = u[start:end, start:] / d1[:, None]
        if nm is None:
            scores = w1.pow(2) / d1.pow(2)[None, :]
            if scope == "row":
                mask1 = lowest_mask(scores, row_counts[block])
            else:
                count = pruned_count(sparsity, scores.numel())
                mask1 = lowest_mask(scores.reshape(1, -1), count).reshape(scores.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                mask1[:, i : i + m] = lowest_mask(w1[:, i : i + m].pow(2) / d1[i : i + m].pow(2)[None, :], m - n)
            # column i is final from here on (only later columns are updated): the OBS update, in place
            w1[:, i + 1 :].addr_(w1[:, i] * mask1[:, i], spread[i, i + 1 : end - start], alpha=-1.0)
        w[:, start:end] = w1.masked_fill(mask1, 0.0)
        pruned[:, start:end] = mask1
        w[:, end:] -= (w1 * mask1) @ spread[:, end - start :]
    return w.to(weight.dtype), ~pruned
