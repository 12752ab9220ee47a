"""The zoo LLaVA (llava_digits): determinism, data, and the vtw recipe end to end on the built model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compressx
from compressx.zoo import llava_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_is_deterministic_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, info_a = llava_digits.train(steps=2, vision_steps=2, progress=False)
    assert torch.equal(torch.rand(3), expected)
    b, info_b = llava_digits.train(steps=2, vision_steps=2, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert info_a["val_accuracy"] == info_b["val_accuracy"]


def test_questions_and_answers_are_right():
    tok = llava_digits.WordTokenizer()
    images, labels = llava_digits.digits("test")
    batch = llava_digits.make_batch("larger", images, labels, torch.tensor([[0, 1], [1, 0]]))
    assert (batch["input_ids"] == tok.image_token_id).sum(1).tolist() == [32, 32]
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    first, second = int(labels[0]), int(labels[1])
    assert tok.decode(batch["answers"].tolist()) == " ".join(
        ["yes" if first > second else "no", "yes" if second > first else "no"]
    )
    prompts = llava_digits.calibration_prompts("val", 6, seed=0)
    assert len(prompts) == 6 and set(prompts[0]) == {"input_ids", "pixel_values"}
    assert [p["pixel_values"].shape[0] for p in prompts] == [1, 1, 2, 2, 1, 1]  # the four kinds in turn
    sizes = {split: len(llava_digits.digits(split)[1]) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] > sizes["val"]


@pytest.mark.slow
def test_vtw_recipe_on_the_zoo_llava(zoo_cache, tmp_path, monkeypatch):
    from compressx.api import run_recipe
    from compressx.recipe import load_recipe

    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    path = Path(__file__).resolve().parents[2] / "recipes" / "mllm" / "vtw_llava_digits.yaml"
    recipe = load_recipe(path, [f"export.dir={tmp_path / 'out'}", "eval.0.data.samples=200"])
    run = run_recipe(recipe, progress=False)
    label = "vqa_accuracy (digits_vqa/test, 200 questions)"
    assert run.eval_before[label] > 0.85  # the proxy answers from the images
    report = run.result.steps[0].report
    layer = report["layer"]
    assert 1 <= layer < 6 and report["flops"]["prefill_ratio"] < 1
    assert all(kl > 0.003 for d, kl in report["kl_per_layer"].items() if int(d) < layer)
    assert run.eval_after[label] >= run.eval_before[label] - 0.02
    reloaded = compressx.load(run.export_dir)
    prompt = llava_digits.calibration_prompts("test", 1, seed=5)[0]
    out = reloaded.generate(**prompt, max_new_tokens=1, do_sample=False)
    assert torch.equal(out, run.model.generate(**prompt, max_new_tokens=1, do_sample=False))
    assert reloaded(**prompt).logits.shape[1] == prompt["input_ids"].shape[1] - 16 or layer == 6


def test_multimodal_data_blocks_and_metric_errors(tmp_path):
    from compressx.data import load_calibration, parse_data_spec
    from compressx.errors import CompressxError, ConfigError
    from compressx.evaluate import METRICS, parse_eval_spec

    spec = parse_data_spec({"source": "digits_vqa", "split": "val", "samples": 5})
    prompts = load_calibration(spec, None)
    assert len(prompts) == 5 and prompts[0]["input_ids"].shape == (1, 26)  # bos user : + 16 + 5 words + assistant :
    with pytest.raises(ConfigError, match="split"):
        parse_data_spec({"source": "digits_vqa", "split": "dev"})
    with pytest.raises(ConfigError, match="path"):
        parse_data_spec({"source": "image_prompts"})
    missing = parse_data_spec({"source": "image_prompts", "path": str(tmp_path / "none.jsonl")})
    with pytest.raises(ConfigError, match="none.jsonl"):
        load_calibration(missing, lambda **kw: kw)
    with pytest.raises(CompressxError, match="processor"):
        load_calibration(missing, None)
    text_eval = parse_eval_spec({"metric": "vqa_accuracy", "data": {"source": "stdlib_text"}})
    with pytest.raises(CompressxError, match="digits_vqa"):
        METRICS["vqa_accuracy"][1](None, None, text_eval, False)
