"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024,
arXiv:2306.11695 (reference code ``locuslab/wanda``). Each weight is scored ``|W_qr| * ||X_r||``: its magnitude
times the L2 norm of its input channel over the calibration tokens. Scores are compared within each output row
(unstructured: the ``floor(sparsity * C_in)`` lowest of every row are pruned) or within each block of M
consecutive inputs of a row (N:M: the N highest are kept). Weight values are never changed.

Calibration is layer by layer (``compressx.layerwise``): each decoder layer's input norms are measured on the
outputs of the already-pruned layers before it.

Touches: the ``weight`` of the targeted ``Linear`` modules (and transformers ``Conv1D``, GPT-2's transposed
Linear) inside the decoder layers (default: all of them), in place; irreversible. Fused MoE expert parameters
(Mixtral, Qwen-MoE) are refused (prune them with ``magnitude``). The report is a census of the weights after
pruning; NaN/Inf weights or calibration inputs are refused naming the module.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.layerwise import LinearStats, layerwise_problems, prune_layer_by_layer
from compressx.ops.sparsity import nm_mask, nm_shape_problems, resolve_pattern, sparsity_report, topk_mask
from compressx.registry import PassContext, PassResult, register_pass
from compressx.targets import TransposedLinear, weight_matrix

DECODER_LINEARS = ("re:.*layers\\.\\d+\\..*",)  # for a model that is not a causal LM (one has its decoder layers)
# Linear layers, and transformers' Conv1D (GPT-2) as the Linear it is. Fused MoE experts are refused: calibrating
# them needs each expert's own inputs, which these passes do not collect.
LAYERWISE_TYPES = (nn.Linear, TransposedLinear)


@dataclasses.dataclass(frozen=True)
class WandaConfig(PassConfig):
    """Config of the ``wanda`` pass.

    Attributes:
        sparsity: fraction pruned in every output row, in [0, 1) (default 0.5); fixed at 1 - N/M for N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: at most 2 of every 4 inputs kept).
        batch_size: calibration sequences per forward of a decoder layer (memory vs speed; same result).
        device: where each decoder layer runs during calibration (default: where the model is).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    batch_size: int = 1
    device: str | None = None

    def __post_init__(self) -> None:
        sparsity, _ = resolve_pattern(self.sparsity, self.pattern)
        object.__setattr__(self, "sparsity", sparsity)
        if self.batch_size < 1:
            raise ConfigError(f"got {self.batch_size}; batch_size must be >= 1", path="batch_size")

    @property
    def nm(self) -> tuple[int, int] | None:
        return resolve_pattern(self.sparsity, self.pattern)[1]


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` per weight, from the squared input-channel norms ``sq_norm`` ``[C_in]``."""
    return weight.detach().float().abs() * sq_norm.float().sqrt()[None, :]


def wanda_mask(
    weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Boolean keep-mask: per output row (unstructured) or per N:M block of a row."""
    scores = wanda_scores(weight, sq_norm)
    return nm_mask(scores, *nm) if nm else topk_mask(scores, sparsity, dim=1)


def _check(targets: dict[str, nn.Module], config: WandaConfig) -> list[str]:
    return nm_shape_problems({name: weight_matrix(m) for name, m in targets.items()}, config.nm)


@register_pass(
    "wanda",
    config=WandaConfig,
    kind="weights",
    paper="Wanda: A Simple and Effective Pruning Approach for LLMs (arXiv:2306.11695)",
    families=("llm",),
    target_types=LAYERWISE_TYPES,
    needs=("calibration",),
    default_targets=DECODER_LINEARS,
    check=_check,
    check_model=layerwise_problems,
)
def apply_wanda(model: nn.Module, config: WandaConfig, ctx: PassContext) -> PassResult:
    """Prune the target Linears layer by layer with Wanda scores; report the sparsity reached."""

    def prune(index: int, linears: dict[str, nn.Module], stats: dict[str, LinearStats]) -> None:
        for name, linear in linears.items():
            weight = weight_matrix(linear)
            keep = wanda_mask(weight, stats[name].sq_norm, config.sparsity, config.nm)
            weight.masked_fill_(~keep.to(weight.device), 0.0)

    counts = prune_layer_by_layer(
        model, ctx.calibration, ctx.targets, prune, with_variance=False, batch_size=config.batch_size,
        device=config.device, progress=ctx.progress, checkpoint=ctx.checkpoint,
    )  # fmt: skip
    return PassResult(report=sparsity_report(counts))
