"""The sd_digits zoo member: a real StableDiffusionPipeline built here (tiny step counts: plumbing, not quality)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

import compressx
from compressx import zoo
from compressx.api import run_recipe
from compressx.recipe import load_recipe
from compressx.zoo import sd_digits

RECIPE = Path(__file__).resolve().parents[2] / "recipes/diffusion/cutdiffusion_zoo.yaml"
quick_train = functools.partial(sd_digits.train, vae_steps=2, unet_steps=2, classifier_steps=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_is_deterministic_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = quick_train(progress=False)
    assert torch.equal(torch.rand(3), expected)
    b, _ = quick_train(progress=False)
    for (name, x), (_, y) in zip(a.pipe.unet.state_dict().items(), b.pipe.unet.state_dict().items()):
        assert torch.equal(x, y), name


def test_prompts_tokenize_to_distinct_ids(tmp_path):
    tokenizer = sd_digits._tokenizer(tmp_path)
    ids = tokenizer([*sd_digits.PROMPTS, ""], padding="max_length", max_length=8).input_ids
    assert len({tuple(i) for i in ids}) == 11
    assert ids[3][:3] == [0, tokenizer.convert_tokens_to_ids("digit</w>"), tokenizer.convert_tokens_to_ids("3</w>")]


def test_digit_scores_read_the_prompted_class():
    classifier = sd_digits.DigitClassifier().eval()
    images = torch.rand(4, 1, 32, 32)
    predicted = classifier(torch.nn.functional.interpolate(images * 2 - 1, size=(16, 16), mode="area")).argmax(1)
    assert sd_digits.digit_scores(classifier, images, predicted)["accuracy"] == 1.0
    assert sd_digits.digit_scores(classifier, images, (predicted + 1) % 10)["accuracy"] == 0.0


@pytest.mark.slow
def test_recipe_builds_exports_and_reloads_the_pipeline_with_the_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.MEMBERS, "sd_digits", dataclasses.replace(zoo.MEMBERS["sd_digits"], train=quick_train))
    run = run_recipe(load_recipe(RECIPE, [f"export.dir={tmp_path / 'out'}"]), progress=False)
    assert run.result.steps[0].report["native_px"] == 16
    pipe = compressx.load(run.export_dir)
    assert type(pipe)._compressx_base is StableDiffusionPipeline
    assert (Path(run.export_dir) / "tokenizer").is_dir()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("digit 3", height=32, width=48, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (48, 32) and image.images[0].mode == "L"


def test_frechet_distance_is_zero_for_equal_sets_and_the_squared_shift_for_shifted_ones():
    a = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)).double()
    assert abs(sd_digits.frechet_distance(a, a)) < 1e-6
    assert sd_digits.frechet_distance(a, a + torch.tensor([3.0, 0, 0, 0]).double()) == pytest.approx(9.0, abs=1e-6)
