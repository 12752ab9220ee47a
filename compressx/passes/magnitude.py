"""Magnitude pruning: zero the weights of smallest absolute value.

The baseline every sparsity method compares against (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015, arXiv:1506.02626; N:M form as in Mishra et al., "Accelerating Sparse
Deep Neural Networks", arXiv:2104.08378). Three patterns:

* ``unstructured`` with ``scope: layer`` — the ``floor(sparsity * count)`` weights of each layer with the
  smallest ``|w|`` are zeroed (one threshold per layer);
* ``unstructured`` with ``scope: row`` — the same fraction in every output row / output channel (the per-output
  comparison group Wanda uses, so the two are comparable);
* ``"N:M"`` (e.g. ``"2:4"``) — in every block of M consecutive input weights the N largest ``|w|`` are kept
  (blocks along the input dimension, channels-last for convs; see ``compressx.ops.sparsity``).

Touches: the ``weight`` of the selected ``Linear`` / ``Conv1d/2d/3d`` modules and transformers ``Conv1D`` (GPT-2;
its ``[in, out]`` weight is pruned as the Linear it is), and each expert's slice of fused expert parameters
(Mixtral, Qwen-MoE: ``experts.gate_up_proj[e]`` is one layer), in place. Biases are kept. The change is
irreversible (the pruned values are gone); pruned weights are stored as exact zeros, dense. The report is a
census of the target weights after pruning.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.ops.sparsity import (
    check_finite,
    nm_mask,
    nm_shape_problems,
    parse_nm,
    resolve_pattern,
    sparsity_report,
    topk_mask,
    zero_counts,
)
from compressx.registry import PassContext, PassResult, register_pass
from compressx.targets import FusedExperts, TransposedLinear, weight_matrices, weight_tensors

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, TransposedLinear, FusedExperts)


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(PassConfig):
    """Config of the ``magnitude`` pass.

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1). Required for ``unstructured`` (default 0.5); for an
            N:M pattern it is fixed at 1 - N/M, so leave it out or give exactly that value.
        pattern: ``"unstructured"`` or an N:M pattern such as ``"2:4"`` (quote it in YAML: ``"2:4"``).
        scope: for ``unstructured``: ``"layer"`` (one threshold per layer) or ``"row"`` (per output row).
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: Literal["layer", "row"] = "layer"

    def __post_init__(self) -> None:
        sparsity, nm = resolve_pattern(self.sparsity, self.pattern)
        if nm is not None and self.scope != "layer":
            raise ConfigError("scope applies to the unstructured pattern only; leave it out for N:M", path="scope")
        object.__setattr__(self, "sparsity", sparsity)


def magnitude_mask(weight: torch.Tensor, config: MagnitudeConfig) -> torch.Tensor:
    """Boolean keep-mask of ``weight`` under ``config`` (pure; does not touch the weight)."""
    scores = weight.detach().abs().float()
    if config.pattern == "unstructured":
        return topk_mask(scores, config.sparsity, dim=None if config.scope == "layer" else 1)
    return nm_mask(scores, *parse_nm(config.pattern))


def matrices_of(targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every layer weight of the targets as the pass prunes it: ``[out, in]`` (or a Conv's own shape), per expert."""
    return {key: w for name, module in targets.items() for key, w in weight_matrices(name, module).items()}


def census(targets: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``name -> (exact zeros, numel)`` of every weight tensor of the targets, as they are now (for reports)."""
    return zero_counts({key: w.detach() for name, m in targets.items() for key, w in weight_tensors(name, m).items()})


def _check_shapes(targets: dict[str, nn.Module], config: MagnitudeConfig) -> list[str]:
    nm = None if config.pattern == "unstructured" else parse_nm(config.pattern)
    return nm_shape_problems(matrices_of(targets), nm)


@register_pass(
    "magnitude",
    config=MagnitudeConfig,
    kind="weights",
    paper="baseline: magnitude pruning (Han et al. 2015, arXiv:1506.02626)",
    families=("llm", "mllm", "vit", "cnn", "any"),
    target_types=PRUNABLE_TYPES,
    check=_check_shapes,
)
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, ctx: PassContext) -> PassResult:
    """Zero the smallest-magnitude weights of every target module; report the sparsity reached."""
    problems = _check_shapes(ctx.targets, config)
    if problems:
        raise ConfigError("; ".join(problems), path="pattern")
    matrices = matrices_of(ctx.targets)
    check_finite(matrices)
    with torch.no_grad():
        for weight in matrices.values():
            weight.mul_(magnitude_mask(weight, config).to(weight.dtype))
    return PassResult(report=sparsity_report(census(ctx.targets)))
