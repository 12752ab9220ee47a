"""SparseGPT: one-shot pruning with an approximate second-order (OBS) weight update.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
arXiv:2301.00774 (reference code ``IST-DASLab/sparsegpt``). For each Linear, from the Hessian of its layer-wise
reconstruction loss ``H = 2 X X^T`` (accumulated over the calibration tokens):

1. dead inputs (``diag(H) = 0``) get ``H_rr = 1`` and a zero weight column; damping ``percdamp * mean(diag H)``
   is added to the diagonal; ``U`` is the upper Cholesky factor of ``H^-1``;
2. columns are processed in blocks of ``blocksize``. The mask is chosen from the score ``W^2 / diag(U)^2`` —
   per block over all rows (``scope: block``, the paper's adaptive mask selection), per row within each block
   (``scope: row``: every row ends with exactly ``floor(sparsity * C_in)`` zeros), or, for N:M, per M columns
   when the sweep reaches them;
3. column by column, pruned entries are zeroed and their error is spread onto the columns not yet processed
   (the OBS update), with lazy batched updates between blocks.

Unlike Wanda, the surviving weights change. Differences from the reference code, on purpose: the per-block
count is ``floor(sparsity * numel)`` (the reference prunes every score at or below that quantile, one more);
per-row scope is an addition.

Touches: the ``weight`` of the targeted ``Linear`` modules (and transformers ``Conv1D``, GPT-2's transposed
Linear) inside the decoder layers, in place; irreversible. Fused MoE expert parameters are refused (prune them with
``magnitude``); NaN/Inf weights or calibration inputs are refused naming the module, before any factorisation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.layerwise import LinearStats, layerwise_problems, prune_layer_by_layer
from compressx.ops.sparsity import nm_shape_problems, pruned_count, resolve_pattern, sparsity_report
from compressx.passes.wanda import DECODER_LINEARS, LAYERWISE_TYPES
from compressx.registry import PassContext, PassResult, register_pass
from compressx.targets import weight_matrix


@dataclasses.dataclass(frozen=True)
class SparsegptConfig(PassConfig):
    """Config of the ``sparsegpt`` pass.

    Attributes:
        sparsity: fraction pruned, in [0, 1) (default 0.5); fixed at 1 - N/M for N:M.
        pattern: ``"unstructured"`` or ``"N:M"``.
        scope: unstructured only: ``"block"`` (one threshold per column block over all rows, as the paper) or
            ``"row"`` (the same count in every row).
        blocksize: columns per block (reference default 128).
        percdamp: dampening, as a fraction of the mean Hessian diagonal (reference default 0.01).
        batch_size: calibration sequences per forward of a decoder layer.
        device: where each decoder layer runs during calibration (default: where the model is).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: Literal["block", "row"] = "block"
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 1
    device: str | None = None

    def __post_init__(self) -> None:
        sparsity, nm = resolve_pattern(self.sparsity, self.pattern)
        object.__setattr__(self, "sparsity", sparsity)
        if nm and self.scope != "block":
            raise ConfigError("scope applies to the unstructured pattern only; leave it out for N:M", path="scope")
        if nm and self.blocksize % nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}", path="blocksize")
        if self.blocksize < 1:
            raise ConfigError(f"got {self.blocksize}; blocksize must be >= 1", path="blocksize")
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"got {self.percdamp}; percdamp must be in [0, 1)", path="percdamp")
        if self.batch_size < 1:
            raise ConfigError(f"got {self.batch_size}; batch_size must be >= 1", path="batch_size")

    @property
    def nm(self) -> tuple[int, int] | None:
        return resolve_pattern(self.sparsity, self.pattern)[1]


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1``; zeroes the weight columns of dead inputs in ``weight``."""
    hessian = hessian.clone().double()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(hessian))
    hessian += damp * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True).float()


def sparsegpt_scores(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's saliency ``W^2 / diag(U)^2`` of the dense weights (used by DSnoT to rank within N:M groups)."""
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)  # a Conv1D view is transposed
    u = inverse_hessian_factor(hessian, w, percdamp)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[rows, cols]`` with SparseGPT; returns ``(new_weight, keep_mask)`` (input not modified)."""
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)  # a Conv1D view is transposed
    rows, cols = w.shape
    u = inverse_hessian_factor(hessian.to(w.device), w, percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    row_counts = _block_prune_counts(cols, blocksize, sparsity) if scope == "row" else None
    for block, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1, u1 = w[:, start:end].clone(), u[start:end, start:end]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            scores = w1.pow(2) / torch.diag(u1).pow(2)[None, :]
            if scope == "row":
                drop = torch.sort(scores, dim=1, stable=True).indices[:, : row_counts[block]]
                mask1.scatter_(1, drop, True)
            else:
                n_drop = pruned_count(sparsity, scores.numel())
                drop = torch.sort(scores.flatten(), stable=True).indices[:n_drop]
                mask1.view(-1)[drop] = True
        for i in range(end - start):
            column = w1[:, i]
            d = u1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = w1[:, i : i + m].pow(2) / torch.diag(u1)[i : i + m].pow(2)[None, :]
                drop = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
                mask1.scatter_(1, i + drop, True)
            q = column.clone()
            q[mask1[:, i]] = 0.0
            q1[:, i] = q
            e = (column - q) / d
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, start:end] = q1
        pruned[:, start:end] = mask1
        w[:, end:] -= err1 @ u[start:end, end:]
    return w.to(weight.dtype), ~pruned


def _check(targets: dict[str, nn.Module], config: SparsegptConfig) -> list[str]:
    return nm_shape_problems({name: weight_matrix(m) for name, m in targets.items()}, config.nm)


@register_pass(
    "sparsegpt",
    config=SparsegptConfig,
    kind="weights",
    paper="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (arXiv:2301.00774)",
    families=("llm",),
    target_types=LAYERWISE_TYPES,
    needs=("calibration",),
    default_targets=DECODER_LINEARS,
    check=_check,
    check_model=layerwise_problems,
)
def apply_sparsegpt(model: nn.Module, config: SparsegptConfig, ctx: PassContext) -> PassResult:
    """Prune and update the target Linears layer by layer with SparseGPT; report the sparsity reached."""

    def prune(index: int, linears: dict[str, nn.Module], stats: dict[str, LinearStats]) -> None:
        for name, linear in linears.items():
            weight = weight_matrix(linear)
            new_weight, _ = sparsegpt_prune(
                weight, stats[name].hessian, config.sparsity, config.nm,
                scope=config.scope, blocksize=config.blocksize, percdamp=config.percdamp,
            )  # fmt: skip
            weight.copy_(new_weight)

    counts = prune_layer_by_layer(
        model, ctx.calibration, ctx.targets, prune, with_hessian=True, with_variance=False,
        batch_size=config.batch_size, device=config.device, progress=ctx.progress, checkpoint=ctx.checkpoint,
    )  # fmt: skip
    return PassResult(report=sparsity_report(counts))
