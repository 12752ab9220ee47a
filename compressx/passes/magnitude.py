"""Magnitude pruning: zero the weights of smallest absolute value.

The baseline every sparsity method compares against (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015, arXiv:1506.02626; N:M form as in Mishra et al., "Accelerating Sparse
Deep Neural Networks", arXiv:2104.08378). Three patterns:

* ``unstructured`` with ``scope: layer`` — the ``sparsity`` fraction of each layer's weights with the smallest
  ``|w|`` is zeroed (one threshold per layer);
* ``unstructured`` with ``scope: row`` — the same fraction in every output row / output channel (the per-output
  comparison group Wanda uses, so the two are comparable);
* ``"N:M"`` (e.g. ``"2:4"``) — in every block of M consecutive input weights the N largest ``|w|`` are kept
  (blocks along the input dimension, channels-last for convs; see ``compressx.ops.sparsity``).

Touches: the ``weight`` of the selected ``Linear`` / ``Conv1d/2d/3d`` modules, in place. Biases are kept. The
change is irreversible (the pruned values are gone); pruned weights are stored as exact zeros, dense.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.ops.sparsity import nm_mask, parse_nm, sparsity_of, to_input_last, topk_mask
from compressx.registry import PassContext, PassResult, register_pass

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
        if self.pattern == "unstructured":
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)
            elif not 0.0 <= self.sparsity < 1.0:
                raise ConfigError(f"got {self.sparsity}; sparsity must be in [0, 1)", path="sparsity")
            return
        try:
            n, m = parse_nm(self.pattern)
        except ValueError as err:
            raise ConfigError(f"{err}; allowed: 'unstructured' or 'N:M' with 0 < N < M", path="pattern") from err
        implied = 1.0 - n / m
        if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
            raise ConfigError(
                f"pattern {self.pattern} fixes sparsity at {implied:g}, got {self.sparsity}; leave sparsity out",
                path="sparsity",
            )
        if self.scope != "layer":
            raise ConfigError("scope applies to the unstructured pattern only; leave it out for N:M", path="scope")
        object.__setattr__(self, "sparsity", implied)


def magnitude_mask(weight: torch.Tensor, config: MagnitudeConfig) -> torch.Tensor:
    """Boolean keep-mask of ``weight`` under ``config`` (pure; does not touch the weight)."""
    scores = weight.detach().abs().float()
    if config.pattern == "unstructured":
        return topk_mask(scores, config.sparsity, dim=None if config.scope == "layer" else 1)
    return nm_mask(scores, *parse_nm(config.pattern))


def _check_shapes(targets: dict[str, nn.Module], config: MagnitudeConfig) -> list[str]:
    if config.pattern == "unstructured":
        return []
    _, m = parse_nm(config.pattern)
    problems = []
    for name, module in targets.items():
        in_dim = to_input_last(module.weight).shape[-1]
        if in_dim % m:
            problems.append(f"module '{name}' has input dimension {in_dim}, not divisible by M={m}; add it to ignore")
    return problems


@register_pass(
    "magnitude",
    config=MagnitudeConfig,
    kind="weights",
    paper="baseline: magnitude pruning (Han et al. 2015, arXiv:1506.02626)",
    families=("llm", "vit", "cnn", "any"),
    target_types=PRUNABLE_TYPES,
    check=_check_shapes,
)
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, ctx: PassContext) -> PassResult:
    """Zero the smallest-magnitude weights of every target module; report the sparsity reached."""
    problems = _check_shapes(ctx.targets, config)
    if problems:
        raise ConfigError("; ".join(problems), path="pattern")
    per_module: dict[str, float] = {}
    zeros = total = 0
    with torch.no_grad():
        for name, module in ctx.targets.items():
            mask = magnitude_mask(module.weight, config)
            module.weight.mul_(mask.to(module.weight.dtype))
            per_module[name] = round(sparsity_of(module.weight), 6)
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return PassResult(
        report={
            "sparsity": round(zeros / total, 6),
            "pruned_weights": zeros,
            "target_weights": total,
            "modules": len(per_module),
            "per_module": per_module,
        }
    )
