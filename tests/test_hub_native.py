"""Hub-native exports (issue 14): every kind of export loads with its own library's usual call in a process where
compressx cannot be imported, with the outputs of ``compressx.load``; the model card parses with ``ModelCard``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN, make_tiny_llama, make_tiny_llava, make_tiny_sd_pipeline, tiny_hf_vit
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import compressx
from compressx.data import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE = [{"pass": "magnitude", "config": {"sparsity": 0.5, "pattern": "2:4"}}]
TEXT = "def f(x):\n    return x  # é ü 日本 \t end"
TIMM_SPEC = {
    "source": "timm",
    "id": "vit_tiny_patch16_224",
    "pretrained": False,
    "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2},
}

# Runs with compressx unimportable (and no PYTHONPATH): each export loaded by its library alone, the outputs saved.
PLAIN_LOAD = r"""
import sys
sys.modules["compressx"] = None  # `import compressx` raises ImportError, whatever the install (editable or not)
try:
    import compressx
except ImportError:
    pass
else:
    raise SystemExit("compressx is importable")
import numpy as np, timm, torch, transformers, diffusers
from safetensors.torch import save_file
root, out = sys.argv[1], {}
torch.set_num_threads(1)  # as the test process: bit-equal outputs need the same summation order
torch.manual_seed(0)
lm = transformers.AutoModelForCausalLM.from_pretrained(f"{root}/lm")
tok = transformers.AutoTokenizer.from_pretrained(f"{root}/lm")
ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
out["lm.ids"], out["lm.logits"] = ids, lm(ids).logits
byte_tok = transformers.AutoTokenizer.from_pretrained(f"{root}/byte")
out["byte.ids"] = torch.tensor(byte_tok(sys.argv[2])["input_ids"])
vit = transformers.AutoModelForImageClassification.from_pretrained(f"{root}/vit")
out["vit.logits"] = vit(pixel_values=torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)).logits
tm = timm.create_model(f"local-dir:{root}/timm", pretrained=True).eval()
out["timm.logits"] = tm(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))
# the test pipeline has no text encoder, tokenizer, safety checker (prompt embeddings are passed): say so
absent = dict.fromkeys(["text_encoder", "tokenizer", "safety_checker", "feature_extractor"])
pipe = diffusers.DiffusionPipeline.from_pretrained(f"{root}/sd", **absent)
g = torch.Generator().manual_seed(0)
sample, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
out["sd.unet"] = pipe.unet(sample, 10, encoder_hidden_states=states).sample
out["sd.vae"] = pipe.vae.decode(sample).sample
processor = transformers.AutoProcessor.from_pretrained(f"{root}/vlm")
vlm = transformers.AutoModelForImageTextToText.from_pretrained(f"{root}/vlm")
image = np.linspace(0, 255, 8 * 8 * 3).reshape(8, 8, 3).astype("uint8")
inputs = processor(text="w5 w6 <image> w7 w8", images=image, return_tensors="pt")
out["vlm.ids"], out["vlm.pixels"] = inputs["input_ids"], inputs["pixel_values"]
out["vlm.logits"] = vlm(**inputs).logits
out["vlm.has_compressx_entry"] = torch.tensor(hasattr(vlm.config, "compressx"))
save_file({k: v.detach().contiguous() for k, v in out.items()}, sys.argv[3])
"""


def _word_processor():
    """A LLaVA processor for ``make_tiny_llava``: CLIP image processing at 8x8 and a word-level tokenizer of its
    128-word vocabulary (``w<i>``; ``<image>`` at the image token id, ``<pad>`` at 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)} | {"<pad>": 0, "<image>": IMAGE_TOKEN}
    vocab = {word: i for word, i in vocab.items() if word not in ("w0", f"w{IMAGE_TOKEN}")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, bpe_tokenizer):
    """One export of each kind, and what their plain libraries computed from them in a compressx-free process."""
    from compressx.models import build_model
    from compressx.recipe import parse_recipe

    root = tmp_path_factory.mktemp("hub-native")
    torch.set_num_threads(1)
    lm = make_tiny_llama()
    lm.resize_token_embeddings(len(bpe_tokenizer))
    compressx.save(lm, root / "lm", compressx.apply(lm, PRUNE), tokenizer=bpe_tokenizer)
    compressx.save(make_tiny_llama(), root / "byte", tokenizer=ByteTokenizer())
    vit = tiny_hf_vit()
    vit_steps = [{**PRUNE[0], "ignore": ["*patch_embeddings*"]}]
    compressx.save(vit, root / "vit", compressx.apply(vit, vit_steps))
    recipe = parse_recipe({"model": TIMM_SPEC, "steps": [{"pass": "magnitude", "ignore": ["patch_embed.proj"]}]})
    tm = build_model(recipe.model).model
    compressx.save(tm, root / "timm", compressx.apply(tm, recipe.steps), recipe=recipe)
    compressx.save(make_tiny_sd_pipeline(), root / "sd")
    vlm = make_tiny_llava()
    result = compressx.apply(vlm, [{"pass": "fastv", "config": {"layer": 1, "ratio": 0.5}}], progress=False)
    compressx.save(vlm, root / "vlm", result, tokenizer=_word_processor())
    result.steps[0].handle.remove()
    outputs = root / "plain.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(root), TEXT, str(outputs)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return root, load_file(str(outputs)), vlm


