import dataclasses
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from compressx import zoo
from compressx.errors import CompressxError
from compressx.zoo import llama_byte, llama_byte_outlier


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


@pytest.fixture(scope="module")
def outlier_builds():
    """Two 3-step builds of llama_byte_outlier_1m, shared by the tests below (each build takes seconds)."""
    return llama_byte_outlier.train(steps=3, progress=False), llama_byte_outlier.train(steps=3, progress=False)


def test_outlier_build_is_deterministic(outlier_builds):
    (a, info_a), (b, info_b) = outlier_builds
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert info_a == {**info_b, "build_seconds": info_a["build_seconds"]}


def test_outlier_build_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llama_byte_outlier.train(steps=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_outlier_gains_stay_fixed_while_the_rest_trains(outlier_builds, tmp_path):
    (model, info), _ = outlier_builds
    channels = llama_byte_outlier.outlier_channels()
    assert info["outliers"]["channels"] == channels and len(set(channels)) == 4
    assert info["outliers"]["gain"] == llama_byte_outlier.OUTLIERS["gain"] == 20.0
    gains = llama_byte_outlier.outlier_gains(model)
    assert len(gains) == 2 * model.config.num_hidden_layers
    others = [c for c in range(model.config.hidden_size) if c not in channels]
    for weight in gains:
        assert torch.equal(weight[channels], torch.full((4,), 20.0))
        assert not torch.equal(weight[others], torch.ones(len(others)))  # the other gains did train
    # a plain LlamaForCausalLM checkpoint: the outlier gains are ordinary weights
    model.save_pretrained(tmp_path)
    loaded = llama_byte_outlier.load(str(tmp_path))
    assert type(loaded) is LlamaForCausalLM
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_outlier_ratio_is_much_larger_than_llama_byte(outlier_builds):
    (model, info), _ = outlier_builds
    _, val = llama_byte._data()
    base, _ = llama_byte.train(steps=3, progress=False)
    base_ratio = llama_byte_outlier.outlier_ratio(base, val)
    ratio = llama_byte_outlier.outlier_ratio(model, val)
    assert info["val_outlier_ratio"] == round(ratio, 3)
    assert base_ratio < 5 and ratio > 5 * base_ratio, (ratio, base_ratio)


def test_outlier_member_is_registered_and_builds_on_meta():
    member = zoo.get_member(llama_byte_outlier.NAME)
    assert member.name == "llama_byte_outlier_1m" and member.family == "llm"
    assert member.train is llama_byte_outlier.train
    with torch.device("meta"):
        model = member.build_empty()
    assert type(model) is LlamaForCausalLM
    assert all(p.is_meta for p in model.parameters())
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    assert zoo.cache_dir(member).parent.name == llama_byte_outlier.NAME


def test_resnet_digits_is_registered_and_builds_on_meta():
    from compressx.models import build_model, parse_model_spec
    from compressx.zoo import resnet_digits

    member = zoo.get_member(resnet_digits.NAME)
    assert member.name == "resnet_digits" and member.family == "cnn" and member.tokenizer() is None
    assert member.build_empty is resnet_digits.build_empty and member.train is resnet_digits.train
    loaded = build_model(parse_model_spec({"source": "zoo", "id": "resnet_digits"}), meta=True)
    assert type(loaded.model) is resnet_digits.ResNetDigits and loaded.family == "cnn"
    assert all(p.is_meta for p in loaded.model.parameters())
    assert 60_000 < sum(p.numel() for p in loaded.model.parameters()) < 90_000
    assert loaded.model(torch.zeros(2, 1, 8, 8, device="meta")).shape == (2, 10)


def test_resnet_digits_from_scratch_is_seeded_by_the_global_rng(tmp_path, monkeypatch):
    from compressx.models import build_model, parse_model_spec

    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path))
    spec = parse_model_spec({"source": "zoo", "id": "resnet_digits", "pretrained": False})
    assert spec.to_dict()["pretrained"] is False

    def build(seed):
        torch.manual_seed(seed)
        return build_model(spec, progress=False)

    a, b, c = build(0), build(0), build(1)
    assert a.family == "cnn" and a.tokenizer is None
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)
    assert not torch.equal(a.model.layer2.conv2.weight, c.model.layer2.conv2.weight)
    assert not (tmp_path / "zoo").exists()  # nothing built or cached: a fresh init only


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the build trains 30 epochs: ~10 s on one thread, minutes on two
def test_resnet_digits_dense_build_is_cached_and_accurate(zoo_cache, monkeypatch):
    from compressx.images import parse_image_data_spec, top1
    from compressx.zoo import resnet_digits

    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model, tokenizer = zoo.load_zoo_model(resnet_digits.NAME, progress=False)  # builds on first use
    assert torch.equal(torch.rand(3), expected)  # the build leaves the caller's RNG alone
    assert tokenizer is None and type(model) is resnet_digits.ResNetDigits and not model.training
    key_dir = zoo.cache_dir(zoo.get_member(resnet_digits.NAME))
    info = json.loads((key_dir / "build.json").read_text())
    assert info["test_top1"] > 90
    test = parse_image_data_spec({"source": "digits", "split": "test"})
    assert top1(model, test) == pytest.approx(info["test_top1"], abs=1e-3)
    again, _ = zoo.load_zoo_model(resnet_digits.NAME, progress=False)
    for (name, x), y in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(x, y), name
