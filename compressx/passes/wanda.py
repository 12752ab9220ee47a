"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
arXiv:2306.11695 (reference code ``locuslab/wanda``). Each weight is scored ``|W_qr| * ||X_r||``: its magnitude
times the L2 norm of its input channel over the calibration tokens. Scores are compared within each output row
(unstructured: the ``floor(sparsity * C_in)`` lowest of every row are pruned) or within each block of M
consecutive inputs of a row (N:M: the N highest are kept). Weight values are never changed.

Calibration is layer by layer (``compressx.layerwise``): each decoder layer's input norms are measured on the
outputs of the already-pruned layers before it.

Touches: the ``weight`` of the targeted ``Linear`` modules (and transformers ``Conv1D``, GPT-2's transposed
Linear) inside the decoder layers (default: all of them), in place; irreversible. NaN/Inf weights or calibration
inputs are refused naming the module. The report is a census of the weights after pruning.

Mixture-of-experts (an addition: the paper and reference code cover dense models only): fused experts (Mixtral,
Qwen-MoE: ``experts.gate_up_proj[e]``, ``experts.down_proj[e]``) are pruned per expert, each slice with the norms
of the inputs that expert receives — the tokens the router sends it, and their ``act_fn(gate) * up`` for
``down_proj`` (``compressx.layerwise``). The router is not a Linear and is never changed; a gate Linear beside
the experts (Qwen2-MoE's ``shared_expert_gate``) is left dense (report: ``left_dense``). An expert no calibration
token reached is pruned by magnitude per row (or N:M block) instead (report: ``uncalibrated_experts``).
"""

from __future__ import annotations

import dataclasses

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
from compressx.ops.pruning_scores import wanda_scores
from compressx.ops.sparsity import nm_mask, resolve_pattern, topk_mask
from compressx.registry import PassContext, PassResult, register_pass


@dataclasses.dataclass(frozen=True)
class WandaConfig(PassConfig):
    """Config of the ``wanda`` pass.

    Attributes:
        sparsity: fraction pruned in every output row, in [0, 1) (default 0.5); fixed at 1 - N/M for N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: at most 2 of every 4 inputs kept).
        batch_size: calibration sequences per forward of a decoder layer (memory vs speed; same result).
        device: where each decoder layer runs during calibration (default: where the model is).
        layers: the dotted path of the model's decoder-layer ModuleList (default: found from the model).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    batch_size: int = 1
    device: str | None = None
    layers: str | None = None

    def __post_init__(self) -> None:
        sparsity, _ = resolve_pattern(self.sparsity, self.pattern)
        object.__setattr__(self, "sparsity", sparsity)
        if self.batch_size < 1:
            raise ConfigError(f"got {self.batch_size}; batch_size must be >= 1", path="batch_size")

    @property
    def nm(self) -> tuple[int, int] | None:
        return resolve_pattern(self.sparsity, self.pattern)[1]


def wanda_mask(
    weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Boolean keep-mask: per output row (unstructured) or per N:M block of a row."""
    scores = wanda_scores(weight, sq_norm)
    return nm_mask(scores, *nm) if nm else topk_mask(scores, sparsity, dim=1)


def _prune_layer(layer: CalibratedLayer, config: WandaConfig) -> None:
    """Prune one decoder layer's weight matrices (Linears, expert slices). A function of its own so that nothing it
    made (masks, onloaded weight views) stays alive while the next layer is calibrated."""
    for key, weight in layer.matrices.items():
        keep = wanda_mask(weight, layer.stats[key].sq_norm, config.sparsity, config.nm)
        weight.masked_fill_(~keep.to(weight.device), 0.0)
    prune_uncalibrated(layer, config.sparsity, config.nm)


@register_pass(
    "wanda",
    config=WandaConfig,
    kind="weights",
    paper="Wanda: A Simple and Effective Pruning Approach for LLMs (arXiv:2306.11695)",
    families=("llm",),
    target_types=LAYERWISE_TYPES,
    needs=("calibration",),
    default_targets=DECODER_LINEARS,
    check=layerwise_target_problems,
    check_model=layerwise_problems,
)
def apply_wanda(model: nn.Module, config: WandaConfig, ctx: PassContext) -> PassResult:
    """Prune the target Linears layer by layer with Wanda scores; report the sparsity reached."""
    calibration = calibrate_layers(
        model, ctx.calibration, ctx.targets, with_variance=False, batch_size=config.batch_size,
        device=config.device, progress=ctx.progress, checkpoint=ctx.checkpoint, layers=config.layers,
    )  # fmt: skip
    with torch.no_grad():
        for layer in calibration:
            _prune_layer(layer, config)
    return PassResult(report=calibration.report())
