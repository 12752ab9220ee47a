"""CutDiffusion: higher-resolution generation from a diffusion pipeline trained at a lower one, without tuning.

Paper: Lin et al., "CutDiffusion: A Simple, Fast, Cheap, and Strong Diffusion Extrapolation Method",
arXiv:2404.15141; official code ``lmbxmu/CutDiffusion`` (one SDXL pipeline file).

Idea. A canvas of ``a x b`` native sizes (latent ``a*s x b*s``, ``s = unet.config.sample_size``) is sampled in two
phases:

1. *Comprehensive structure denoising* (the first ``floor(T * proportion)`` steps): the canvas is viewed as
   ``N = a*b`` native-size sub-latents, sub-latent ``k = r*b + q`` being the dilated grid ``canvas[r::a, q::b]``,
   so each spans the whole picture. They are denoised as a batch of native-size images. With pixel
   interaction (``shuffle``) the values at every latent element are permuted among the N sub-latents before the
   UNet, and the noise prediction is permuted back, so the sub-latents agree on one structure.
2. *Specific detail refinement* (the remaining steps): overlapping native-size windows (stride ``stride``, random
   jitter of ``(window - stride) // 4`` on a zero-padded canvas) are denoised one scheduler step each and the
   next-step latents are averaged where windows overlap (MultiDiffusion).

Touches: nothing in the weights. The pass changes the class of the pipeline object to a subclass (same name)
whose ``__call__`` runs this sampler; ``handle.remove()`` restores the original class. The baseline
MultiDiffusion is the same sampler with ``proportion = 0`` and no jitter or shuffle (``multidiffusion_config``).

Deviations from the official code (its bugs and limits), following the paper instead:

* SD 1.x/2.x as well as SDXL; native size read from the UNet, not hard-wired to 1024 px; both sides checked.
* Integer switch index ``floor(T * proportion)`` instead of a float-equality test that never fires for odd T.
* Pixel interaction vectorised (argsort of uniform noise along the patch axis) and drawn from the call's
  generator; the jitter too. The official code calls ``torch.randperm`` once per element on the global RNG.
* The scheduler's step index is set explicitly before every ``scale_model_input``/``step`` call; the official
  ``_init_step_index(t)`` silently reuses sigma_0 on current diffusers once ``set_begin_index(0)`` was called.
  Only schedulers whose step is a stateless function of (t, sample, eps) are accepted (Euler, DDIM with eta 0).
* Initial noise is one full-canvas draw (as the plain pipeline draws it), not N native draws: same distribution,
  and at native size the result equals the plain pipeline bit for bit.
* ``shuffle`` defaults to on, as the paper's method and the README command use it (the CLI default is off).
* ``view_batch_size`` defaults to 1 (the README command) so that peak memory stays that of a native generation;
  the official ``__call__`` default 16 trades memory for speed.
* The VAE decode is tiled whenever the image is larger than native (``tile_vae``), not only above 2048 px.
* A stride larger than the window (which leaves uncovered pixels, NaN in the official code) is rejected.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError
from compressx.pipelines import original_class, patched_class
from compressx.registry import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# Schedulers whose step is element-wise and stateless given the step index: one step on a window, a patch batch
# or the whole canvas gives the same values. Multistep solvers keep a history that windows would corrupt, and
# ancestral/SDE schedulers add fresh noise per call, which overlapping windows would average away.
SUPPORTED_SCHEDULERS = ("EulerDiscreteScheduler", "DDIMScheduler")


@dataclasses.dataclass(frozen=True)
class CutdiffusionConfig(PassConfig):
    """Config of the ``cutdiffusion`` pass (latent sizes are in latent pixels: image pixels / VAE factor).

    Attributes:
        proportion: fraction of the steps in phase 1 (structure denoising), in [0, 1]; switch index
            ``floor(T * proportion)`` (paper/official 0.5). 0 gives MultiDiffusion-style sampling throughout.
        shuffle: pixel interaction among the sub-latents in phase 1 (paper; README command).
        window_size: phase-2 window side; default the UNet's native ``sample_size``.
        stride: phase-2 window stride, at most the window; default ``window_size // 2`` (official 64 of 128).
        jitter: random window shifts of up to ``(window - stride) // 4`` in phase 2 (official: always on).
        multi_guidance_scale: CFG scale of phase 2; default the call's ``guidance_scale`` (official CLI: both 7.5).
        view_batch_size: sub-latents/windows per UNet batch (1 bounds memory at a native generation's).
        crop_coords: SDXL crop conditioning of the phase-2 windows: ``official`` (padded canvas coordinates, as
            the official code) or ``true`` (coordinates in the image).
        tile_vae: decode tiled (``vae.enable_tiling``) when the image is larger than native.
    """

    proportion: float = 0.5
    shuffle: bool = True
    window_size: int | None = None
    stride: int | None = None
    jitter: bool = True
    multi_guidance_scale: float | None = None
    view_batch_size: int = 1
    crop_coords: Literal["official", "true"] = "official"
    tile_vae: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.proportion <= 1.0:
            raise ConfigError(f"got {self.proportion}; expected a fraction in [0, 1]", path="proportion")
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"got {self.window_size}; expected a positive latent size", path="window_size")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"got {self.stride}; expected a positive latent stride", path="stride")
        if self.stride is not None and self.window_size is not None and self.stride > self.window_size:
            raise ConfigError(
                f"stride {self.stride} > window_size {self.window_size} would leave pixels no window covers; "
                "use a stride of at most the window size",
                path="stride",
            )
        if self.view_batch_size < 1:
            raise ConfigError(f"got {self.view_batch_size}; expected a positive integer", path="view_batch_size")
        if self.multi_guidance_scale is not None and self.multi_guidance_scale < 0:
            raise ConfigError(f"got {self.multi_guidance_scale}; expected >= 0", path="multi_guidance_scale")


def multidiffusion_config(stride: int | None = None, window_size: int | None = None) -> CutdiffusionConfig:
    """The MultiDiffusion baseline (Bar-Tal et al., arXiv:2302.08113): overlapping windows at every step."""
    return CutdiffusionConfig(proportion=0.0, shuffle=False, jitter=False, stride=stride, window_size=window_size)


# ---- pure tensor functions -------------------------------------------------------------------------------------


def split_subgrids(canvas: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``[B, C, a*s, b*t]`` → ``[B, a*b, C, s, t]``; sub-latent ``r*b + q`` is ``canvas[..., r::a, q::b]``."""
    batch, channels, height, width = canvas.shape
    s, t = height // a, width // b
    grid = canvas.reshape(batch, channels, s, a, t, b).permute(0, 3, 5, 1, 2, 4)
    return grid.reshape(batch, a * b, channels, s, t)


def relocate_subgrids(patches: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The inverse of ``split_subgrids``: ``[B, a*b, C, s, t]`` → ``[B, C, a*s, b*t]`` (pixel relocation)."""
    batch, _, channels, s, t = patches.shape
    grid = patches.reshape(batch, a, b, channels, s, t).permute(0, 3, 4, 1, 5, 2)
    return grid.reshape(batch, channels, s * a, t * b)


def random_patch_permutation(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """An independent random permutation of dim 1 at every other index of ``shape`` (argsort of uniform noise)."""
    noise_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=noise_device).argsort(dim=1).to(device)


def shuffle_patches(patches: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Input slot ``j`` takes, element by element, the value of patch ``perm[:, j]``."""
    return patches.gather(1, perm)


def unshuffle_patches(shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of ``shuffle_patches``: slot ``j``'s value goes back to patch ``perm[:, j]``."""
    return torch.empty_like(shuffled).scatter_(1, perm, shuffled)


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Window start positions along one axis; the last window is snapped to the border."""
    if side <= window:
        return [0]
    count = math.ceil((side - window) / stride) + 1
    return [min(k * stride, side - window) for k in range(count)]


def jittered_windows(
    height: int, width: int, window: int, stride: int, jitter: int, generator: torch.Generator | None
) -> list[tuple[int, int]]:
    """Window corners (top, left) on the canvas zero-padded by ``jitter`` on every side.

    Interior windows move by a uniform integer in [-jitter, jitter]; a window at the top/left border only into
    the padding ([-jitter, 0]), at the bottom/right border [0, jitter]; a window spanning an axis does not move.
    """

    def offset(start: int, side: int) -> int:
        first, last = start == 0, start + window >= side
        if jitter == 0 or (first and last):
            return 0
        low, high = -jitter, jitter
        if first:
            low, high = -jitter, 0
        elif last:
            low, high = 0, jitter
        return int(torch.randint(low, high + 1, (1,), generator=generator, device=_rng_device(generator)))

    corners = []
    for top in window_starts(height, window, stride):
        for left in window_starts(width, window, stride):
            corners.append((top + jitter + offset(top, height), left + jitter + offset(left, width)))
    return corners


def _rng_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- the sampler -----------------------------------------------------------------------------------------------


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler whose step is not a stateless element-wise function of (step index, sample, eps)."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise CompressxError(
            f"cutdiffusion cannot sample with {name}: windows and sub-latents need a scheduler whose step keeps no "
            f"history and adds no fresh noise; supported: {', '.join(SUPPORTED_SCHEDULERS)} (e.g. "
            "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config))"
        )
    if getattr(scheduler.config, "thresholding", False):
        # Dynamic thresholding clips each sample at its own quantile: a window's quantile is not the canvas's.
        raise CompressxError(
            f"cutdiffusion cannot sample with {name}(thresholding=True): dynamic thresholding is not element-wise; "
            "turn it off (from_config(..., thresholding=False))"
        )


def check_pipeline(pipe: Any) -> str:
    """The supported pipeline class ``pipe`` is (or was, before a pass patched it); an error otherwise."""
    names = [cls.__name__ for cls in original_class(pipe).__mro__]
    for name in SUPPORTED_PIPELINES:
        if name in names:
            return name
    raise CompressxError(
        f"cutdiffusion applies to a diffusers {' or '.join(SUPPORTED_PIPELINES)}, got {type(pipe).__name__}"
    )


def pipeline_problems(pipe: Any, config: Any = None) -> list[str]:
    """``register_pass(check_model=...)``: the pipeline class and scheduler refusals, from a pipeline or from the
    ``model_index.json`` mapping ``compressx validate`` reads (``{"_class_name": ..., "scheduler": [lib, cls]}``),
    so SD3 / Flux pipelines or a PNDM / DPM-Solver scheduler are refused before any weights load."""
    if not isinstance(pipe, Mapping):
        problems = []
        for check in (check_pipeline, lambda p: check_scheduler(p.scheduler)):
            try:
                check(pipe)
            except (CompressxError, AttributeError) as err:
                problems.append(str(err))
        return problems
    problems = []
    name = str(pipe.get("_class_name"))
    import diffusers

    cls = getattr(diffusers, name, None)
    names = [c.__name__ for c in cls.__mro__] if isinstance(cls, type) else [name]
    if not any(supported in names for supported in SUPPORTED_PIPELINES):
        problems.append(f"cutdiffusion applies to a diffusers {' or '.join(SUPPORTED_PIPELINES)}, got {name}")
    scheduler = pipe.get("scheduler")
    if isinstance(scheduler, list | tuple) and len(scheduler) == 2 and scheduler[1] not in SUPPORTED_SCHEDULERS:
        problems.append(
            f"cutdiffusion cannot sample with {scheduler[1]}: windows and sub-latents need a scheduler whose step "
            f"keeps no history and adds no fresh noise; supported: {', '.join(SUPPORTED_SCHEDULERS)} (change the "
            "scheduler entry of model_index.json and scheduler/scheduler_config.json's _class_name)"
        )
    return problems


def _set_step(scheduler: Any, index: int) -> None:
    """Point a step-indexed scheduler (Euler) at step ``index``; DDIM reads the timestep and has no index."""
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = index


@dataclasses.dataclass
class _Conditioning:
    """Prompt embeddings, batched [uncond, cond] when CFG is on, and what SDXL adds."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    cfg: bool
    xl: bool
    original_size: tuple[int, int]

    def unet_kwargs(self, crops: list[tuple[int, int]]) -> dict[str, Any]:
        """Kwargs for a UNet call on one view per crop (each holding every image), with the crop conditioning."""
        halves = 2 if self.cfg else 1
        # Layout of the UNet batch: [uncond rows..., cond rows...], each half ordered (view, image).
        batch = self.embeds.shape[0] // halves
        embeds = torch.cat([self.embeds[h * batch : (h + 1) * batch].repeat(len(crops), 1, 1) for h in range(halves)])
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if self.xl:
            pooled = torch.cat([self.pooled[h * batch : (h + 1) * batch].repeat(len(crops), 1) for h in range(halves)])
            ids = [[*self.original_size, *crop, *self.original_size] for crop in crops for _ in range(batch)] * halves
            time_ids = torch.tensor(ids, dtype=self.embeds.dtype, device=self.embeds.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs


def _predict(
    pipe: Any,
    views: torch.Tensor,
    t: torch.Tensor,
    cond: _Conditioning,
    crops: list[tuple[int, int]],
    guidance_scale: float,
    guidance_rescale: float,
) -> torch.Tensor:
    """Guided noise prediction for ``views`` ``[V*B, C, h, w]`` (view-major), scaled input included."""
    model_input = torch.cat([views, views]) if cond.cfg else views
    model_input = pipe.scheduler.scale_model_input(model_input, t)
    out = pipe.unet(model_input, t, return_dict=False, **cond.unet_kwargs(crops))[0]
    if not cond.cfg:
        return out
    uncond, text = out.chunk(2)
    guided = uncond + guidance_scale * (text - uncond)
    if guidance_rescale > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, text, guidance_rescale=guidance_rescale)
    return guided


def _encode(pipe: Any, xl: bool, prompt: Any, negative_prompt: Any, cfg: bool, embeds: dict[str, Any], device):
    if xl:
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
            **embeds,
        )
        return (torch.cat([npe, pe]), torch.cat([npooled, pooled])) if cfg else (pe, pooled)
    pe, npe = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt, **embeds)
    return (torch.cat([npe, pe]) if cfg else pe), None


@torch.no_grad()
def cutdiffusion_sample(
    pipe: Any,
    config: CutdiffusionConfig,
    prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    guidance_rescale: float = 0.0,
    output_type: str = "pil",
    return_dict: bool = True,
    progress: bool | None = None,
) -> Any:
    """Generate at ``height x width`` (multiples of the native size) with CutDiffusion; returns the pipeline output.

    The arguments mean what they mean in the diffusers pipeline's ``__call__``; ``latents`` is the initial
    full-canvas noise ``[B, C, H/f, W/f]`` (unscaled, as the pipeline takes it). ``progress`` defaults to the
    pipeline's progress-bar setting (``pipe.set_progress_bar_config(disable=True)`` turns it off).
    """
    if progress is None:
        progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    xl = check_pipeline(pipe) == "StableDiffusionXLPipeline"
    check_scheduler(pipe.scheduler)
    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size
    native = native if isinstance(native, int) else native[0]
    height = height or native * factor
    width = width or native * factor
    for name, side in (("height", height), ("width", width)):
        if side % (native * factor):
            raise ConfigError(
                f"{side} px is not a multiple of the native size {native * factor} px "
                f"(UNet sample_size {native} x VAE factor {factor}); use {native * factor}, "
                f"{2 * native * factor}, {3 * native * factor}, ...",
                path=name,
            )
    window = config.window_size or native
    stride = config.stride or max(window // 2, 1)
    if stride > window:
        raise ConfigError(f"stride {stride} > window {window} leaves pixels uncovered", path="stride")
    lat_h, lat_w = height // factor, width // factor
    if window > min(lat_h, lat_w):
        raise ConfigError(f"window {window} is larger than the latent canvas {lat_h}x{lat_w}", path="window_size")
    a, b = lat_h // native, lat_w // native
    device = pipe._execution_device
    cfg = guidance_scale > 1.0
    phase2_scale = guidance_scale if config.multi_guidance_scale is None else config.multi_guidance_scale

    embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
    if xl:
        embeds.update(
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds
        )
    text, pooled = _encode(pipe, xl, prompt, negative_prompt, cfg, embeds, device)
    cond = _Conditioning(text.to(device), None if pooled is None else pooled.to(device), cfg, xl, (height, width))
    batch = text.shape[0] // (2 if cfg else 1)

    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    switch = math.floor(len(timesteps) * config.proportion + 1e-9)
    channels = pipe.unet.config.in_channels
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((batch, channels, lat_h, lat_w), generator=generator, device=device, dtype=text.dtype)
    elif latents.shape != (batch, channels, lat_h, lat_w):
        raise ConfigError(f"latents have shape {tuple(latents.shape)}, expected {(batch, channels, lat_h, lat_w)}")
    canvas = latents.to(device) * pipe.scheduler.init_noise_sigma
    jitter = (window - stride) // 4 if config.jitter else 0
    log.debug("cutdiffusion: %dx%d px, %d sub-latents, switch at %d/%d", height, width, a * b, switch, len(timesteps))

    for i, t in enumerate(tqdm(timesteps, desc="cutdiffusion", disable=not progress, leave=False)):
        if i < switch:
            canvas = _phase1_step(pipe, config, canvas, a, b, i, t, cond, guidance_scale, guidance_rescale, generator)
        else:
            corners = jittered_windows(lat_h, lat_w, window, stride, jitter, generator)
            canvas = _phase2_step(
                pipe, config, canvas, corners, window, jitter, i, t, cond, phase2_scale, guidance_rescale, factor
            )
    return _decode(pipe, canvas, config, xl, (height, width), native * factor, output_type, return_dict)


def _phase1_step(pipe, config, canvas, a, b, i, t, cond, scale, rescale, generator) -> torch.Tensor:
    """One step on the N dilated sub-latents (shuffled among themselves when ``shuffle``), as one canvas step."""
    patches = split_subgrids(canvas, a, b)  # [B, N, C, s, s]
    perm = None
    if config.shuffle and a * b > 1:
        perm = random_patch_permutation(tuple(patches.shape), generator, canvas.device)
        patches = shuffle_patches(patches, perm)
    eps = torch.empty_like(patches)
    for chunk in _chunks(list(range(a * b)), config.view_batch_size):
        views = patches[:, chunk].transpose(0, 1).flatten(0, 1)  # view-major [V*B, C, s, s]
        _set_step(pipe.scheduler, i)
        pred = _predict(pipe, views, t, cond, [(0, 0)] * len(chunk), scale, rescale)
        eps[:, chunk] = pred.unflatten(0, (len(chunk), canvas.shape[0])).transpose(0, 1).to(eps.dtype)
    if perm is not None:
        eps = unshuffle_patches(eps, perm)
    _set_step(pipe.scheduler, i)
    # The step is element-wise, so stepping the relocated canvas equals stepping each sub-latent.
    return pipe.scheduler.step(relocate_subgrids(eps, a, b), t, canvas, return_dict=False)[0]


def _phase2_step(pipe, config, canvas, corners, window, jitter, i, t, cond, scale, rescale, factor) -> torch.Tensor:
    """One step on overlapping jittered windows; next-step latents averaged where windows overlap."""
    padded = torch.nn.functional.pad(canvas, (jitter, jitter, jitter, jitter))
    value = torch.zeros_like(padded)
    count = torch.zeros_like(padded[:, :1])
    for chunk in _chunks(corners, config.view_batch_size):
        views = torch.cat([padded[:, :, y : y + window, x : x + window] for y, x in chunk])
        if config.crop_coords == "official":
            crops = [(y * factor, x * factor) for y, x in chunk]
        else:
            crops = [((y - jitter) * factor, (x - jitter) * factor) for y, x in chunk]
        _set_step(pipe.scheduler, i)
        eps = _predict(pipe, views, t, cond, crops, scale, rescale)
        _set_step(pipe.scheduler, i)
        stepped = pipe.scheduler.step(eps, t, views, return_dict=False)[0]
        for k, (y, x) in enumerate(chunk):
            rows = stepped[k * canvas.shape[0] : (k + 1) * canvas.shape[0]]
            value[:, :, y : y + window, x : x + window] += rows
            count[:, :, y : y + window, x : x + window] += 1
    height, width = canvas.shape[-2:]
    value = value[:, :, jitter : jitter + height, jitter : jitter + width]
    return value / count[:, :, jitter : jitter + height, jitter : jitter + width]


def _decode(pipe, latents, config, xl, size, native_px, output_type, return_dict) -> Any:
    if output_type == "latent":
        images = latents
    else:
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents)
            latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        tiled = config.tile_vae and max(size) > native_px
        was_tiling = getattr(vae, "use_tiling", False)
        if tiled:
            vae.enable_tiling()
        try:
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if tiled and not was_tiling:
                vae.disable_tiling()
            if upcast:
                vae.to(torch.float16)
        nsfw = None
        if not xl and getattr(pipe, "safety_checker", None) is not None:
            images, nsfw = pipe.run_safety_checker(images, images.device, images.dtype)
        denormalize = None if nsfw is None else [not flag for flag in nsfw]
        images = pipe.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)
    if xl:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict else (images, None)


