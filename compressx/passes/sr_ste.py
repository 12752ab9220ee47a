"""SR-STE: N:M sparsity trained from scratch with the sparse-refined straight-through estimator (baseline).

Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021,
arXiv:2102.04010. The N:M baseline LBC and SpRe compare against, and SpRe's main branch.

Idea: keep a dense latent weight; every forward uses its N:M projection (the N largest ``|w|`` of every block of
M input weights), so the mask can change at every step. The backward passes the gradient straight through to all
weights and adds ``decay · w`` to the pruned ones (λ_W = 2e-4 in the paper and in the SpRe code), which pulls
weights that keep being pruned towards zero and stabilises the mask.

Touches: the ``weight`` of the selected ``Linear`` / ``Conv2d`` layers, through a ``torch.nn.utils.parametrize``
parametrization (no extra tensors). The stem and the classifier stay dense by default. ``finalize()`` writes the
N:M projection of the latent weight into the plain weight.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn as nn

from compressx.errors import ConfigError
from compressx.ops.ste import sr_ste
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
class SrSteConfig(NMTrainingConfig):
    """Config of the ``sr_ste`` pass (and the fields of ``NMTrainingConfig``: pattern, skip_stem, ...).

    Attributes:
        decay: λ_W, the decay added to the gradient of pruned weights (paper: 2e-4); 0 gives the plain STE.
    """

    decay: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay < 0:
            raise ConfigError(f"got {self.decay}; must be >= 0", path="decay")


class SrSteMask(InTrainingModule):
    """The parametrization of one layer's weight: its N:M projection, with SR-STE's backward."""

    def __init__(self, n: int, m: int, decay: float) -> None:
        super().__init__()
        self.n, self.m, self.decay = n, m, decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return sr_ste(weight, self.n, self.m, self.decay)


@register_pass(
    "sr_ste",
    config=SrSteConfig,
    kind="training",
    paper="baseline: SR-STE (Zhou et al., ICLR 2021, arXiv:2102.04010)",
    families=("cnn", "vit", "any"),
    target_types=NM_TRAINABLE_TYPES,
    check=check_nm_layers,
)
def apply_sr_ste(model: nn.Module, config: SrSteConfig, ctx: PassContext) -> PassResult:
    """Make every selected layer use the N:M projection of its weight, with SR-STE gradients."""
    n, m = config.nm
    layers, skipped = select_nm_layers(model, ctx.targets, config)
    parametrize_weights(layers, lambda _: SrSteMask(n, m, config.decay))

    def finalize() -> dict:
        unparametrize(layers, keep_projection=True)
        return nm_final_report(layers, config.pattern)

    handle = TrainingHandle(
        model, "sr_ste", None, finalize, functools.partial(unparametrize, layers, keep_projection=False)
    )
    report = {"pattern": config.pattern, "decay": config.decay, "modules": len(layers), "dense_modules": skipped}
    return PassResult(report=report, handle=handle)
