"""compressx.checkpoint: atomic safetensors+JSON checkpoints in a directory compressx owns; the trainer's
bit-identical resume (a run interrupted after an epoch, then resumed, ends with the uninterrupted run's weights)."""

import json
import os
import random

import numpy as np
import pytest
import torch

import compressx
from compressx.builtin_trainer import parse_train_spec, train
from compressx.checkpoint import MARKER, CheckpointDir, join_tensors, parse_checkpoint_spec, split_tensors
from compressx.errors import CheckpointError, ConfigError
from compressx.zoo.resnet_digits import build_empty

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_and_join_rebuild_optimizer_and_rng_states_exactly():
    value = {
        "state": {0: {"momentum_buffer": torch.arange(3.0), "step": torch.tensor(2.0)}, 1: {"momentum_buffer": None}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1]}],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    tensors = {}
    encoded = split_tensors(value, "x.", tensors)
    decoded = join_tensors(json.loads(json.dumps(encoded)), tensors)  # through real JSON
    assert set(decoded["state"]) == {0, 1} and decoded["state"][1] == {"momentum_buffer": None}
    assert torch.equal(decoded["state"][0]["momentum_buffer"], torch.arange(3.0))
    assert decoded["param_groups"][0]["betas"] == (0.9, 0.999)
    random.setstate(decoded["python"])  # needs tuples back
    np.random.set_state(decoded["numpy"])
    assert decoded["numpy"][1].dtype == np.uint32
    with pytest.raises(CheckpointError, match="cannot checkpoint a object"):
        split_tensors({"x": object()}, "", {})


