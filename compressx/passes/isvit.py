"""I&S-ViT: post-training quantization of vision transformers with SULQ and the three-stage smooth optimisation.

Zhong, Hu, Lin, Chen, Ji, "I&S-ViT: An Inclusive & Stable Method for Pushing the Limit of Post-Training ViTs
Quantization", arXiv:2311.10126 (reference code ``zysxmu/IaS-ViT``). Built on RepQ-ViT (arXiv:2212.08254).

* **SULQ** (§4.2): post-Softmax activations go through the shift-uniform-log2 quantizer
  (``compressx.ops.quant.SULQ``): shift by η, log2, uniform over the whole calibrated log range, back to powers
  of two. Every other activation and every weight is uniform (percentile-MSE initialisation, weights per output
  channel by default).
* **SOS**, the three-stage smooth optimisation strategy (§4.3):

  1. activations quantized (post-LayerNorm inputs of ``qkv`` / ``fc1`` *per channel*), weights full precision;
     each block (then the head) is fine-tuned by block-wise reconstruction, inputs and targets both from the
     full-precision teacher;
  2. the channel-wise post-LayerNorm quantizers are folded into per-tensor ones through the LayerNorm affine and
     the next linear layer (RepQ-ViT's reparameterisation; no data);
  3. weights quantized too (per-channel percentile-MSE on the folded weights); the patch embedding, each block and
     the head are fine-tuned again, inputs from the quantized model, targets from the teacher.

  Reconstruction learns the Linear / Conv2d weights and biases only (LayerNorm affine and quantizer parameters are
  frozen); Adam, learning rate ``lr`` with cosine annealing to 0, ``iterations`` steps per unit and stage, batches
  of ``batch_size`` cached examples; loss = squared error summed over tokens, averaged over the rest.

Deviations from the reference code, where it disagrees with the paper (each can be switched back):

* SULQ has exactly ``2^b`` codes; the reference forward uses ``2^b + 1`` while its own calibration uses ``2^b``
  (``official_sulq: true`` reproduces the forward).
* Stage 2 rounds the per-tensor target zero point to an integer, so the fold preserves the integer codes; the
  reference leaves the mean unrounded (``round_zero_point: false``).
* The reference "reconstructs" the patch embedding in stage 1, when nothing in it is quantized (a no-op); here it
  is reconstructed in stage 3 only, once its weight is quantized.

Defaults are the paper's (``preset: paper``): 1024 calibration images, quantizer initialisation on the first 64,
1000 iterations per unit and stage (the reference README uses 200 at W6/A6 and above; ``iterations`` sets it), lr
4e-5, batch 64. ``preset: fast`` is sized for a CPU: 256 images, 100 iterations, lr 1e-4 (tiny models trained
from scratch tolerate, and need, a larger step). ``stages`` stops after stage 1 or 2 (to measure each stage).

Touches: as ``repq_vit``, plus every fine-tuned weight. ``result.handle.remove()`` restores plain modules.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.errors import ConfigError
from compressx.ops.quant import set_quant_state
from compressx.ops.vit_quant import ViTLayout, capture, find_layout, fold_all, reconstruct
from compressx.passes._vit_ptq import (
    ViTQuantConfig,
    base_report,
    evaluate_stage,
    initialise,
    prepare,
    vit_problems,
)
from compressx.registry import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
PRESETS = {
    "paper": {"calibration_images": 1024, "iterations": 1000, "lr": 4e-5},
    "fast": {"calibration_images": 256, "iterations": 100, "lr": 1e-4},
}


@dataclasses.dataclass(frozen=True)
class IsvitConfig(ViTQuantConfig):
    """Config of ``isvit``. Fields left unset come from ``preset``.

    Attributes:
        preset: ``paper`` (the paper's settings) or ``fast`` (sized for a CPU).
        iterations: reconstruction steps per unit and stage (paper 1000; 200 is the reference's W6/A6 choice).
        lr: Adam learning rate of the reconstruction (paper 4e-5).
        batch_size: cached examples per reconstruction step (paper 64).
        init_images: calibration images in the quantizer-initialisation forward (paper 64).
        stages: run SOS up to this stage (1, 2 or 3; 3 is the whole method).
        official_sulq: SULQ with the reference forward's ``2^b + 1`` codes instead of the paper's ``2^b``.
        round_zero_point: round the stage-2 target zero point (exact codes); false reproduces the reference.
    """

    preset: Literal["paper", "fast"] = "paper"
    iterations: int | None = None
    lr: float | None = None
    batch_size: int = 64
    init_images: int = 64
    stages: int = 3
    official_sulq: bool = False
    round_zero_point: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.iterations < 0:
            raise ConfigError(f"got {self.iterations}; expected an integer >= 0", path="iterations")
        if not self.lr > 0:
            raise ConfigError(f"got {self.lr}; expected a number > 0", path="lr")
        for key in ("batch_size", "init_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"got {getattr(self, key)}; expected a positive integer", path=key)
        if self.stages not in (1, 2, 3):
            raise ConfigError(f"got {self.stages}; allowed: 1, 2, 3", path="stages")


def _units(layout: ViTLayout, stage: int) -> list[str]:
    """The reconstruction units of a stage, in model order (patch embedding in stage 3 only)."""
    units = list(layout.units) + ([layout.head] if layout.head else [])
    return ([layout.patch_embed] if stage == 3 else []) + units


def _reconstruct_stage(
    model: nn.Module,
    teacher: nn.Module,
    layout: ViTLayout,
    images: torch.Tensor,
    config: IsvitConfig,
    stage: int,
    generator: torch.Generator,
    progress: bool,
) -> dict[str, dict[str, float]]:
    out = {}
    names = dict(model.named_modules())
    for name in tqdm(_units(layout, stage), desc=f"isvit stage {stage}", disable=not progress):
        if stage == 3 and name == layout.patch_embed and not hasattr(names[name], "weight_quantizer"):
            continue  # patch embedding kept in full precision: nothing to reconstruct
        teacher_in, target = capture(teacher, teacher.get_submodule(name), images, config.batch_size)
        inputs = teacher_in if stage == 1 else capture(model, model.get_submodule(name), images, config.batch_size)[0]
        before, after = reconstruct(
            model.get_submodule(name),
            inputs,
            target,
            iterations=config.iterations,
            batch_size=config.batch_size,
            lr=config.lr,
            generator=generator,
            progress=progress,
            desc=name,
        )
        out[name] = {"loss_before": before, "loss_after": after}
        log.info("stage %d %s: reconstruction loss %.5g -> %.5g", stage, name, before, after)
    return out


@register_pass(
    "isvit",
    config=IsvitConfig,
    kind="weights",
    paper="I&S-ViT: An Inclusive & Stable Method for Pushing the Limit of Post-Training ViTs Quantization, "
    "arXiv:2311.10126",
    families=("vit",),
    check_model=vit_problems,
    needs=("calibration",),
)
def apply_isvit(model: nn.Module, config: IsvitConfig, ctx: PassContext) -> PassResult:
    """SULQ + SOS stages 1–3 (up to ``stages``) on the ViT in ``model``; with ``ctx.evaluate``, the report's
    ``stage_eval`` holds the caller's metrics after each stage."""
    stage_eval: dict[str, dict] = {}

    def after_stage(stage: int, quantized: nn.Module) -> None:
        evaluate_stage(ctx.evaluate, stage_eval, f"stage{stage}", quantized)

    result = run_isvit(model, config, ctx.calibration, progress=ctx.progress, after_stage=after_stage)
    if stage_eval:
        result.report["stage_eval"] = stage_eval
    return result


def run_isvit(
    model: nn.Module,
    config: IsvitConfig,
    calibration: Any,
    *,
    progress: bool = False,
    after_stage: Callable[[int, nn.Module], None] | None = None,
) -> PassResult:
    """The pass itself; ``after_stage(stage, model)`` is called after each stage (e.g. to measure accuracy)."""
    find_layout(model)  # an unsupported model is refused before the teacher copy
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layout, handle, images = prepare(
        model,
        config,
        calibration,
        config.calibration_images,
        softmax="sulq",
        official_sulq=config.official_sulq,
    )
    generator = torch.Generator().manual_seed(config.seed)
    init = images[: config.init_images]
    seconds: dict[str, float] = {}
    reconstruction: dict[str, dict] = {}

    start = time.perf_counter()
    initialise(model, init, weights=False, activations=True)
    reconstruction["stage1"] = _reconstruct_stage(model, teacher, layout, images, config, 1, generator, progress)
    seconds["stage1"] = time.perf_counter() - start
    if after_stage:
        after_stage(1, model)
    folds = {}
    if config.stages >= 2:
        start = time.perf_counter()
        folds = fold_all(model, layout, config.round_zero_point)
        seconds["stage2"] = time.perf_counter() - start
        if after_stage:
            after_stage(2, model)
    if config.stages >= 3:
        start = time.perf_counter()
        initialise(model, init, weights=True, activations=True)
        reconstruction["stage3"] = _reconstruct_stage(model, teacher, layout, images, config, 3, generator, progress)
        seconds["stage3"] = time.perf_counter() - start
        if after_stage:
            after_stage(3, model)
    else:
        set_quant_state(model, weights=False, activations=True)
    report = base_report(config, layout, images, model)
    report.update(
        stages=config.stages,
        iterations=config.iterations,
        lr=config.lr,
        reparameterised=folds,
        reconstruction=reconstruction,
        stage_seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    return PassResult(report=report, handle=handle)
