"""MultiDiffusion (CutDiffusion's baseline) on tiny SD pipelines built from configs (CPU, no weights)."""

from __future__ import annotations

import pytest
import torch
from conftest import embeds, make_tiny_sd_pipeline, plain, pointwise_unet

import compressx
from compressx.errors import CompressxError, ConfigError
from compressx.passes.cutdiffusion import CutdiffusionConfig, cutdiffusion_sample
from compressx.passes.multidiffusion import MultidiffusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def sample(pipe, height, width, **kw):
    gen = torch.Generator().manual_seed(0)
    return pipe(height=height, width=width, num_inference_steps=4, generator=gen, output_type="latent", **kw).images


def test_pass_samples_with_windows_at_every_step_at_the_papers_stride():
    pipe = make_tiny_sd_pipeline()
    rows = []
    pipe.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    result = compressx.apply(pipe, [{"pass": "multidiffusion", "config": {"view_batch_size": 27}}])
    assert result.steps[0].report["stride"] == 1  # window 8 // 8
    got = sample(pipe, 32, 32, **embeds(False))
    # 16 latent px, window 8, stride 1: 9 x 9 windows at each of the 4 steps, CFG doubling each batch.
    assert sum(rows) == 4 * 81 * 2
    expected = cutdiffusion_sample(
        pipe,
        CutdiffusionConfig(proportion=0.0, shuffle=False, jitter=False, stride=1, view_batch_size=27),
        None,
        32,
        32,
        4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **embeds(False),
    ).images
    torch.testing.assert_close(got, expected)


def test_pointwise_unet_gives_full_canvas_sampling():
    pipe = make_tiny_sd_pipeline(xl=True)
    pointwise_unet(pipe)
    compressx.apply(pipe, [{"pass": "multidiffusion", "config": {"stride": 3, "view_batch_size": 8}}])
    got = pipe(
        height=16,
        width=48,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        guidance_scale=3.0,
        **embeds(True),
    ).images
    torch.testing.assert_close(got, plain(pipe, 16, 48, xl=True, guidance_scale=3.0), rtol=1e-5, atol=1e-5)


def test_export_records_multidiffusion_and_load_reapplies_it(tmp_path):
    pipe = make_tiny_sd_pipeline()
    result = compressx.apply(pipe, [{"pass": "multidiffusion", "config": {"stride": 4}}])
    out = compressx.save(pipe, tmp_path / "export", result)
    assert compressx.export.read_manifest(out)["reapply"][0]["pass"] == "multidiffusion"
    loaded = compressx.load(out)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(loaded, 32, 16, **embeds(False)), sample(pipe, 32, 16, **embeds(False)))


def test_bad_configs_and_models_are_refused(tiny_cnn):
    with pytest.raises(ConfigError, match="stride"):
        MultidiffusionConfig(stride=0)
    with pytest.raises(CompressxError, match="applies to a diffusers StableDiffusionPipeline"):
        compressx.apply(tiny_cnn, [{"pass": "multidiffusion"}])
    with pytest.raises(CompressxError, match="stride 9 > window_size 8 would leave pixels no window covers"):
        compressx.apply(make_tiny_sd_pipeline(), [{"pass": "multidiffusion", "config": {"stride": 9}}])
