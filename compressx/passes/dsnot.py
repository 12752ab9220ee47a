"""DSnoT: training-free refinement of a sparse LLM's mask ("Dynamic Sparse No Training").

Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024,
arXiv:2310.08915 (reference code ``zyxxmu/DSnoT``).

Per Linear, inside the layer-by-layer calibration loop: an initial mask (``init``: Wanda, per-row magnitude, or
SparseGPT) is refined row by row to cancel the *expected* reconstruction error of each output,
``eps_q = sum_r (W_qr - What_qr) * E[x_r]``. Each cycle, in every still-active row, one pruned weight is
regrown — the one whose contribution ``W_qr E[x_r]`` best cancels ``eps_q`` after dividing by the input's
variance to the power ``var_power`` — and one kept weight is pruned — unstructured: among kept weights whose
contribution has the sign opposite to ``eps_q``, the lowest Wanda score; N:M: in the same M-group as the regrown
one, the lowest initial score. A row stops when ``|eps_q|`` falls to ``update_threshold`` or, with the
same-sign rule, when a swap would flip the sign of its initial error; at most ``max_cycles`` cycles. Every
swap keeps the row's pruned count (and its N:M pattern). Surviving weights keep their values; regrown weights
take their dense values.

The refinement is vectorised over rows (one small loop over cycles, none over rows or weights).

Where this follows the paper rather than the reference code (bugs of the reference code):

* ``init: sparsegpt`` runs real SparseGPT (Hessian accumulated, weights updated; per-row counts, so every row
  starts at the target sparsity like the other starts) and DSnoT then refines with the error of the updated
  weights; the reference code never accumulates the Hessian, so its SparseGPT start prunes the first columns
  of every row.
* Candidates are kept in four explicit, ordered lists per row (grow: negative / positive contribution; prune:
  negative / positive contribution); a row stops when the list it needs is exhausted. The reference code's
  shared pointers walk into the wrong region in small layers and can write masks for stopped rows, and its
  reordering breaks when a contribution is exactly zero; here zero contributions are in no list.
* ``update_threshold`` keeps the reference value (0.1) and meaning: the reference compares it with errors in
  "sum over a 2048-token sequence" units. Here errors are per-token means, compared with
  ``update_threshold / 2048``, so the threshold means the same at any calibration sequence length.
* A variance of exactly zero is floored at 1e-12 before the division.

Touches: the ``weight`` of the targeted ``Linear`` modules (and transformers ``Conv1D``, GPT-2's transposed
Linear) inside the decoder layers, in place; irreversible. NaN/Inf weights or calibration inputs are refused naming
the module.

Mixture-of-experts (an addition: the paper and reference code cover dense models only): fused experts (Mixtral,
Qwen-MoE) are pruned and refined per expert slice, each with the statistics (mean, within-sequence variance,
norms, Hessian for ``init: sparsegpt``) of the inputs that expert receives — the tokens the router sends it, and
their ``act_fn(gate) * up`` for ``down_proj`` (``compressx.layerwise``). Experts sit in the MLP, so by default
(``refine_mlp: false``) they get the initial mask only. The router is never changed; a gate Linear beside the
experts (``shared_expert_gate``) is left dense (report: ``left_dense``). An expert no calibration token reached
is pruned by magnitude per row (or N:M block) and not refined (report: ``uncalibrated_experts``); with
``init: previous`` it keeps the earlier step's mask.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.layerwise import (
    DECODER_LINEARS,
    LAYERWISE_TYPES,
    CalibratedLayer,
    LinearStats,
    calibrate_layers,
    is_mlp,
    layerwise_problems,
    layerwise_target_problems,
    moe_gates,
    prune_uncalibrated,
)
from compressx.ops.pruning_scores import sparsegpt_prune, sparsegpt_scores, wanda_scores
from compressx.ops.sparsity import nm_mask, resolve_pattern, topk_mask
from compressx.registry import Need, PassContext, PassResult, register_pass
from compressx.targets import FusedExperts, TransposedLinear, expert_matrices, weight_matrices, weight_tensors

REFERENCE_SEQ_LEN = 2048  # the sequence length the reference threshold is expressed at
_VAR_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class DsnotConfig(PassConfig):
    """Config of the ``dsnot`` pass (defaults: the reference code's).

    Attributes:
        init: initial mask: ``wanda``, ``magnitude`` (per row) or ``sparsegpt`` computed here, or ``previous``:
            the mask an earlier step of the same ``apply`` left (its zeros; its surviving values, e.g. SparseGPT's
            updated ones), refined against the dense weights as they were before that step.
        sparsity: fraction pruned per row, in [0, 1) (default 0.5); fixed at 1 - N/M for N:M.
        pattern: ``"unstructured"`` or ``"N:M"``.
        max_cycles: at most this many grow/prune cycles per row (reference: 50).
        update_threshold: a row stops once ``|expected error|`` is at most this, in the reference's units
            (sum over a 2048-token sequence; reference: 0.1).
        var_power: power of the input variance dividing the growth score; 0 turns the variance term off
            (reference: 1).
        same_sign: stop a row when a swap would flip the sign of its initial error. Default: off for
            unstructured, on for N:M, as the reference code does.
        refine_mlp: also refine the MLP Linears. Reference default: off (``skip_layer=mlp``): MLP Linears get the
            initial mask only.
        blocksize, percdamp: SparseGPT settings for ``init: sparsegpt``.
        batch_size: calibration sequences per forward of a decoder layer.
        device: where each decoder layer runs during calibration (default: where the model is).
        layers: the dotted path of the model's decoder-layer ModuleList (default: found from the model).
    """

    init: Literal["wanda", "magnitude", "sparsegpt", "previous"] = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    same_sign: bool | None = None
    refine_mlp: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 1
    device: str | None = None
    layers: str | None = None

    def __post_init__(self) -> None:
        if self.init == "previous" and self.sparsity is not None:
            raise ConfigError("with init: previous the sparsity is the earlier step's; leave it out", path="sparsity")
        sparsity, nm = resolve_pattern(self.sparsity, self.pattern)
        object.__setattr__(self, "sparsity", sparsity)
        if self.same_sign is None:
            object.__setattr__(self, "same_sign", nm is not None)
        for name in ("max_cycles", "batch_size", "blocksize"):
            value = getattr(self, name)
            if value < (0 if name == "max_cycles" else 1):
                raise ConfigError(f"got {value}; {name} must be >= {0 if name == 'max_cycles' else 1}", path=name)
        if self.update_threshold < 0:
            raise ConfigError(f"got {self.update_threshold}; must be >= 0", path="update_threshold")
        if self.var_power < 0:
            raise ConfigError(f"got {self.var_power}; must be >= 0", path="var_power")
        if nm and self.blocksize % nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}", path="blocksize")

    @property
    def nm(self) -> tuple[int, int] | None:
        return resolve_pattern(self.sparsity, self.pattern)[1]


@dataclasses.dataclass
class Refinement:
    """The outcome of ``dsnot_refine`` for one weight matrix."""

    keep: torch.Tensor  # final boolean keep-mask
    weight: torch.Tensor  # final weight: current values where kept initially, dense values where regrown
    error_before: torch.Tensor  # per-row expected error (per-token mean units) of the initial mask
    error_after: torch.Tensor
    swaps: torch.Tensor  # accepted swaps per row


def _ordered(valid: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: column indices of the ``valid`` entries by ascending ``key`` (invalid ones last), and their count."""
    order = torch.argsort(torch.where(valid, key, torch.full_like(key, float("inf"))), dim=1, stable=True)
    return order, valid.sum(dim=1)


@torch.no_grad()
def dsnot_refine(
    dense: torch.Tensor,
    current: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    sq_norm: torch.Tensor,
    *,
    max_cycles: int = 50,
    threshold: float = 0.1 / REFERENCE_SEQ_LEN,
    var_power: float = 1.0,
    same_sign: bool = False,
    nm: tuple[int, int] | None = None,
    init_score: torch.Tensor | None = None,
) -> Refinement:
    """Refine the keep-mask ``keep`` of a Linear (see the module docstring). Pure: inputs are not modified.

    Args:
        dense: the dense weight ``[rows, cols]``.
        current: the pruned weight of the initial method (``dense * keep``, or SparseGPT's updated weight).
        keep: the initial boolean keep-mask.
        mean, var, sq_norm: per input channel: mean, within-sequence variance, Wanda squared norm.
        threshold: rows stop when ``|error| <= threshold`` (per-token mean units).
        nm: ``(N, M)`` for an N:M mask; pruning then stays within the regrown weight's M-group.
        init_score: N:M only: the initial method's score, lowest pruned first within a group.
    """
    dense, current = dense.float(), current.float()
    rows, cols = dense.shape
    row_ids = torch.arange(rows, device=dense.device)
    inf = torch.tensor(float("inf"), device=dense.device)
    keep = keep.clone()
    grow_contrib = dense * mean[None, :]  # regrowing r removes W_r E[x_r] from the error
    prune_contrib = current * mean[None, :]  # pruning s adds What_s E[x_s] to it
    error = ((dense - current) * mean[None, :]).sum(dim=1)
    error_before = error.clone()
    growth = grow_contrib / var.clamp_min(_VAR_FLOOR).pow(var_power)[None, :]
    pruned = ~keep
    grow_neg, n_grow_neg = _ordered(pruned & (growth < 0), growth)  # most negative first
    grow_pos, n_grow_pos = _ordered(pruned & (growth > 0), -growth)  # most positive first
    if nm is None:
        wanda = current.abs() * sq_norm.sqrt()[None, :]
        prune_neg, n_prune_neg = _ordered(keep & (prune_contrib < 0), wanda)  # least important first
        prune_pos, n_prune_pos = _ordered(keep & (prune_contrib > 0), wanda)
    else:
        m = nm[1]
        group_score = torch.where(keep, init_score.float(), inf).reshape(rows, cols // m, m)
    pointers = torch.zeros(4, rows, dtype=torch.long, device=dense.device)  # grow-, grow+, prune-, prune+
    active = torch.ones(rows, dtype=torch.bool, device=dense.device)
    swaps = torch.zeros(rows, dtype=torch.long, device=dense.device)
    last = cols - 1
    for _ in range(max_cycles):
        positive = error > 0
        grow_idx = torch.where(
            positive, grow_pos[row_ids, pointers[1].clamp(max=last)], grow_neg[row_ids, pointers[0].clamp(max=last)]
        )
        grow_ok = torch.where(positive, pointers[1] < n_grow_pos, pointers[0] < n_grow_neg)
        if nm is None:
            # a positive error needs a kept weight with a negative contribution, and vice versa
            prune_idx = torch.where(
                positive,
                prune_neg[row_ids, pointers[2].clamp(max=last)],
                prune_pos[row_ids, pointers[3].clamp(max=last)],
            )
            prune_ok = torch.where(positive, pointers[2] < n_prune_neg, pointers[3] < n_prune_pos)
        else:
            in_group = group_score[row_ids, grow_idx // m]
            best = in_group.argmin(dim=1)
            prune_idx = (grow_idx // m) * m + best
            prune_ok = torch.isfinite(in_group[row_ids, best])
        new_error = error - grow_contrib[row_ids, grow_idx] + prune_contrib[row_ids, prune_idx]
        active &= (error.abs() > threshold) & grow_ok & prune_ok
        if same_sign:
            active &= torch.sign(new_error) == torch.sign(error_before)
        if not active.any():
            break
        rows_on = row_ids[active]
        keep[rows_on, grow_idx[active]] = True
        keep[rows_on, prune_idx[active]] = False
        error = torch.where(active, new_error, error)
        swaps += active
        pointers[0] += active & ~positive
        pointers[1] += active & positive
        if nm is None:
            pointers[2] += active & positive
            pointers[3] += active & ~positive
        else:
            group_score.view(rows, cols)[rows_on, prune_idx[active]] = inf
    weight = torch.where(keep, torch.where(pruned, dense, current), torch.zeros_like(dense))
    return Refinement(keep, weight, error_before, error, swaps)


def initial_mask(
    weight: torch.Tensor, stats: LinearStats, config: DsnotConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The initial method's ``(current weight, keep-mask, score)`` for one Linear (``weight`` is dense).

    The score ranks pruning candidates within N:M groups only; for unstructured patterns it is None (the
    SparseGPT score would cost a second factorisation of the Hessian for nothing).
    """
    dense = weight.detach().float()
    if config.init == "sparsegpt":
        # per-row scope: DSnoT works per row, and its matched baseline needs the same grouping
        current, keep = sparsegpt_prune(
            dense, stats.hessian, config.sparsity, config.nm, scope="row" if config.nm is None else "block",
            blocksize=config.blocksize, percdamp=config.percdamp,
        )  # fmt: skip
        score = sparsegpt_scores(dense, stats.hessian, config.percdamp) if config.nm else None
        return current, keep, score
    score = wanda_scores(dense, stats.sq_norm) if config.init == "wanda" else dense.abs()
    keep = nm_mask(score, *config.nm) if config.nm else topk_mask(score, config.sparsity, dim=1)
    return dense * keep, keep, score


def original_matrices(layer: CalibratedLayer, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense ``[out, in]`` weight matrices of ``layer`` (keyed like ``layer.matrices``) from ``originals``
    (``ctx.original_weights``: full name -> the weight as its module holds it, 3-D for fused experts)."""
    dense = {}
    for name, module in layer.linears.items():
        stored = {key: originals[layer.prefix + key] for key in weight_tensors(name, module)}
        if isinstance(module, FusedExperts):
            dense.update(expert_matrices(stored, bool(getattr(module, "is_transposed", False))))
        else:
            dense[name] = stored[name].t() if isinstance(module, TransposedLinear) else stored[name]
    return dense


def _prune_and_refine(model: nn.Module, layer: CalibratedLayer, config: DsnotConfig, ctx: PassContext) -> None:
    """Prune one decoder layer's weight matrices (Linears, expert slices) with the initial method and refine their
    masks; sets ``layer.info``. A function of its own so that its weight-sized temporaries are freed before the next
    layer is calibrated."""
    threshold = config.update_threshold / REFERENCE_SEQ_LEN
    layer.info = {}  # this layer's part of the report: kept in the layer checkpoint
    originals = original_matrices(layer, ctx.original_weights) if config.init == "previous" else {}
    for name, weight in layer.matrices.items():  # [out, in] views (of a Conv1D's [in, out] weight, of an expert)
        s = layer.stats[name]
        if config.init == "previous":
            current = weight.detach().float()
            dense = originals[name].to(current)
            keep, score = current != 0, wanda_scores(current, s.sq_norm)
        else:
            dense = weight
            current, keep, score = initial_mask(weight, s, config)
        if is_mlp(model, name) and not config.refine_mlp:
            weight.copy_(current.to(weight.dtype))
            continue
        result = dsnot_refine(
            dense, current, keep, s.mean, s.var, s.sq_norm, max_cycles=config.max_cycles,
            threshold=threshold, var_power=config.var_power, same_sign=config.same_sign, nm=config.nm,
            init_score=score,
        )  # fmt: skip
        weight.copy_(result.weight.to(weight.dtype))
        layer.info[f"layers.{layer.index}.{name}"] = {
            "mean_abs_error_before": result.error_before.abs().mean().item(),
            "mean_abs_error_after": result.error_after.abs().mean().item(),
            "mean_swaps_per_row": result.swaps.float().mean().item(),
        }
    if config.init != "previous":  # with ``previous`` an expert without tokens keeps the earlier step's mask
        prune_uncalibrated(layer, config.sparsity, config.nm)


@register_pass(
    "dsnot",
    config=DsnotConfig,
    kind="weights",
    paper="DSnoT: Dynamic Sparse No Training (arXiv:2310.08915)",
    families=("llm",),
    target_types=LAYERWISE_TYPES,
    needs=("calibration", Need("original_weights", when=lambda config: config.init == "previous")),
    default_targets=DECODER_LINEARS,
    check=layerwise_target_problems,
    check_model=layerwise_problems,
)
def apply_dsnot(model: nn.Module, config: DsnotConfig, ctx: PassContext) -> PassResult:
    """Prune with the initial method and refine each mask with DSnoT, layer by layer."""
    if config.init == "previous":  # check every mask before any layer is refined
        gates = moe_gates(model, ctx.targets)  # left dense by every layer-wise pass
        matrices = {
            key: w
            for name, m in ctx.targets.items()
            if name not in gates
            for key, w in weight_matrices(name, m).items()
        }
        for name, weight in matrices.items():
            keep = weight != 0
            if bool(keep.all()):
                raise ConfigError(f"init: previous, but '{name}' has no zeros: run a pruning step before dsnot")
            if config.nm and not bool((keep.reshape(-1, config.nm[1]).sum(dim=1) == config.nm[0]).all()):
                raise ConfigError(f"init: previous, but the mask of '{name}' is not {config.pattern}", "pattern")

    calibration = calibrate_layers(
        model, ctx.calibration, ctx.targets, with_hessian=config.init == "sparsegpt", batch_size=config.batch_size,
        device=config.device, progress=ctx.progress, checkpoint=ctx.checkpoint, layers=config.layers,
    )  # fmt: skip
    with torch.no_grad():
        for layer in calibration:
            _prune_and_refine(model, layer, config, ctx)
    refined = {key: value for info in calibration.infos.values() for key, value in info.items()}
    report = calibration.report()
    before = sum(r["mean_abs_error_before"] for r in refined.values())
    after = sum(r["mean_abs_error_after"] for r in refined.values())
    report.update(
        refined_modules=len(refined),
        expected_error_reduction=round(1 - after / before, 6) if before else 0.0,
        refinement=refined,
    )
    return PassResult(report=report)
