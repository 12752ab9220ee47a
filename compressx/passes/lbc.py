"""LBC: N:M sparsity learned in training by scoring the candidate combinations of every block.

Zhang et al., "Learning Best Combination for Efficient N:M Sparsity", NeurIPS 2022, arXiv:2206.06662; behaviour
from the paper and the official code (zyxxmu/LBC).

Idea: choosing N of every M weights is choosing one of the C(M, N) candidate subsets of the block. Every block
gets one learnable score per candidate (initialised to ``1 / C(M-1, N-1)``, so every position starts covered:
a dense start). The forward mask keeps the union of the candidates still alive; the scores receive the
straight-through gradient ``∂L/∂α_c = Σ_{j∈c} w_j · ∂L/∂ŵ_j`` (a first-order estimate of the candidate's worth),
trained with the weights by the ordinary loss. At the start of each epoch of ``[start_epoch, end_epoch]`` the
lowest-scored alive candidates of every block are removed so that ``1 + ceil((C-1)(1-t)^power)`` remain
(``t`` the fraction of the window elapsed): cubic by default. When one candidate is left, the scores freeze
(``requires_grad = False``) and training goes on with the mask fixed.

Touches: the ``weight`` of the selected ``Linear`` / ``Conv2d`` layers, through a ``torch.nn.utils.parametrize``
parametrization holding ``scores`` (trainable, ``[blocks, C]``), ``alive`` and the candidate matrix (buffers).
The stem conv and the classifier stay dense by default, as in the official ResNet code. ``finalize()`` writes
``w ⊙ mask`` into the plain weight and removes every extra tensor.

Deviations from the official code, following the paper:

* The schedule's fraction is clamped to [0, 1]: the official formula gives a negative removal count before
  ``start_epoch`` (a crash) and, with an even power, re-grows after ``end_epoch``.
* Removed candidates are tracked in a boolean ``alive`` buffer instead of exact zeros in the scores, so SGD
  momentum or weight decay cannot revive one and no score is pinned to a sentinel value. The forward still sees
  exactly the alive candidates, as in the official code.
* Removal runs once at each epoch start. The official code re-applies it before every iteration, which with a
  removal count fixed within the epoch only re-zeroes what momentum revived; ``alive`` makes that unnecessary.
* ``finalize()`` before the schedule ends keeps the highest-scored alive candidate of every block (logged).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math

import torch
import torch.nn as nn

from compressx.errors import ConfigError
from compressx.ops.sparsity import from_input_last, to_input_last
from compressx.registry import PassContext, PassResult, register_pass
from compressx.training import (
    NM_TRAINABLE_TYPES,
    InTrainingModule,
    NMTrainingConfig,
    TrainingHandle,
    check_nm_layers,
    nm_final_report,
    parametrize_weights,
    select_nm_layers,
    unparametrize,
)

log = logging.getLogger(__name__)


# LBC's masked weight (moved from compressx.ops.ste: only this pass uses it). The mask is the union of the alive
# candidate combinations of each block; weights get the masked gradient, scores the straight-through gradient
# ``Σ_{j∈c} w_j · ∂L/∂ŵ_j`` of each alive candidate ``c``. Pruned entries are ``+0.0`` (``torch.where``).


def to_blocks(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``[blocks, M]`` view (a copy for convs) of a weight-shaped tensor, blocks along the input dimension."""
    return to_input_last(tensor).reshape(-1, m)


def from_blocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_blocks``: a tensor shaped like the weight ``like``."""
    return from_input_last(blocks.reshape(to_input_last(like).shape), like)


def candidate_union(alive: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[blocks, M]`` boolean: the positions covered by at least one alive candidate of each block."""
    return (alive.to(candidates.dtype) @ candidates) > 0


class _LbcMask(torch.autograd.Function):
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
    return _LbcMask.apply(weight, scores, keep, alive, candidates)


@dataclasses.dataclass(frozen=True)
class LbcConfig(NMTrainingConfig):
    """Config of the ``lbc`` pass (and the fields of ``NMTrainingConfig``: pattern, skip_stem, ...).

    Attributes:
        start_epoch: first epoch of the removal window (``t_i``; official default 0).
        end_epoch: epoch at which one candidate per block is left (``t_f``; 60 in the official ResNet README, of
            120 epochs in all).
        power: exponent of the removal schedule (3 in the official ResNet code; the DeiT script uses 4).
    """

    start_epoch: int = 0
    end_epoch: int = 60
    power: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_epoch < 0:
            raise ConfigError(f"got {self.start_epoch}; must be >= 0", path="start_epoch")
        if self.end_epoch <= self.start_epoch:
            raise ConfigError(f"got {self.end_epoch}; must be > start_epoch ({self.start_epoch})", path="end_epoch")
        if self.power <= 0:
            raise ConfigError(f"got {self.power}; must be > 0", path="power")
        n, m = self.nm
        if math.comb(m, n) > 4096:
            raise ConfigError(
                f"{self.pattern} has C({m},{n}) = {math.comb(m, n)} candidates per block: scores would take "
                f"{math.comb(m, n) / m:.0f}x the weights' memory; LBC is practical up to a few hundred",
                path="pattern",
            )