@pytest.mark.slow  # one subprocess loading every kind of export (imports torch, transformers, timm, diffusers)
def test_hf_language_model_and_tokenizer_load_with_transformers_alone(exports, bpe_tokenizer):
    root, plain, _ = exports
    ids = plain["lm.ids"]
    assert ids.tolist() == [bpe_tokenizer("def f(x): return x")["input_ids"]]
    assert torch.equal(plain["lm.logits"], compressx.load(root / "lm")(ids).logits)


@pytest.mark.slow
def test_zoo_byte_tokenizer_is_exported_as_a_tokenizer_json_with_the_same_ids(exports):
    root, plain, _ = exports
    assert (root / "byte" / "tokenizer.json").is_file()
    assert plain["byte.ids"].tolist() == ByteTokenizer().encode(TEXT)
    assert isinstance(compressx.export.load_tokenizer(root / "byte"), ByteTokenizer)  # compressx's own, still


@pytest.mark.slow
def test_hf_vit_loads_with_transformers_alone(exports):
    root, plain, _ = exports
    pixels = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    assert torch.equal(plain["vit.logits"], compressx.load(root / "vit")(pixel_values=pixels).logits)


@pytest.mark.slow
def test_timm_export_loads_with_timm_create_model_local_dir(exports):
    root, plain, _ = exports
    config = json.loads((root / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert "class" not in config and "format" not in config  # compressx's fields are in compressx.json only
    assert compressx.read_manifest(root / "timm")["model"]["format"] == "timm"
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    assert torch.equal(plain["timm.logits"], compressx.load(root / "timm")(x))


@pytest.mark.slow
def test_diffusers_pipeline_loads_with_diffusion_pipeline_alone(exports):
    root, plain, _ = exports
    pipe = compressx.load(root / "sd")
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    assert torch.equal(plain["sd.unet"], pipe.unet(sample, 10, encoder_hidden_states=states).sample)
    assert torch.equal(plain["sd.vae"], pipe.vae.decode(sample).sample)


@pytest.mark.slow
def test_vlm_with_processor_loads_with_transformers_alone_and_names_its_runtime_pass(exports):
    root, plain, vlm = exports
    ids, pixels = plain["vlm.ids"], plain["vlm.pixels"]
    assert (ids == IMAGE_TOKEN).sum() == 16  # the processor expanded <image> to the model's 16 vision tokens
    # A plain loader sees the weights without the runtime pass (fastv): the unpatched model's logits, full length.
    # (from_pretrained picks sdpa attention, the test model was built with eager: equal up to rounding)
    torch.testing.assert_close(plain["vlm.logits"], vlm(input_ids=ids, pixel_values=pixels).logits)
    assert bool(plain["vlm.has_compressx_entry"])
    config = json.loads((root / "vlm" / "config.json").read_text())
    assert config["compressx"]["runtime_passes"] == [{"pass": "fastv", "config": {"layer": 1, "ratio": 0.5}}]
    assert "compressx.load" in config["compressx"]["load_with"]
    # compressx.load applies it: half of the 16 vision tokens are withdrawn.
    reloaded = compressx.load(root / "vlm")
    assert reloaded(input_ids=ids, pixel_values=pixels).logits.shape[1] == ids.shape[1] - 8
    card = ModelCard.load(root / "vlm" / "README.md")
    assert "fastv" in card.data.tags and "runtime-pass" in card.data.tags and "`fastv`" in card.text


def _card(directory: Path) -> ModelCard:
    card = ModelCard.load(directory / "README.md")  # parses the front matter; raises on an invalid model-index
    assert card.data.library_name and card.data.tags[0] == "compressx"
    return card


@pytest.mark.slow
def test_every_kind_of_card_parses_with_its_library_and_pipeline_tag(exports):
    root, _, _ = exports
    expected = {
        "lm": ("transformers", "text-generation"),
        "byte": ("transformers", "text-generation"),
        "vit": ("transformers", "image-classification"),
        "timm": ("timm", "image-classification"),
        "sd": ("diffusers", "text-to-image"),
        "vlm": ("transformers", "image-text-to-text"),
    }
    for name, (library, task) in expected.items():
        card = _card(root / name)
        assert (card.data.library_name, card.data.pipeline_tag) == (library, task), name
    assert "2:4" in _card(root / "lm").data.tags and "sparsity" in _card(root / "vit").data.tags
    assert "timm.create_model(" in _card(root / "timm").text and "AutoTokenizer" in _card(root / "lm").text
    assert "AutoProcessor" in _card(root / "vlm").text and "DiffusionPipeline" in _card(root / "sd").text


def test_card_of_a_recipe_export_has_base_model_license_model_index_and_the_recipe(tmp_path, bpe_tokenizer):
    """A hub-id source names its base model; a local source's card lends its license; evals become model-index."""
    from conftest import save_tiny_hf_llama

    from compressx.model_card import base_model_and_license
    from compressx.recipe import parse_recipe

    base = save_tiny_hf_llama(tmp_path / "base", bpe_tokenizer)
    ModelCard("---\nlicense: mit\n---\n# base\n").save(base / "README.md")
    assert base_model_and_license({"source": "hf", "id": str(base)}) == (None, "mit")
    assert base_model_and_license({"source": "hf", "id": "HuggingFaceTB/SmolLM2-135M"})[0] == (
        "HuggingFaceTB/SmolLM2-135M"
    )
    assert base_model_and_license({"source": "timm", "id": "resnet18.a1_in1k"})[0] == "timm/resnet18.a1_in1k"
    assert base_model_and_license({"source": "timm", "id": "resnet18", "pretrained": False}) == (None, None)
    assert base_model_and_license({"source": "zoo", "id": "llama_byte_1m"}) == (None, None)  # trained here
    assert base_model_and_license({"source": "zoo", "id": "smollm2_135m"}) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    )
    recipe = parse_recipe(
        {"model": {"source": "hf", "id": str(base)}, "steps": PRUNE, "export": {"dir": str(tmp_path / "out")}}
    )
    model = make_tiny_llama()
    result = compressx.apply(model, recipe.steps)
    label = "perplexity (stdlib_text/test, 8x32)"
    evals = {"before": {label: 10.0}, "after": {label: 10.5}}
    compressx.save(model, tmp_path / "out", result, recipe=recipe, eval_results=evals)
    card = _card(tmp_path / "out")
    assert card.data.license == "mit" and card.data.base_model is None  # a local directory is no hub id
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {label: 10.5, f"{label} (before compression)": 10.0}
    assert all(r.task_type == "text-generation" and r.metric_type == "perplexity" for r in card.data.eval_results)
    for heading in ("## What was done", "## Recipe", "## Evaluation", "## Size", "## How to load", "## Versions"):
        assert heading in card.text
    assert "pass: magnitude" in card.text and "| 10.0000 | 10.5000 |" in card.text
    assert "compressx " + compressx.__version__ in card.text


@pytest.mark.parametrize("member", ["bytes", "words"])
def test_zoo_tokenizers_save_a_tokenizer_json_that_autotokenizer_reads_with_the_same_ids(tmp_path, member):
    from transformers import AutoTokenizer

    from compressx.zoo.llava_digits import WordTokenizer

    tokenizer, text = {
        "bytes": (ByteTokenizer(), TEXT),
        "words": (WordTokenizer(), "<bos> user : <image> which digit is it ? assistant : 7"),
    }[member]
    tokenizer.as_transformers().save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = reloaded(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert reloaded.decode(ids) == text == tokenizer.decode(ids)


def test_card_of_a_plain_torch_module_names_compressx_as_its_loader(tmp_path, tiny_cnn):
    result = compressx.apply(tiny_cnn, [{"pass": "magnitude", "config": {"sparsity": 0.5}}])
    compressx.save(tiny_cnn, tmp_path / "cnn", result)
    card = _card(tmp_path / "cnn")
    assert card.data.library_name == "compressx" and card.data.pipeline_tag is None and card.data.base_model is None
    assert "only compressx rebuilds" in card.text and "sparsity" in card.data.tags and "2:4" not in card.data.tags
