"""CutDiffusion on tiny SD / SDXL pipelines built from configs (CPU, no weights)."""

from __future__ import annotations

import pytest
import torch
from conftest import embeds, make_tiny_sd_pipeline, plain, pointwise_unet
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

import compressx
import compressx.cli
from compressx.errors import CompressxError, ConfigError
from compressx.passes.cutdiffusion import (
    CutdiffusionConfig,
    cutdiffusion_sample,
    jittered_windows,
    multidiffusion_config,
    random_patch_permutation,
    relocate_subgrids,
    shuffle_patches,
    split_subgrids,
    unshuffle_patches,
    window_starts,
)

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def cut(pipe, config, height, width, xl=False, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    args = dict(num_inference_steps=STEPS, generator=gen, output_type="latent", progress=False)
    return cutdiffusion_sample(pipe, config, None, height, width, **embeds(xl), **args, **kw).images


# ---- pure functions --------------------------------------------------------------------------------------------


def test_relocation_is_a_bijection_and_places_subgrids():
    canvas = torch.randn(2, 3, 12, 20)
    patches = split_subgrids(canvas, 3, 5)
    assert patches.shape == (2, 15, 3, 4, 4)
    assert torch.equal(relocate_subgrids(patches, 3, 5), canvas)
    for r in range(3):
        for q in range(5):
            assert torch.equal(patches[:, r * 5 + q], canvas[:, :, r::3, q::5])


def test_shuffle_is_undone_and_keeps_each_elements_values():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(1, 6, 2, 4, 4)
    perm = random_patch_permutation(tuple(patches.shape), g, "cpu")
    shuffled = shuffle_patches(patches, perm)
    assert not torch.equal(shuffled, patches)
    assert torch.equal(shuffled.sort(dim=1).values, patches.sort(dim=1).values)
    assert torch.equal(unshuffle_patches(shuffled, perm), patches)
    # Permutations differ between elements (per channel too), not one per patch.
    assert len({tuple(perm[0, :, c, 0, 0].tolist()) for c in range(2)} | {tuple(perm[0, :, 0, 1, 1].tolist())}) > 1
    one = torch.randn(1, 1, 2, 4, 4)
    assert torch.equal(shuffle_patches(one, random_patch_permutation(tuple(one.shape), g, "cpu")), one)


@pytest.mark.parametrize("size,count", [((256, 256), 9), ((256, 512), 21), ((384, 384), 25), ((512, 512), 49)])
def test_window_counts_match_the_closed_form(size, count):
    # SDXL latents (s=128, stride 64) at 2048², 2048x4096, 3072², 4096², the official SDXL setting.
    assert len(window_starts(size[0], 128, 64)) * len(window_starts(size[1], 128, 64)) == count


@pytest.mark.parametrize("seed", range(5))
def test_jittered_windows_cover_every_pixel(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (2,), generator=g) * 8
    stride = int(torch.randint(1, 9, (1,), generator=g))
    jitter = (8 - stride) // 4
    count = torch.zeros(int(sizes[0]) + 2 * jitter, int(sizes[1]) + 2 * jitter)
    for y, x in jittered_windows(int(sizes[0]), int(sizes[1]), 8, stride, jitter, g):
        assert y >= 0 and x >= 0
        count[y : y + 8, x : x + 8] += 1
    assert (count[jitter : jitter + int(sizes[0]), jitter : jitter + int(sizes[1])] >= 1).all()


# ---- sampling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xl", [False, True])
@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_pointwise_unet_gives_full_canvas_sampling_at_any_size(xl, scheduler):
    pipe = make_tiny_sd_pipeline(xl=xl, scheduler=scheduler)
    pointwise_unet(pipe)
    # 2x3 native sizes (non-square), shuffle and jitter on, stride 3 of window 8.
    config = CutdiffusionConfig(stride=3, view_batch_size=2)
    got = cut(pipe, config, 32, 48, xl=xl, guidance_scale=3.0)
    expected = plain(pipe, 32, 48, xl=xl, guidance_scale=3.0)
    assert got.shape == (1, 4, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_native_size_equals_the_plain_pipeline(scheduler):
    pipe = make_tiny_sd_pipeline(scheduler=scheduler)
    got = cut(pipe, CutdiffusionConfig(), 16, 16)
    torch.testing.assert_close(got, plain(pipe, 16, 16), rtol=1e-5, atol=1e-6)


def test_sdxl_native_size_equals_plain_with_true_crop_coordinates_only():
    pipe = make_tiny_sd_pipeline(xl=True)
    expected = plain(pipe, 16, 16, xl=True, guidance_scale=5.0)
    got = cut(pipe, CutdiffusionConfig(crop_coords="true"), 16, 16, xl=True, guidance_scale=5.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The official crop conditioning uses padded coordinates: (jitter*f, jitter*f) in phase 2, not (0, 0).
    official = cut(pipe, CutdiffusionConfig(), 16, 16, xl=True, guidance_scale=5.0)
    assert not torch.allclose(official, expected, atol=1e-4)


def test_every_step_uses_its_own_sigma_after_the_stock_pipeline_set_a_begin_index():
    pipe = make_tiny_sd_pipeline(xl=True)
    plain(pipe, 16, 16, xl=True)  # the stock SDXL pipeline calls scheduler.set_begin_index(0)
    assert pipe.scheduler.begin_index == 0
    used = []
    step = pipe.scheduler.step

    def logged_step(model_output, timestep, sample, **kw):
        used.append((float(timestep), float(pipe.scheduler.sigmas[pipe.scheduler.step_index])))
        return step(model_output, timestep, sample, **kw)

    pipe.scheduler.step = logged_step
    cut(pipe, CutdiffusionConfig(view_batch_size=1), 32, 32, xl=True)
    sigmas = pipe.scheduler.sigmas
    timesteps = pipe.scheduler.timesteps
    assert len(used) == 3 * 1 + 3 * 9  # phase 1: one canvas step; phase 2: one step per window (9 at 2x2)
    for t, sigma in used:
        i = int((timesteps == t).nonzero())
        assert sigma == float(sigmas[i])


def test_unet_evaluations_follow_the_call_count_formula():
    pipe = make_tiny_sd_pipeline()
    rows = []
    pipe.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    cut(pipe, CutdiffusionConfig(view_batch_size=1), 32, 32)
    # CFG doubles the batch, not the count: N*T1 + windows*(T-T1) = 4*3 + 9*3, in native-size evaluations.
    assert len(rows) == 4 * 3 + 9 * 3 and set(rows) == {2}
    rows.clear()
    cut(pipe, multidiffusion_config(), 32, 32)
    assert len(rows) == 9 * STEPS
    rows.clear()  # odd T: the switch index is floor(5 * 0.5) = 2, where the official float test never fires
    cutdiffusion_sample(pipe, CutdiffusionConfig(), None, 32, 32, 5, output_type="latent", **embeds(False))
    assert len(rows) == 4 * 2 + 9 * 3


@pytest.mark.parametrize("xl", [False, True])
def test_tiny_pipelines_generate_at_twice_the_size_through_the_pass(xl):
    pipe = make_tiny_sd_pipeline(xl=xl)
    result = compressx.apply(pipe, [{"pass": "cutdiffusion", "config": {"stride": 4}}])
    assert result.steps[0].report["native_px"] == 16
    gen = torch.Generator().manual_seed(0)
    image = pipe(height=32, width=32, num_inference_steps=4, generator=gen, output_type="np", **embeds(xl)).images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    again = pipe(
        height=32,
        width=32,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **embeds(xl),
    )
    assert (again.images == image).all()  # deterministic under a fixed generator
    result.steps[0].handle.remove()
    assert type(pipe) is (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)


def test_shuffle_changes_the_result_and_multidiffusion_differs():
    pipe = make_tiny_sd_pipeline()
    a = cut(pipe, CutdiffusionConfig(shuffle=False), 16, 32)
    b = cut(pipe, CutdiffusionConfig(shuffle=True), 16, 32)
    c = cut(pipe, multidiffusion_config(), 16, 32)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_sizes_that_are_not_multiples_of_the_native_size_are_refused():
    pipe = make_tiny_sd_pipeline()
    with pytest.raises(ConfigError, match=r"width: 24 px is not a multiple of the native size 16 px"):
        cut(pipe, CutdiffusionConfig(), 32, 24)


@pytest.mark.parametrize("cls", [EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler])
def test_unsupported_schedulers_are_refused(cls):
    pipe = make_tiny_sd_pipeline()
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    with pytest.raises(CompressxError, match=rf"cannot sample with {cls.__name__}.*supported: EulerDiscrete"):
        compressx.apply(pipe, [{"pass": "cutdiffusion"}])
    with pytest.raises(CompressxError, match="cannot sample with"):
        cut(pipe, CutdiffusionConfig(), 32, 32)


def test_ddim_with_dynamic_thresholding_is_refused():
    pipe = make_tiny_sd_pipeline(scheduler="ddim")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, thresholding=True)
    with pytest.raises(CompressxError, match="thresholding=True"):
        compressx.apply(pipe, [{"pass": "cutdiffusion"}])


def test_bad_configs_and_models_are_refused(tiny_cnn):
    with pytest.raises(ConfigError, match="stride"):
        CutdiffusionConfig(stride=9, window_size=8)
    with pytest.raises(ConfigError, match="proportion"):
        CutdiffusionConfig(proportion=1.5)
    with pytest.raises(CompressxError, match="stride 9 > window 8"):
        compressx.apply(make_tiny_sd_pipeline(), [{"pass": "cutdiffusion", "config": {"stride": 9}}])
    with pytest.raises(CompressxError, match="applies to a diffusers StableDiffusionPipeline"):
        compressx.apply(tiny_cnn, [{"pass": "cutdiffusion"}])
    pipe = make_tiny_sd_pipeline()
    compressx.apply(pipe, [{"pass": "cutdiffusion"}])
    with pytest.raises(ConfigError, match="unsupported \\['eta'\\]"):
        pipe(height=32, width=32, eta=0.5, **embeds(False))


def test_export_records_the_pass_and_load_reapplies_it(tmp_path, capsys):
    pipe = make_tiny_sd_pipeline()
    result = compressx.apply(pipe, [{"pass": "cutdiffusion", "config": {"stride": 4, "shuffle": False}}])

    def sample(p):  # the same seeded call before export and after reload
        kw = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
        return p(height=32, width=16, **kw, **embeds(False)).images

    before = sample(pipe)
    out = compressx.save(pipe, tmp_path / "export", result)
    manifest = compressx.export.read_manifest(out)
    assert manifest["model"] == {"format": "diffusers", "class": "StableDiffusionPipeline", "dtype": "float32"}
    assert manifest["reapply"][0]["pass"] == "cutdiffusion" and manifest["reapply"][0]["config"]["stride"] == 4
    assert any(name.startswith("unet/") for name in manifest["files"])  # component files are hashed
    loaded = compressx.load(out)
    assert type(loaded)._compressx_base is StableDiffusionPipeline
    loaded.set_progress_bar_config(disable=True)
    after = sample(loaded)
    torch.testing.assert_close(after, before)
    assert compressx.cli.main(["load", str(out)]) == 0 and compressx.cli.main(["show", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded StableDiffusionPipeline (" in printed and "cutdiffusion" in printed
    (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(compressx.errors.ExportError, match="unet/diffusion_pytorch_model.safetensors' is corrupt"):
        compressx.load(out)
