import dataclasses

import pytest
import torch

from compressx import zoo
from compressx.errors import CompressxError
from compressx.zoo import llama_byte


def test_build_is_deterministic():
    a, info_a = llama_byte.train(steps=3, progress=False)
    b, info_b = llama_byte.train(steps=3, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert info_a["val_perplexity"] == info_b["val_perplexity"]
    assert info_a["corpus_fingerprint"] == info_b["corpus_fingerprint"]


def test_build_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llama_byte.train(steps=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_architecture_is_about_one_million_parameters():
    with torch.device("meta"):
        model = llama_byte.build_empty()
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.2e6


def test_cache_builds_once_and_is_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path))
    calls = []
    member = zoo.MEMBERS[llama_byte.NAME]

    def quick_train(progress=True):
        calls.append(1)
        return llama_byte.train(steps=2, progress=False)

    monkeypatch.setitem(zoo.MEMBERS, llama_byte.NAME, dataclasses.replace(member, train=quick_train))
    first, tokenizer = zoo.load_zoo_model(llama_byte.NAME, progress=False)
    second, _ = zoo.load_zoo_model(llama_byte.NAME, progress=False)
    assert calls == [1]
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    key_dir = zoo.cache_dir(zoo.MEMBERS[llama_byte.NAME])
    assert key_dir.parent == tmp_path / "zoo" / llama_byte.NAME
    assert key_dir.name.startswith(f"v{llama_byte.BUILDER_VERSION}-py")
    assert (key_dir / "build.json").is_file() and tokenizer.encode("é") == [195, 169]
    assert [p.name for p in key_dir.parent.iterdir()] == [key_dir.name]  # no temporary build left behind


def test_unknown_member():
    with pytest.raises(CompressxError, match="unknown zoo model 'llama_byte'.*did you mean 'llama_byte_1m'"):
        zoo.get_member("llama_byte")