@pytest.mark.parametrize(
    "block, fragment",
    [
        ({"dir": "d", "evry": 2}, "unknown key 'evry'"),
        ({"dir": ""}, "dir: got ''"),
        ({"every": 2}, "dir: got None"),
        ({"dir": "d", "every": 0}, "every: got 0; expected an integer >= 1"),
        ({"dir": "d", "every": True}, "every: got True"),
        ("ckpt", "expected a mapping"),
    ],
)
def test_bad_checkpoint_blocks_are_one_clear_error(block, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        parse_checkpoint_spec(block)
    with pytest.raises(ConfigError, match="checkpoint"):
        parse_train_spec({"data": {"source": "digits", "split": "train"}, "epochs": 2, "checkpoint": block})


def test_a_directory_compressx_did_not_create_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a compressx checkpoint directory"):
        CheckpointDir(foreign, {"a": "1"}).open(resume=True)
    assert os.listdir(foreign) == ["chapter1.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointDir(tmp_path / "file", {"a": "1"}).open(resume=False)


def test_entries_are_atomic_verified_and_guarded_by_the_fingerprint(tmp_path):
    store = CheckpointDir(tmp_path / "ckpt", {"model": "m", "steps": "s"})
    store.open(resume=False)
    assert json.loads((tmp_path / "ckpt" / MARKER).read_text())["fingerprint"] == {"model": "m", "steps": "s"}
    store.write("epoch-0000", {"w": torch.ones(2)}, {"epoch": 0})
    (tmp_path / "ckpt" / ".tmp-epoch-0001-999").mkdir()  # what a write killed before its rename leaves
    tensors, state = store.read("epoch-0000")
    assert torch.equal(tensors["w"], torch.ones(2)) and state == {"epoch": 0}
    assert sorted(os.listdir(tmp_path / "ckpt" / "epoch-0000")) == ["state.json", "tensors.safetensors"]

    with pytest.raises(CheckpointError, match="pass --resume"):
        CheckpointDir(tmp_path / "ckpt", {"model": "m", "steps": "s"}).open(resume=False)
    with pytest.raises(CheckpointError, match="recipe block\\(s\\) steps differ from that run's"):
        CheckpointDir(tmp_path / "ckpt", {"model": "m", "steps": "other"}).open(resume=True)
    again = CheckpointDir(tmp_path / "ckpt", {"model": "m", "steps": "s"})
    again.open(resume=True)
    assert again.entries() == ["epoch-0000"] and not (tmp_path / "ckpt" / ".tmp-epoch-0001-999").exists()

    tensors_file = tmp_path / "ckpt" / "epoch-0000" / "tensors.safetensors"
    tensors_file.write_bytes(tensors_file.read_bytes()[:-1] + b"\x01")
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        again.read("epoch-0000")


def test_only_what_compressx_wrote_is_listed_or_deleted(tmp_path):
    store = CheckpointDir(tmp_path / "ckpt", {"a": "1"})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / f".{MARKER}.tmp-77").write_text("{")  # a kill during the very first open left this
    store.open(resume=False)  # still compressx's directory; the leftover goes
    assert sorted(os.listdir(tmp_path / "ckpt")) == [MARKER]
    user = tmp_path / "ckpt" / "epoch-0000"  # named like an entry, but holding a user's file
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "ckpt" / ".tmp-epoch-0001-5").mkdir()
    (tmp_path / "ckpt" / ".tmp-epoch-0001-5" / "notes.txt").write_text("mine too")
    assert store.entries() == []
    store.remove("epoch-0000")
    store.write("epoch-0002", {"w": torch.zeros(1)}, {})
    CheckpointDir(tmp_path / "ckpt", {"a": "1"}).open(resume=True)
    assert (user / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ckpt" / ".tmp-epoch-0001-5" / "notes.txt").exists()
    assert store.entries() == ["epoch-0002"]


SMALL = {
    "data": {"source": "digits", "split": "train", "train_images": 100},
    "epochs": 4,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
}


class Crash(Exception):
    pass


class CrashAt:
    """A stand-in handle that raises at the start of ``epoch``: the run dies after the previous epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise Crash(epoch)


def _lbc_run(spec, crash_at=None, resume=False):
    torch.manual_seed(0)
    model = build_empty()
    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 2})
    summary = train(model, spec, [handle, CrashAt(crash_at)], progress=False, resume=resume)
    return model, handle, summary


@pytest.mark.parametrize("every, crash_at", [(1, 2), (2, 3)])
def test_training_resumed_after_a_crash_is_bit_identical(tmp_path, every, crash_at):
    reference, reference_handle, reference_summary = _lbc_run(parse_train_spec(SMALL))
    spec = parse_train_spec({**SMALL, "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": every}})
    with pytest.raises(Crash):
        _lbc_run(spec, crash_at=crash_at)
    assert CheckpointDir(tmp_path / "ckpt", {}).entries() == ["epoch-0001"]  # the last complete one, alone
    resumed, resumed_handle, summary = _lbc_run(spec, resume=True)
    assert summary["resumed_after_epoch"] == 1
    assert summary["history"] == reference_summary["history"]  # losses of epochs 0-1 restored, 2-3 recomputed
    assert resumed_handle.history == reference_handle.history and resumed_handle.epoch == 3
    reference_state, resumed_state = reference.state_dict(), resumed.state_dict()
    assert set(reference_state) == set(resumed_state)
    for key, value in reference_state.items():  # weights, LBC scores and candidate masks, BN statistics
        assert torch.equal(value, resumed_state[key]), key
    assert CheckpointDir(tmp_path / "ckpt", {}).entries() == ["epoch-0003"]
    # Resuming a finished run trains no more and gives the same model (e.g. after a crash during the export).
    again, again_handle, again_summary = _lbc_run(spec, resume=True)
    assert again_summary["resumed_after_epoch"] == 3 and again_summary["history"] == reference_summary["history"]
    assert again_handle.history == reference_handle.history
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reference_state.items())


def test_the_comparison_catches_a_resume_that_loses_the_data_order(tmp_path):
    """The bit-for-bit check above can fail: resumed with the data loader's generator reset to its seed (as a
    resume that does not save it would be), the run ends with other weights."""
    reference, _, _ = _lbc_run(parse_train_spec(SMALL))
    spec = parse_train_spec({**SMALL, "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    with pytest.raises(Crash):
        _lbc_run(spec, crash_at=2)
    store = CheckpointDir(tmp_path / "ckpt", {})
    tensors, state = store.read("epoch-0001")
    (generator,) = state["rng"]["generators"]
    tensors[generator["__tensor__"]] = torch.Generator().manual_seed(0).get_state()
    store.write("epoch-0001", tensors, state)
    resumed, _, _ = _lbc_run(spec, resume=True)
    assert not torch.equal(reference.fc.weight, resumed.fc.weight)


def test_resume_refuses_a_checkpoint_of_other_model_weights(tmp_path):
    spec = parse_train_spec({**SMALL, "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    with pytest.raises(Crash):
        _lbc_run(spec, crash_at=1)
    torch.manual_seed(1)  # another init
    model = build_empty()
    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 2})
    with pytest.raises(CheckpointError, match="started from other model weights"):
        train(model, spec, [handle, CrashAt(None)], progress=False, resume=True)
    other = parse_train_spec({**SMALL, "seed": 3, "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    with pytest.raises(CheckpointError, match="recipe block\\(s\\) train differ"):
        _lbc_run(other, resume=True)


# Layer-by-layer calibration: a run killed after layer k, resumed, gives the uninterrupted run's masks.


def _llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


TOKENS = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
LAYERWISE = {
    "wanda": [{"pass": "wanda", "config": {"sparsity": 0.5, "batch_size": 4}}],
    "sparsegpt": [{"pass": "sparsegpt", "config": {"sparsity": 0.5, "batch_size": 4}}],
    "dsnot after magnitude": [
        {"pass": "magnitude", "config": {"sparsity": 0.5}, "ignore": ["lm_head"]},
        {"pass": "dsnot", "config": {"init": "previous", "refine_mlp": True, "batch_size": 4}},
    ],
}


def _layerwise_run(steps, store=None, resume=False, crash_layer=None, tokens=TOKENS):
    model = _llama()
    layers = model.model.layers
    hooks = []
    if crash_layer is not None:  # dies at the first forward of that layer: after the previous layer was saved

        def crash(module, args):
            raise Crash(crash_layer)

        hooks.append(layers[crash_layer].register_forward_pre_hook(crash))
    calls = []
    hooks.append(layers[0].register_forward_pre_hook(lambda module, args: calls.append(1)))
    try:
        result = compressx.apply(model, steps, tokens, progress=False, checkpoint=store, resume=resume)
    finally:
        for hook in hooks:
            hook.remove()
    return model, result, len(calls)


def _store(path, resume):
    store = CheckpointDir(path, {"steps": "s"})
    store.open(resume)
    return store


@pytest.mark.parametrize("name", list(LAYERWISE))
def test_layerwise_resumed_after_a_crash_gives_the_same_masks_and_report(tmp_path, name):
    steps = LAYERWISE[name]
    reference, reference_result, reference_calls = _layerwise_run(steps)
    with pytest.raises(Crash):
        _layerwise_run(steps, _store(tmp_path / "ckpt", False), crash_layer=2)
    step = len(steps) - 1
    names = [f"step-{step:02d}-layer-{layer:04d}" for layer in (0, 1)]
    assert CheckpointDir(tmp_path / "ckpt", {}).entries() == names
    resumed, result, calls = _layerwise_run(steps, _store(tmp_path / "ckpt", True), resume=True)
    # Layer 0 ran once per batch (its saved weights give the next inputs), not twice (calibrate, then output).
    assert calls == reference_calls - 2
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert result.report() == reference_result.report()  # DSnoT's per-layer refinement report included
    assert len(CheckpointDir(tmp_path / "ckpt", {}).entries(f"step-{step:02d}-layer-")) == 4


def test_layerwise_resume_refuses_layers_of_other_data_or_config(tmp_path):
    steps = LAYERWISE["wanda"]
    with pytest.raises(Crash):
        _layerwise_run(steps, _store(tmp_path / "ckpt", False), crash_layer=2)
    with pytest.raises(CheckpointError, match="another model, calibration data or step config"):
        _layerwise_run(steps, _store(tmp_path / "ckpt", True), resume=True, tokens=TOKENS.flip(0))
    other = [{"pass": "wanda", "config": {"sparsity": 0.6, "batch_size": 4}}]
    with pytest.raises(CheckpointError, match="another model, calibration data or step config"):
        _layerwise_run(other, _store(tmp_path / "ckpt", True), resume=True)


def test_layerwise_resume_on_a_disk_offloaded_model(tmp_path):
    """Saved layers are read while offloaded, and restored ones are written back to the offload storage."""
    from accelerate import disk_offload
    from test_offload import weights

    steps = LAYERWISE["sparsegpt"]
    expected = weights(_layerwise_run(steps)[0])

    def offloaded_run(store, resume, crash_layer=None, folder="off"):
        model = disk_offload(_llama(), str(tmp_path / folder), execution_device=torch.device("cpu"))
        hook = None
        if crash_layer is not None:

            def crash(module, args):
                raise Crash(crash_layer)

            hook = model.model.layers[crash_layer].register_forward_pre_hook(crash)
        try:
            compressx.apply(model, steps, TOKENS, progress=False, checkpoint=store, resume=resume)
        finally:
            if hook is not None:
                hook.remove()
        return model

    with pytest.raises(Crash):
        offloaded_run(_store(tmp_path / "ckpt", False), False, crash_layer=3)
    resumed = offloaded_run(_store(tmp_path / "ckpt", True), True, folder="off2")
    assert resumed.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded
    got = weights(resumed)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