def candidate_matrix(n: int, m: int) -> torch.Tensor:
    """``[C(M,N), M]`` 0/1 matrix: row c marks the c-th N-subset of ``range(M)``, in lexicographic order."""
    rows = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(rows), m)
    for c, subset in enumerate(rows):
        out[c, list(subset)] = 1.0
    return out


def candidates_kept(epoch: int, count: int, start: int, end: int, power: float) -> int:
    """How many of ``count`` candidates per block the schedule keeps at ``epoch`` (clamped outside the window)."""
    fraction = min(max((epoch - start) / (end - start), 0.0), 1.0)
    return 1 + math.ceil((count - 1) * (1.0 - fraction) ** power - 1e-9)


def remove_lowest(scores: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """New ``alive``: the ``keep`` highest-scored alive candidates of every block (removed ones never return).

    Ties keep the lower index (a stable sort), so the result is deterministic.
    """
    ranked = scores.detach().float().masked_fill(~alive, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.zeros_like(alive).scatter_(1, order, True) & alive


class LbcMask(InTrainingModule):
    """The parametrization of one layer's weight: ``weight ↦ weight ⊙ (union of alive candidates)``."""

    def __init__(self, weight: torch.Tensor, n: int, m: int) -> None:
        super().__init__()
        # Scores in float32 at least (half-precision models keep float32 scores), float64 for float64 models.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        candidates = candidate_matrix(n, m).to(weight.device, dtype)
        blocks = weight.numel() // m
        count = candidates.shape[0]
        self.register_buffer("candidates", candidates)
        self.register_buffer("alive", torch.ones(blocks, count, dtype=torch.bool, device=weight.device))
        init = 1.0 / math.comb(m - 1, n - 1)
        self.scores = nn.Parameter(torch.full((blocks, count), init, dtype=dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return lbc_masked(weight, self.scores, self.alive, self.candidates, self.keep_mask(weight))

    def keep_mask(self, like: torch.Tensor) -> torch.Tensor:
        """The union mask of the alive candidates, recomputed only when ``alive`` changed (its version counter)."""
        key = (self.alive._version, id(self.alive), like.shape)
        if getattr(self, "_keep_key", None) != key:
            self._keep = from_blocks(candidate_union(self.alive, self.candidates), like)
            self._keep_key = key
        return self._keep


def _masks(layers: dict[str, nn.Module]) -> dict[str, LbcMask]:
    return {name: module.parametrizations.weight[0] for name, module in layers.items()}


@register_pass(
    "lbc",
    config=LbcConfig,
    kind="training",
    paper="Learning Best Combination for Efficient N:M Sparsity (Zhang et al., NeurIPS 2022, arXiv:2206.06662)",
    families=("cnn", "vit", "any"),
    target_types=NM_TRAINABLE_TYPES,
    check=check_nm_layers,
)
def apply_lbc(model: nn.Module, config: LbcConfig, ctx: PassContext) -> PassResult:
    """Add candidate scores to every selected layer; return the handle that runs the removal schedule."""
    n, m = config.nm
    layers, skipped = select_nm_layers(model, ctx.targets, config)
    parametrize_weights(layers, lambda module: LbcMask(module.weight.detach(), n, m))
    count = math.comb(m, n)

    def on_epoch(epoch: int) -> dict | None:
        keep = candidates_kept(epoch, count, config.start_epoch, config.end_epoch, config.power)
        changed = False
        for mask in _masks(layers).values():
            if int(mask.alive.sum(dim=1).max()) > keep:
                mask.alive.copy_(remove_lowest(mask.scores, mask.alive, keep))
                changed = True
            if keep == 1 and mask.scores.requires_grad:
                mask.scores.requires_grad_(False)  # one candidate left: the mask is fixed, weights train on
        return {"candidates_kept": keep, "scores_frozen": keep == 1} if changed else None

    def finalize() -> dict:
        unfinished = 0
        for mask in _masks(layers).values():
            unfinished += int((mask.alive.sum(dim=1) > 1).sum())
            mask.alive.copy_(remove_lowest(mask.scores, mask.alive, 1))  # the best candidate, if more are alive
        unparametrize(layers, keep_projection=True)  # writes w ⊙ mask into the plain weight
        if unfinished:
            log.warning("lbc: finalized before end_epoch; %d block(s) kept their best-scored candidate", unfinished)
        return {**nm_final_report(layers, config.pattern), "unfinished_blocks": unfinished}

    remove = functools.partial(unparametrize, layers, keep_projection=False)
    handle = TrainingHandle(model, "lbc", on_epoch, finalize, remove)
    report = {
        "pattern": config.pattern,
        "candidates_per_block": count,
        "score_parameters": sum(mask.scores.numel() for mask in _masks(layers).values()),
        "modules": len(layers),
        "dense_modules": skipped,
    }
    return PassResult(report=report, handle=handle)
