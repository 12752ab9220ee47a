"""What the post-training ViT quantization passes (``ptq_minmax``, ``repq_vit``, ``isvit``) share: the common
config fields and the calibration steps. Not a pass module itself (not in ``BUILTIN_PASS_MODULES``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError
from compressx.ops.quant import MAX_BITS, MIN_BITS, set_quant_state
from compressx.ops.vit_quant import (
    QuantizedViT,
    QuantSettings,
    ViTLayout,
    calibration_images,
    find_layout,
    quantizer_report,
    run_batches,
    wrap,
)

log = logging.getLogger(__name__)
FULL_PRECISION_PARTS = ("patch_embed", "head", "attention_matmuls")


@dataclasses.dataclass(frozen=True)
class ViTQuantConfig(PassConfig):
    """Fields every ViT post-training quantization pass takes.

    Attributes:
        w_bits: bits of every weight (2–8).
        a_bits: bits of every quantized activation (2–8).
        calibration_images: images drawn (with ``seed``) from the calibration data.
        weight_granularity: ``channel`` (one scale per output channel) or ``tensor``.
        keep_full_precision: parts left unquantized, any of ``patch_embed``, ``head``, ``attention_matmuls``
            (default none: the reference quantizes all of them at the same bit-width).
        seed: the calibration sample (and, for ``isvit``, the reconstruction mini-batches).
    """

    w_bits: int = 4
    a_bits: int = 4
    calibration_images: int | None = None
    weight_granularity: str = "channel"
    keep_full_precision: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("w_bits", "a_bits"):
            value = getattr(self, key)
            if not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(f"got {value}; allowed: {MIN_BITS} to {MAX_BITS}", path=key)
        if self.calibration_images is not None and self.calibration_images < 1:
            raise ConfigError(f"got {self.calibration_images}; expected a positive integer", "calibration_images")
        if self.weight_granularity not in ("channel", "tensor"):
            raise ConfigError(f"got {self.weight_granularity!r}; allowed: 'channel', 'tensor'", "weight_granularity")
        for i, part in enumerate(self.keep_full_precision):
            if part not in FULL_PRECISION_PARTS:
                raise ConfigError(
                    f"got {part!r}; allowed: {', '.join(FULL_PRECISION_PARTS)}", path=f"keep_full_precision[{i}]"
                )


def vit_problems(model: object, config: object = None) -> list[str]:
    """``register_pass(check_model=...)`` of the ViT quantization passes: a model without a supported vision
    transformer inside is refused by ``compressx validate`` (on the meta model), not after calibration starts."""
    if not isinstance(model, nn.Module):
        return [f"post-training ViT quantization applies to a torch model, got {type(model).__name__}"]
    try:
        find_layout(model)
    except CompressxError as err:
        return [str(err)]
    return []


def prepare(
    model: nn.Module, config: ViTQuantConfig, calibration: Any, count: int, **settings: Any
) -> tuple[ViTLayout, QuantizedViT, torch.Tensor]:
    """Find the layout (or raise naming the supported models), draw the images, install the quantizers."""
    layout = find_layout(model)
    images = calibration_images(calibration, count, config.seed)
    param = next(model.parameters())
    images = images.to(param.device, param.dtype)
    quant = QuantSettings(
        w_bits=config.w_bits,
        a_bits=config.a_bits,
        weight_granularity=config.weight_granularity,
        keep_full_precision=tuple(config.keep_full_precision),
        **settings,
    )
    model.eval()
    handle = wrap(model, layout, quant)
    log.info(
        "%s: %d blocks, W%d/A%d, %d calibration images, softmax quantizer %s",
        layout.family,
        len(layout.blocks),
        config.w_bits,
        config.a_bits,
        len(images),
        quant.softmax,
    )
    return layout, handle, images


@torch.no_grad()
def initialise(model: nn.Module, images: torch.Tensor, weights: bool, activations: bool) -> None:
    """Enable the quantizers asked for; one forward of ``images`` calibrates every unset one (in model order,
    each activation quantizer seeing the already-quantized outputs before it, as in the reference code)."""
    set_quant_state(model, weights=weights, activations=activations)
    run_batches(model, images, batch_size=len(images))


def base_report(config: ViTQuantConfig, layout: ViTLayout, images: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    return {
        "model_family": layout.family,
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        "blocks": len(layout.blocks),
        "calibration_images": len(images),
        "layers": quantizer_report(model),
    }


def evaluate_stage(
    evaluate: Callable[[nn.Module], dict[str, float]] | None, results: dict[str, dict], stage: str, model: nn.Module
) -> None:
    """Measure ``model`` after ``stage`` with the caller's ``evaluate`` (``PassContext.evaluate``; nothing when it
    is None), log the values and keep them in ``results[stage]`` (the report's ``stage_eval``)."""
    if evaluate is None:
        return
    values = evaluate(model)
    model.eval()  # the quantized model stays in eval mode whatever the metric did
    results[stage] = values
    log.info("after %s: %s", stage, ", ".join(f"{label} = {value:.4g}" for label, value in values.items()))
