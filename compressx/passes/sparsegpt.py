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

Unlike Wanda, the surviving weights change. The inverse-Hessian factor is computed in float32, as in the reference
code; Linears fed the same inputs (q/k/v, gate/up) share one factorisation. Differences from the reference code,
on purpose: the per-block count is ``floor(sparsity * numel)`` (the reference prunes every score at or below that
quantile, one more); per-row scope is an addition; a Hessian that float32 rounding leaves not positive definite
is factorised in float64 (logged) where the reference code stops with an error.

Touches: the ``weight`` of the targeted ``Linear`` modules (and transformers ``Conv1D``, GPT-2's transposed
Linear) inside the decoder layers, in place; irreversible. NaN/Inf weights or calibration inputs are refused naming
the module, before any factorisation.

Mixture-of-experts (an addition: the paper and reference code cover dense models only): fused experts (Mixtral,
Qwen-MoE) are pruned per expert slice, each with the Hessian of the inputs that expert receives — the tokens the
router sends it, and their ``act_fn(gate) * up`` for ``down_proj`` (``compressx.layerwise``). The router is never
changed; a gate Linear beside the experts (``shared_expert_gate``) is left dense (report: ``left_dense``). An
expert no calibration token reached has a zero Hessian — the dead-input rule would zero all of it — so it is
pruned by magnitude per row (or N:M block) instead, without update (report: ``uncalibrated_experts``).
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
    calibrate_layers,
    layerwise_problems,
    layerwise_target_problems,
    prune_uncalibrated,
)
from compressx.ops.pruning_scores import inverse_hessian_factor, sparsegpt_prune
from compressx.ops.sparsity import resolve_pattern
from compressx.registry import PassContext, PassResult, register_pass


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
        layers: the dotted path of the model's decoder-layer ModuleList (default: found from the model).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: Literal["block", "row"] = "block"
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 1
    device: str | None = None
    layers: str | None = None

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


def _prune_layer(layer: CalibratedLayer, config: SparsegptConfig) -> None:
    """Prune and update one decoder layer's weight matrices (Linears, expert slices). A function of its own so that
    nothing it made (updated weights, onloaded weight views) stays alive while the next layer is calibrated."""
    # Linears fed the same inputs (q/k/v, gate/up) come one after the other and have equal Hessians: one
    # factorisation serves the run; only the latest is kept (an MoE layer has two distinct ones per expert)
    last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
    for key, weight in layer.matrices.items():
        hessian = layer.stats[key].hessian.to(weight.device)
        if last is None or not torch.equal(last[0], hessian):
            last = (hessian, inverse_hessian_factor(hessian, config.percdamp))
        factor = last[1]
        new_weight, _ = sparsegpt_prune(
            weight, hessian, config.sparsity, config.nm,
            scope=config.scope, blocksize=config.blocksize, percdamp=config.percdamp, factor=factor,
        )  # fmt: skip
        weight.copy_(new_weight)
    prune_uncalibrated(layer, config.sparsity, config.nm)


@register_pass(
    "sparsegpt",
    config=SparsegptConfig,
    kind="weights",
    paper="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (arXiv:2301.00774)",
    families=("llm",),
    target_types=LAYERWISE_TYPES,
    needs=("calibration",),
    default_targets=DECODER_LINEARS,
    check=layerwise_target_problems,
    check_model=layerwise_problems,
)
def apply_sparsegpt(model: nn.Module, config: SparsegptConfig, ctx: PassContext) -> PassResult:
    """Prune and update the target Linears layer by layer with SparseGPT; report the sparsity reached."""
    calibration = calibrate_layers(
        model, ctx.calibration, ctx.targets, with_hessian=True, with_variance=False, batch_size=config.batch_size,
        device=config.device, progress=ctx.progress, checkpoint=ctx.checkpoint, layers=config.layers,
    )  # fmt: skip
    with torch.no_grad():
        for layer in calibration:
            _prune_layer(layer, config)
    return PassResult(report=calibration.report())
