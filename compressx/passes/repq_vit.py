"""RepQ-ViT: post-training quantization of vision transformers by scale reparameterisation.

Li, Xiao, Liu, Gu, "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers",
ICCV 2023, arXiv:2212.08254 (reference code ``zkkli/RepQ-ViT``). Two ideas, no fine-tuning:

* post-LayerNorm activations (the inputs of ``qkv`` / ``q,k,v_proj`` and ``fc1``) are calibrated **per channel**
  and then reparameterised to one per-tensor scale and zero point, the per-channel ratios folded into the
  LayerNorm affine and the next linear layer (§3.2, Eq. 4–6; ``compressx.ops.vit_quant.fold_post_layernorm``);
  the weight quantizers are calibrated afterwards, on the folded weights;
* post-Softmax activations use a **log√2** quantizer (§3.3).

Every other activation is per tensor, weights per output channel; all uniform quantizers are initialised by the
percentile-MSE search (``compressx.ops.quant.calibrate_uniform``, method ``mse``). One deviation from the
reference code: the target zero point is rounded to an integer (``round_zero_point``), so the fold keeps the
integer codes exactly; the reference averages without rounding.

Touches: as ``ptq_minmax``, plus the LayerNorm affines and the post-LayerNorm linears' weights and biases.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from compressx.ops.vit_quant import fold_all
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
class RepqVitConfig(ViTQuantConfig):
    """Config of ``repq_vit`` (``calibration_images`` default 32, the reference's calibration set).

    Attributes:
        round_zero_point: round the reparameterised zero point (exact codes); false reproduces the reference.
    """

    round_zero_point: bool = True


@register_pass(
    "repq_vit",
    config=RepqVitConfig,
    kind="weights",
    paper="RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers, arXiv:2212.08254",
    families=("vit",),
    check_model=vit_problems,
    needs=("calibration",),
)
def apply_repq_vit(model: nn.Module, config: RepqVitConfig, ctx: PassContext) -> PassResult:
    """Calibrate activations (post-LN per channel), fold them to per-tensor, then calibrate the weights."""
    layout, handle, images = prepare(
        model, config, ctx.calibration, config.calibration_images or 32, softmax="log_sqrt2"
    )
    initialise(model, images, weights=False, activations=True)
    folds = fold_all(model, layout, config.round_zero_point)
    stage_eval: dict[str, dict] = {}
    evaluate_stage(ctx.evaluate, stage_eval, "reparameterised", model)  # activations quantized, weights not yet
    initialise(model, images, weights=True, activations=True)
    evaluate_stage(ctx.evaluate, stage_eval, "calibrated", model)
    report = base_report(config, layout, images, model)
    report["reparameterised"] = folds
    if stage_eval:
        report["stage_eval"] = stage_eval
    return PassResult(report=report, handle=handle)
