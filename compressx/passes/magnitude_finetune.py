"""Magnitude N:M followed by fine-tuning (baseline): prune one-shot by ``|w|`` at an epoch, then train with the
mask fixed.

The classic N:M recipe (Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378: NVIDIA's
ASP) and the baseline of the LBC and SpRe papers. With ``prune_epoch: 0`` on a trained model it is "prune, then
fine-tune"; from scratch with ``prune_epoch: E/2`` it is the LBC paper's baseline (dense for half the epochs, N:M for
the rest), so every method gets the same epochs and optimiser.

Touches: the ``weight`` of the selected ``Linear`` / ``Conv2d`` layers, through a ``torch.nn.utils.parametrize``
parametrization holding the mask (a buffer; all ones until ``prune_epoch``). After pruning, pruned weights get no
gradient. The stem and the classifier stay dense by default. ``finalize()`` writes ``w ⊙ mask`` into the plain
weight (pruning then if ``prune_epoch`` was never reached).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn as nn

from compressx.errors import ConfigError
from compressx.ops.sparsity import nm_mask
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


@dataclasses.dataclass(frozen=True)
class MagnitudeFinetuneConfig(NMTrainingConfig):
    """Config of the ``magnitude_finetune`` pass (and the fields of ``NMTrainingConfig``: pattern, ...).

    Attributes:
        prune_epoch: the epoch at whose start the weights are pruned to N:M by magnitude (0: at once).
    """

    prune_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_epoch < 0:
            raise ConfigError(f"got {self.prune_epoch}; must be >= 0", path="prune_epoch")


class FixedMask(InTrainingModule):
    """The parametrization of one layer's weight: ``weight ↦ weight ⊙ mask`` with a fixed boolean mask."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    def prune(self, weight: torch.Tensor, n: int, m: int) -> None:
        self.mask.copy_(nm_mask(weight.detach().abs(), n, m))
        self.pruned.fill_(True)


@register_pass(
    "magnitude_finetune",
    config=MagnitudeFinetuneConfig,
    kind="training",
    paper="baseline: magnitude N:M + fine-tuning (Mishra et al. 2021, arXiv:2104.08378)",
    families=("cnn", "vit", "any"),
    target_types=NM_TRAINABLE_TYPES,
    check=check_nm_layers,
)
def apply_magnitude_finetune(model: nn.Module, config: MagnitudeFinetuneConfig, ctx: PassContext) -> PassResult:
    """Attach a mask to every selected layer; the handle prunes it by magnitude at ``prune_epoch``."""
    n, m = config.nm
    layers, skipped = select_nm_layers(model, ctx.targets, config)
    parametrize_weights(layers, lambda module: FixedMask(module.weight.detach()))

    def prune_all() -> bool:
        changed = False
        for module in layers.values():
            mask = module.parametrizations.weight[0]
            if not bool(mask.pruned):
                mask.prune(module.parametrizations.weight.original, n, m)
                changed = True
        return changed

    def on_epoch(epoch: int) -> dict | None:
        if epoch >= config.prune_epoch and prune_all():
            return {"pruned": config.pattern}
        return None

    def finalize() -> dict:
        prune_all()
        unparametrize(layers, keep_projection=True)
        return nm_final_report(layers, config.pattern)

    remove = functools.partial(unparametrize, layers, keep_projection=False)
    handle = TrainingHandle(model, "magnitude_finetune", on_epoch, finalize, remove)
    report = {"pattern": config.pattern, "prune_epoch": config.prune_epoch, "modules": len(layers)}
    return PassResult(report={**report, "dense_modules": skipped}, handle=handle)