# ---- the pass --------------------------------------------------------------------------------------------------


class CutdiffusionHandle:
    """Restores the pipeline's original class (its plain ``__call__``)."""

    def __init__(self, pipe: Any, base: type) -> None:
        self.pipe, self.base = pipe, base

    def remove(self) -> None:
        self.pipe.__class__ = self.base


def _patched_class(base: type, config: CutdiffusionConfig) -> type:
    allowed = set(inspect.signature(cutdiffusion_sample).parameters) - {"pipe", "config", "prompt", "height", "width"}

    def __call__(self, prompt=None, height=None, width=None, **kwargs):  # noqa: N807 (a method, by design)
        unknown = set(kwargs) - allowed
        if unknown:
            raise ConfigError(
                f"cutdiffusion pipelines take {', '.join(sorted(allowed))}; got unsupported {sorted(unknown)}"
            )
        return cutdiffusion_sample(self, config, prompt, height, width, **kwargs)

    return patched_class(base, __call__)


@register_pass(
    "cutdiffusion",
    config=CutdiffusionConfig,
    kind="pipeline",
    paper="CutDiffusion: A Simple, Fast, Cheap, and Strong Diffusion Extrapolation Method (arXiv:2404.15141)",
    families=("diffusion",),
    check_model=pipeline_problems,
)
def apply_cutdiffusion(model: Any, config: CutdiffusionConfig, ctx: PassContext) -> PassResult:
    """Make ``pipe(prompt, height=..., width=...)`` sample with CutDiffusion at multiples of the native size."""
    kind = check_pipeline(model)
    check_scheduler(model.scheduler)
    native = model.unet.config.sample_size
    native = native if isinstance(native, int) else native[0]
    window = config.window_size or native
    stride = config.stride or max(window // 2, 1)
    if stride > window:
        raise ConfigError(
            f"stride {stride} > window {window} (the UNet's native size) leaves pixels uncovered", "stride"
        )
    base = original_class(model)
    model.__class__ = _patched_class(base, config)
    report = {
        "pipeline": kind,
        "scheduler": type(model.scheduler).__name__,
        "native_px": native * model.vae_scale_factor,
        "window": window,
        "stride": stride,
        "jitter": (window - stride) // 4 if config.jitter else 0,
        "proportion": config.proportion,
    }
    log.info("cutdiffusion on %s: native %d px, window %d, stride %d", kind, report["native_px"], window, stride)
    return PassResult(report=report, handle=CutdiffusionHandle(model, base))
