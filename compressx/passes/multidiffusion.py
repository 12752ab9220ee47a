"""MultiDiffusion: generation at sizes above the native one by averaging overlapping native-size windows.

Paper: Bar-Tal et al., "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", ICML 2023,
arXiv:2302.08113 (diffusers' panorama pipeline follows it: window 64 latent px, stride 8). The baseline
CutDiffusion is measured against: at every step the canvas is covered by overlapping windows of the UNet's
native size, each gets one scheduler step, and the next-step latents are averaged where windows overlap.

Touches: nothing in the weights; like ``cutdiffusion`` (whose sampler it runs, with no structure phase, no
pixel interaction and no jitter) it changes the pipeline's class so that ``pipe(prompt, height=..., width=...)``
samples this way, and ``handle.remove()`` restores it. Same pipelines (SD 1.x/2.x, SDXL) and schedulers (Euler,
DDIM) as ``cutdiffusion``.

Deviation: the paper's stride default is one eighth of the window (diffusers' panorama pipeline: 8 of 64);
that is the default here too. ``tools/bench_cutdiffusion.py`` compares against MultiDiffusion with
CutDiffusion's stride (half a window), as the CutDiffusion paper's cost comparison does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compressx.config import PassConfig
from compressx.errors import ConfigError
from compressx.passes.cutdiffusion import CutdiffusionConfig, apply_cutdiffusion, check_pipeline, pipeline_problems
from compressx.registry import PassContext, PassResult, register_pass


@dataclasses.dataclass(frozen=True)
class MultidiffusionConfig(PassConfig):
    """Config of the ``multidiffusion`` pass (latent pixels: image pixels / VAE factor).

    Attributes:
        window_size: window side; default the UNet's native ``sample_size``.
        stride: window stride, at most the window; default ``window_size // 8`` (the paper's 8 of 64).
        view_batch_size: windows per UNet batch.
        tile_vae: decode tiled when the image is larger than native.
    """

    window_size: int | None = None
    stride: int | None = None
    view_batch_size: int = 1
    tile_vae: bool = True

    def __post_init__(self) -> None:
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"got {self.window_size}; expected a positive latent size", path="window_size")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"got {self.stride}; expected a positive latent stride", path="stride")
        if self.view_batch_size < 1:
            raise ConfigError(f"got {self.view_batch_size}; expected a positive integer", path="view_batch_size")

    def sampler_config(self, native: int) -> CutdiffusionConfig:
        """The equivalent CutDiffusion sampler config: windows at every step, no shuffle, no jitter."""
        window = self.window_size or native
        return CutdiffusionConfig(
            proportion=0.0,
            shuffle=False,
            jitter=False,
            window_size=window,
            stride=self.stride or max(window // 8, 1),
            view_batch_size=self.view_batch_size,
            tile_vae=self.tile_vae,
        )


@register_pass(
    "multidiffusion",
    config=MultidiffusionConfig,
    kind="pipeline",
    paper="MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation (arXiv:2302.08113)",
    families=("diffusion",),
    check_model=pipeline_problems,
)
def apply_multidiffusion(model: Any, config: MultidiffusionConfig, ctx: PassContext) -> PassResult:
    """Make ``pipe(prompt, height=..., width=...)`` sample with MultiDiffusion windows at every step."""
    check_pipeline(model)
    native = model.unet.config.sample_size
    native = native if isinstance(native, int) else native[0]
    result = apply_cutdiffusion(model, config.sampler_config(native), ctx)
    report = {k: v for k, v in result.report.items() if k not in ("proportion", "jitter")}
    return PassResult(report=report, handle=result.handle)
