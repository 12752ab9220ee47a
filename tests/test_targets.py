import pytest
import torch.nn as nn

from compressx.errors import TargetError
from compressx.targets import match_modules, select_targets

LINEAR = (nn.Linear,)


def names(model, targets=None, ignore=None, types=LINEAR):
    return list(select_targets(model, targets, ignore, types))


def test_whole_model_by_default_in_model_order(tiny_llama):
    chosen = names(tiny_llama)
    assert chosen[0] == "model.layers.0.self_attn.q_proj"
    assert chosen[-1] == "lm_head"
    assert len(chosen) == 2 * 7 + 1


def test_exact_name_and_container_expands(tiny_llama):
    assert names(tiny_llama, ["lm_head"]) == ["lm_head"]
    assert names(tiny_llama, ["model.layers.1.mlp"]) == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_regex_glob_and_class_name(tiny_llama):
    mlp = names(tiny_llama, ["re:.*mlp.*"])
    assert len(mlp) == 6 and all(".mlp." in n for n in mlp)
    assert names(tiny_llama, ["model.layers.*.self_attn.q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    by_class = names(tiny_llama, ["LlamaMLP"])
    assert by_class == mlp


def test_ignore_removes_module_and_its_children(tiny_llama):
    chosen = names(tiny_llama, ignore=["lm_head", "model.layers.0"])
    assert "lm_head" not in chosen
    assert not any(n.startswith("model.layers.0.") for n in chosen)
    assert len(chosen) == 7


def test_pattern_matching_nothing_is_an_error_with_suggestion(tiny_llama):
    with pytest.raises(TargetError) as err:
        names(tiny_llama, ["model.layer.0.mlp"])
    assert "targets[0]" in str(err.value) and "matches no module" in str(err.value)
    assert "did you mean 'model.layers.0.mlp'?" in str(err.value)
    with pytest.raises(TargetError, match=r"ignore\[1\]"):
        names(tiny_llama, ignore=["lm_head", "re:.*nothing.*"])


def test_empty_selection_after_ignore_is_an_error(tiny_llama):
    with pytest.raises(TargetError, match="no module of a supported type.*once 'ignore'"):
        names(tiny_llama, ["lm_head"], ["lm_head"])
    with pytest.raises(TargetError, match=r"supported type \(Conv2d\)"):
        names(tiny_llama, types=(nn.Conv2d,))


def test_bad_regex_is_reported(tiny_llama):
    with pytest.raises(TargetError, match="bad regex"):
        match_modules(tiny_llama, ["re:(["])
