import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

import compressx
from compressx import export as export_mod
from compressx.config import PassConfig
from compressx.errors import ExportError
from compressx.registry import PassResult, register_pass
from compressx.sparse_export import sparsity_entry

PRUNE = [{"pass": "magnitude", "config": {"sparsity": 0.5}, "ignore": ["lm_head"]}]


def _logits(model, seed=0):
    torch.manual_seed(seed)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        return model(input_ids=x).logits


def test_round_trip_gives_bit_identical_logits(tiny_llama, tmp_path):
    result = compressx.apply(tiny_llama, PRUNE)
    out = compressx.save(tiny_llama, tmp_path / "exp", result)
    loaded = compressx.load(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(_logits(tiny_llama), _logits(loaded))
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_manifest_contents(tiny_llama, tmp_path):
    result = compressx.apply(tiny_llama, PRUNE)
    compressx.save(tiny_llama, tmp_path / "exp", result, eval_results={"before": {"m": 1.0}, "after": {"m": 2.0}})
    manifest = compressx.read_manifest(tmp_path / "exp")
    assert manifest["format_version"] == 1
    assert set(manifest["versions"]) == {"compressx", "torch", "transformers"}
    step = manifest["steps"][0]
    assert step["pass"] == "magnitude" and step["kind"] == "weights"
    assert step["config"] == {"sparsity": 0.5, "pattern": "unstructured", "scope": "layer"}
    assert step["report"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(step["targets"]) == 14
    assert manifest["eval"] == {"before": {"m": 1.0}, "after": {"m": 2.0}}
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert manifest["reapply"] == []
    assert (tmp_path / "exp" / "README.md").read_text().count("magnitude") >= 1


def test_corrupt_weight_file_is_refused(tiny_llama, tmp_path):
    out = compressx.save(tiny_llama, tmp_path / "exp")
    weights = tmp_path / "exp" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte deep in a tensor: the file still parses, the hash catches it
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="'model.safetensors' is corrupt"):
        compressx.load(out)


def test_missing_file_and_bad_manifest_are_refused(tiny_llama, tmp_path):
    out = compressx.save(tiny_llama, tmp_path / "exp")
    os.remove(tmp_path / "exp" / "config.json")
    with pytest.raises(ExportError, match="'config.json' listed in compressx.json is missing"):
        compressx.load(out)
    manifest_path = tmp_path / "exp" / "compressx.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ExportError, match="unknown format_version 99; this compressx reads version 1"):
        compressx.load(out)
    manifest_path.write_text("{not json")
    with pytest.raises(ExportError, match="unreadable"):
        compressx.load(out)
    with pytest.raises(ExportError, match="not a compressx export"):
        compressx.load(tmp_path)


def test_existing_target_needs_overwrite(tiny_llama, tmp_path):
    compressx.save(tiny_llama, tmp_path / "exp")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        compressx.save(tiny_llama, tmp_path / "exp")
    compressx.save(tiny_llama, tmp_path / "exp", overwrite=True, sparse_format="bitmask")
    assert (tmp_path / "exp" / "sparse.safetensors").is_file()
    # A file an older export wrote (listed in its manifest) and the new one does not is gone: a stale file.
    # (A file the manifest does not list is refused instead: tests/test_export_safety.py.)
    compressx.save(tiny_llama, tmp_path / "exp", overwrite=True)
    assert not (tmp_path / "exp" / "sparse.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary directories left


def test_interrupted_export_leaves_nothing_at_target(tiny_llama, tmp_path, monkeypatch):
    def crash(manifest):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the model card is written, after the weights

    monkeypatch.setattr(export_mod, "_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        compressx.save(tiny_llama, tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_export(tiny_llama, tmp_path, monkeypatch):
    compressx.save(tiny_llama, tmp_path / "exp")
    before = (tmp_path / "exp" / "compressx.json").read_text()
    monkeypatch.setattr(export_mod, "_model_card", lambda manifest: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        compressx.save(tiny_llama, tmp_path / "exp", overwrite=True)
    assert (tmp_path / "exp" / "compressx.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_unwritable_export_dir_is_one_clear_error(tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write the export under"):
        compressx.save(tiny_llama, blocker / "exp")


def test_plain_module_round_trip(tiny_cnn, tmp_path):
    from conftest import TinyCNN

    result = compressx.apply(tiny_cnn, [{"pass": "magnitude", "config": {"pattern": "2:4"}, "ignore": ["stem"]}])
    compressx.save(tiny_cnn, tmp_path / "cnn", result)
    with pytest.raises(ExportError, match=r"plain torch module \(conftest.TinyCNN\); pass model="):
        compressx.load(tmp_path / "cnn")
    loaded = compressx.load(tmp_path / "cnn", model=TinyCNN())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(tiny_cnn(x), loaded(x))


def test_timm_model_round_trip(tmp_path):
    from compressx.models import build_model
    from compressx.recipe import parse_recipe

    spec = {
        "source": "timm",
        "id": "vit_tiny_patch16_224",
        "pretrained": False,
        "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2},
    }
    recipe = parse_recipe(
        {"model": spec, "steps": [{"pass": "magnitude", "config": {"pattern": "2:4"}, "ignore": ["patch_embed.proj"]}]}
    )
    model = build_model(recipe.model).model
    result = compressx.apply(model, recipe.steps)
    compressx.save(model, tmp_path / "vit", result, recipe=recipe)
    loaded = compressx.load(tmp_path / "vit")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert (tmp_path / "vit" / "recipe.yaml").is_file()


# A runtime pass: it changes forward (through a hook), not the weights, and must be re-applied on load.
@dataclasses.dataclass(frozen=True)
class ScaleLogitsConfig(PassConfig):
    factor: float = 2.0


@register_pass(
    "scale_logits",
    config=ScaleLogitsConfig,
    kind="runtime",
    paper="test",
    families=("llm",),
    target_types=(nn.Linear,),
)
def apply_scale_logits(model, config, ctx):
    handles = [m.register_forward_hook(lambda mod, inp, out: out * config.factor) for m in ctx.targets.values()]
    return PassResult(
        report={"hooked": len(handles)}, handle=handles, reapply_config=ScaleLogitsConfig(factor=config.factor)
    )


@pytest.fixture
def with_runtime_pass(monkeypatch):
    from compressx import registry

    table = dict(registry._registry(), scale_logits=registry.spec_of(apply_scale_logits))
    monkeypatch.setattr(registry, "_registry", lambda: table)


def test_runtime_pass_is_reapplied_on_load(tiny_llama, tmp_path, with_runtime_pass):
    plain = _logits(tiny_llama)
    result = compressx.apply(tiny_llama, [{"pass": "scale_logits", "config": {"factor": 3.0}, "targets": ["lm_head"]}])
    assert torch.allclose(_logits(tiny_llama), plain * 3.0)
    compressx.save(tiny_llama, tmp_path / "rt", result)
    manifest = compressx.read_manifest(tmp_path / "rt")
    assert manifest["reapply"] == [
        {"pass": "scale_logits", "config": {"factor": 3.0}, "config_version": 1, "targets": ["lm_head"]}
    ]
    loaded = compressx.load(tmp_path / "rt")
    assert torch.equal(_logits(loaded), _logits(tiny_llama))


def test_runtime_pass_with_newer_config_version_is_refused(tiny_llama, tmp_path, with_runtime_pass):
    result = compressx.apply(tiny_llama, [{"pass": "scale_logits", "targets": ["lm_head"]}])
    compressx.save(tiny_llama, tmp_path / "rt", result)
    path = tmp_path / "rt" / "compressx.json"
    manifest = json.loads(path.read_text())
    manifest["reapply"][0]["config_version"] = 7
    path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="config version 7 in the export, but the installed pass reads version 1"):
        compressx.load(tmp_path / "rt")


# Sparsity record and the bitmask-packed sparse weights.
PRUNE_2_4 = [{"pass": "magnitude", "config": {"pattern": "2:4"}, "ignore": ["lm_head"]}]


def test_bitmask_export_of_a_2_4_model(tiny_llama, tmp_path):
    result = compressx.apply(tiny_llama, PRUNE_2_4)
    out = compressx.save(tiny_llama, tmp_path / "exp", result, sparse_format="bitmask")
    manifest = compressx.read_manifest(out)
    pruned = set(result.steps[0].targets)
    assert {name.removesuffix(".weight") for name in manifest["sparsity"]} == pruned  # no lm_head, no embedding
    assert "lm_head" not in pruned
    assert all(entry == {"sparsity": 0.5, "pattern": "2:4"} for entry in manifest["sparsity"].values())

    state = tiny_llama.state_dict()
    packed = manifest["sparse_format"]
    size = (tmp_path / "exp" / "sparse.safetensors").stat().st_size
    dense = sum(state[name].numel() * state[name].element_size() for name in manifest["sparsity"])
    assert packed == {
        "format": "bitmask",
        "file": "sparse.safetensors",
        "bytes": size,
        "dense_bytes": dense,
        "ratio": round(size / dense, 6),
    }
    assert packed["ratio"] < 1
    assert "sparse.safetensors" in manifest["files"]

    unpacked = export_mod.load_sparse_state_dict(out)
    assert set(unpacked) == set(manifest["sparsity"])
    for name, tensor in unpacked.items():
        assert tensor.dtype == state[name].dtype and tensor.shape == state[name].shape
        assert torch.equal(tensor.view(torch.int32), state[name].view(torch.int32)), name  # bits, -0.0 included
    # the dense weights are still the loadable export
    assert torch.equal(_logits(compressx.load(out)), _logits(tiny_llama))


def test_corrupt_packed_file_is_refused(tiny_llama, tmp_path):
    compressx.apply(tiny_llama, PRUNE_2_4)
    out = compressx.save(tiny_llama, tmp_path / "exp", sparse_format="bitmask")
    packed = tmp_path / "exp" / "sparse.safetensors"
    data = bytearray(packed.read_bytes())
    data[-3] ^= 0x01
    packed.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="'sparse.safetensors' is corrupt"):
        compressx.load(out)
    with pytest.raises(ExportError, match="'sparse.safetensors' is corrupt"):
        export_mod.load_sparse_state_dict(out)


def test_unstructured_sparsity_record_without_packing(tiny_llama, tmp_path):
    result = compressx.apply(tiny_llama, PRUNE)  # 50% unstructured magnitude, per layer
    out = compressx.save(tiny_llama, tmp_path / "exp", result)
    manifest = compressx.read_manifest(out)
    assert len(manifest["sparsity"]) == 14
    assert all(entry == {"sparsity": 0.5, "pattern": "unstructured"} for entry in manifest["sparsity"].values())
    assert "sparse_format" not in manifest and not (tmp_path / "exp" / "sparse.safetensors").exists()
    with pytest.raises(ExportError, match="no packed sparse weights.*sparse_format='bitmask'"):
        export_mod.load_sparse_state_dict(out)


def test_unpruned_model_has_an_empty_sparsity_record(tiny_llama, tmp_path):
    compressx.save(tiny_llama, tmp_path / "exp")
    assert compressx.read_manifest(tmp_path / "exp")["sparsity"] == {}


@pytest.mark.parametrize(
    "keep, pattern",
    [
        ([1, 0, 0, 0], "1:4"),
        ([1, 0, 0, 0, 0, 0, 0, 0], "1:8"),
        ([1, 1, 0, 0, 0, 0, 0, 0], "2:8"),
        ([1, 0, 1, 0], "2:4"),
        ([1, 1, 0, 0, 1, 0, 1, 0], "2:4"),
        ([1, 1, 1, 0, 0, 0, 1, 0], "4:8"),
        ([1, 1, 1, 0, 0, 0, 0, 0], "unstructured"),  # 3:8 is not a standard pattern
        ([1, 1, 1, 1, 0, 0, 0, 0], "4:8"),  # not 2:4: the first 4-block keeps 4
    ],
)
def test_sparsity_entry_names_the_tightest_exact_pattern(keep, pattern):
    weight = torch.randn(4, 16).abs() + 1
    weight *= torch.tensor(keep * (16 // len(keep)), dtype=torch.float32)
    expected_sparsity = round(1 - sum(keep) / len(keep), 6)
    assert sparsity_entry(weight) == {"sparsity": expected_sparsity, "pattern": pattern}


def test_sparsity_entry_extra_zeros_and_convs():
    weight = torch.randn(4, 16).abs() + 1
    weight *= torch.tensor([1, 0, 1, 0] * 4)
    weight[0, 0] = 0  # 2:4 still holds, but the sparsity is no longer exactly 1/2
    assert sparsity_entry(weight) == {"sparsity": round(33 / 64, 6), "pattern": "unstructured"}
    # convs: blocks run along input channels (OHWI), so a 2:4 mask over dim 1 reads as 2:4
    conv = torch.randn(2, 8, 3, 3).abs() + 1
    conv *= torch.tensor([1, 0, 0, 1] * 2).view(1, 8, 1, 1)
    assert sparsity_entry(conv) == {"sparsity": 0.5, "pattern": "2:4"}
    assert sparsity_entry(conv.transpose(1, 2)) == {"sparsity": 0.5, "pattern": "unstructured"}


def test_plain_module_bitmask_round_trip(tiny_cnn, tmp_path):
    result = compressx.apply(tiny_cnn, [{"pass": "magnitude", "config": {"pattern": "2:4"}, "ignore": ["stem"]}])
    out = compressx.save(tiny_cnn, tmp_path / "cnn", result, sparse_format="bitmask")
    record = compressx.read_manifest(out)["sparsity"]
    assert record == {
        name: {"sparsity": 0.5, "pattern": "2:4"} for name in ["body.0.weight", "body.2.weight", "head.weight"]
    }
    unpacked = export_mod.load_sparse_state_dict(out)
    state = tiny_cnn.state_dict()
    assert all(torch.equal(t.view(torch.int32), state[n].view(torch.int32)) for n, t in unpacked.items())


def test_unknown_sparse_format_is_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="sparse_format 'zip' is unknown; allowed: none, bitmask"):
        compressx.save(tiny_llama, tmp_path / "exp", sparse_format="zip")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_bitmask_export_leaves_nothing_at_target(tiny_llama, tmp_path, monkeypatch):
    compressx.apply(tiny_llama, PRUNE_2_4)

    def crash(manifest):
        (partial,) = tmp_path.glob(".exp.partial-*")  # the packed file is written there, not at the target
        assert (partial / "sparse.safetensors").is_file() and not (tmp_path / "exp").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        compressx.save(tiny_llama, tmp_path / "exp", sparse_format="bitmask")
    assert list(tmp_path.iterdir()) == []


def test_show_prints_the_sparsity_and_packed_sizes(tiny_llama, tmp_path):
    from compressx.cli import _show_manifest

    result = compressx.apply(tiny_llama, PRUNE_2_4)
    out = compressx.save(tiny_llama, tmp_path / "exp", result, sparse_format="bitmask")
    manifest = compressx.read_manifest(out)
    packed = manifest["sparse_format"]
    text = _show_manifest(out, manifest)
    line = next(line for line in text.splitlines() if line.startswith("sparsity:"))
    assert line == (
        "sparsity: 14 weight tensor(s) with zeros (2:4 ×14), zero fraction 0.5; packed (bitmask): "
        f"sparse.safetensors {packed['bytes']:,} bytes vs {packed['dense_bytes']:,} dense "
        f"(ratio {packed['ratio']:.3f})"
    )
    plain = compressx.save(tiny_llama, tmp_path / "plain")
    assert "sparsity: 14 weight tensor(s) with zeros (2:4 ×14), zero fraction 0.5\n" in _show_manifest(
        plain, compressx.read_manifest(plain)
    )


def test_recipe_export_sparse_format_reaches_save(tiny_llama, tmp_path):
    from compressx.recipe import parse_recipe

    tiny_llama.save_pretrained(tmp_path / "base")
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": str(tmp_path / "base")},
            "steps": PRUNE_2_4,
            "export": {"dir": str(tmp_path / "exp"), "sparse_format": "bitmask"},
        }
    )
    run = compressx.run_recipe(recipe, progress=False)
    assert compressx.read_manifest(run.export_dir)["sparse_format"]["format"] == "bitmask"
    assert set(export_mod.load_sparse_state_dict(run.export_dir)) == set(
        compressx.read_manifest(run.export_dir)["sparsity"]
    )


def test_save_refuses_any_in_training_module(tmp_path):
    """The refusal is a class check (``InTrainingModule``), so a plugin's training module is covered too."""
    from compressx.training import InTrainingModule

    class PluginMask(InTrainingModule):
        def forward(self, weight):
            return weight

    model = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", PluginMask())
    with pytest.raises(ExportError, match=r"still holds training-pass modules \(PluginMask\)"):
        compressx.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
