"""Model sources, exercised with the real loading code on local directories (no hub access)."""

import json
import warnings

import pytest
import torch
from conftest import save_tiny_hf_llama

import compressx
from compressx.errors import CompressxError, RecipeError
from compressx.export import load_tokenizer
from compressx.models import build_model, parse_model_spec
from compressx.recipe import parse_recipe
from compressx.runner import check_recipe


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe_tokenizer):
    """A local transformers checkpoint: a tiny Llama and a byte-level BPE tokenizer trained here."""
    return save_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", bpe_tokenizer, layers=2)


def test_hf_local_dir_recipe_end_to_end(hf_dir, tmp_path):
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": str(hf_dir)},
            "steps": [{"pass": "magnitude", "config": {"pattern": "2:4"}, "ignore": ["lm_head"]}],
            "eval": [{"metric": "perplexity", "data": {"source": "stdlib_text", "samples": 4, "seq_len": 32}}],
            "export": {"dir": str(tmp_path / "exp")},
        }
    )
    check_recipe(recipe)
    run = compressx.run_recipe(recipe, progress=False)
    label = next(iter(run.eval_after))
    assert run.eval_before[label] != run.eval_after[label]
    # the tokenizer travels with the export and the reloaded model reproduces the recorded metric
    tokenizer = load_tokenizer(tmp_path / "exp")
    from transformers import AutoTokenizer

    sample = "def f(x):\n    return x  # é"
    assert tokenizer.encode(sample) == AutoTokenizer.from_pretrained(hf_dir).encode(sample)
    from compressx.evaluate import evaluate

    reloaded = compressx.load(tmp_path / "exp")
    assert evaluate(reloaded, tokenizer, list(recipe.eval), progress=False) == run.eval_after


def test_hf_meta_build_reads_no_weights(hf_dir, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("validation must not load weights")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", refuse)
    loaded = build_model(parse_model_spec({"source": "hf", "id": str(hf_dir), "class": "LlamaForCausalLM"}), meta=True)
    assert loaded.model.lm_head.weight.device.type == "meta"
    assert loaded.family == "llm"


def test_hf_errors(tmp_path):
    with pytest.raises(CompressxError, match="cannot build model hf:"):
        build_model(parse_model_spec({"source": "hf", "id": str(tmp_path / "missing")}), meta=True)
    with pytest.raises(CompressxError, match="transformers has no model class 'LlamaForCausalLMM'"):
        build_model(parse_model_spec({"source": "hf", "id": "x", "class": "LlamaForCausalLMM"}), meta=True)
    with pytest.raises(CompressxError, match="'class' applies to source hf only"):
        parse_model_spec({"source": "timm", "id": "vit_tiny_patch16_224", "class": "X"})


def test_timm_meta_validation_catches_nm_shape():
    recipe = parse_recipe(
        {
            "model": {"source": "timm", "id": "vit_tiny_patch16_224", "pretrained": False},
            "steps": [{"pass": "magnitude", "config": {"pattern": "2:4"}}],
        }
    )
    with pytest.raises(RecipeError, match="module 'patch_embed.proj' has input dimension 3, not divisible by M=4"):
        check_recipe(recipe)


def test_diffusers_validation_reads_only_the_pipeline_config(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    recipe = parse_recipe(
        {"model": {"source": "diffusers", "id": str(tmp_path / "pipe")}, "steps": [{"pass": "magnitude"}]}
    )
    with pytest.raises(RecipeError, match="pass 'magnitude' changes torch modules; a diffusers pipeline is not one"):
        check_recipe(recipe)


def test_diffusers_pipelines_load_with_dtype_not_the_deprecated_torch_dtype(tmp_path):
    from conftest import make_tiny_sd_pipeline

    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    absent = dict.fromkeys(["text_encoder", "tokenizer", "safety_checker", "feature_extractor"])  # tiny pipeline
    spec = parse_model_spec(
        {"source": "diffusers", "id": str(tmp_path / "pipe"), "dtype": "bfloat16", "kwargs": absent}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers >= 0.40 deprecates torch_dtype= with one
        loaded = build_model(spec, progress=False)
    assert loaded.model.unet.dtype == loaded.model.vae.dtype == torch.bfloat16
