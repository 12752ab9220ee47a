"""Plain uniform post-training quantization of a vision transformer: the baseline of the ViT PTQ comparisons.

Every weight and every activation quantizer of ``compressx.ops.vit_quant.wrap`` is a uniform asymmetric one
calibrated by min-max on the calibration images (weights per output channel by default, activations per tensor,
the post-Softmax attention map too). No search, no reparameterisation, no reconstruction: configuration B1 of
the comparisons in I&S-ViT (arXiv:2311.10126 §5) and RepQ-ViT (arXiv:2212.08254 §4).

Touches: every ``nn.Linear`` (``QuantLinear``), the patch-embedding ``Conv2d`` (``QuantConv2d``) and the attention
instances (quantized q·kᵀ and attn·v) of a timm ViT/DeiT/Swin or a transformers ViT/DeiT classifier. Fake-quantized:
the model still computes in floating point. ``result.handle.remove()`` restores the plain modules.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from compressx.passes._vit_ptq import (
    ViTQuantConfig,
    base_report,
    evaluate_stage,
    initialise,
    prepare,
    vit_problems,
)
from compressx.registry import PassContext, PassResult, register_pass


@dataclasses.dataclass(frozen=True)
class PtqMinmaxConfig(ViTQuantConfig):
    """Config of ``ptq_minmax``: the common ViT quantization fields (``calibration_images`` default 64)."""


@register_pass(
    "ptq_minmax",
    config=PtqMinmaxConfig,
    kind="weights",
    paper="baseline: min-max uniform PTQ of weights and activations (as compared in arXiv:2311.10126)",
    families=("vit",),
    check_model=vit_problems,
    needs=("calibration",),
)
def apply_ptq_minmax(model: nn.Module, config: PtqMinmaxConfig, ctx: PassContext) -> PassResult:
    """Min-max calibrate uniform quantizers for every weight and activation of the ViT."""
    layout, handle, images = prepare(
        model,
        config,
        ctx.calibration,
        config.calibration_images or 64,
        weight_method="minmax",
        activation_method="minmax",
        post_layernorm_channelwise=False,
        softmax="uniform",
    )
    initialise(model, images, weights=True, activations=True)
    report = base_report(config, layout, images, model)
    stage_eval: dict[str, dict] = {}
    evaluate_stage(ctx.evaluate, stage_eval, "calibrated", model)
    if stage_eval:
        report["stage_eval"] = stage_eval
    return PassResult(report=report, handle=handle)
