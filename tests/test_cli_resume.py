"""`compressx apply --resume` end to end: a run SIGKILLed mid-training (or mid-way through layer-by-layer pruning)
and resumed exports the same weights, bit for bit, as a run never interrupted; and the refusals (no checkpoint
configured, a directory compressx did not create, checkpoints of another recipe, checkpoints without --resume)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_hf_llama
from safetensors.torch import load_file

import compressx
from compressx.checkpoint import CheckpointDir
from compressx.cli import main

ROOT = Path(__file__).resolve().parents[1]
LBC = str(ROOT / "recipes" / "cnn" / "lbc_resnet_digits.yaml")
QUICK = ["train.epochs=4", "steps.0.config.end_epoch=2", "train.data.train_images=200"]

# Runs the CLI with one function replaced by one that SIGKILLs the process at its N-th call: a real kill at a
# chosen point (mid-epoch, mid-way through the layers), with no test hook in compressx itself.
KILLER = """
import os, signal, sys
import importlib
module_name, function, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
original, calls = getattr(module, function), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(module, function, killing)
from compressx.cli import main
sys.exit(main(sys.argv[4:]))
"""


def cli(*args, cache, kill=None):
    env = dict(os.environ, COMPRESSX_CACHE=cache, OMP_NUM_THREADS="1")
    prefix = ["-c", KILLER, *kill] if kill else ["-m", "compressx.cli"]
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def same_export(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(first) == set(second)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.mark.slow
def test_training_killed_mid_epoch_and_resumed_exports_the_same_weights(tmp_path, zoo_cache):
    checkpoint = f"train.checkpoint={{dir: {tmp_path / 'ckpt'}, every: 1}}"
    reference = cli("apply", LBC, *QUICK, f"export.dir={tmp_path / 'ref'}", "--no-progress", cache=zoo_cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = ["apply", LBC, *QUICK, checkpoint, f"export.dir={tmp_path / 'out'}", "--no-progress"]
    # learning_rate is called once per step; 200 images in batches of 64 are 4 steps an epoch: die in epoch 2.
    killed = cli(*args, cache=zoo_cache, kill=["compressx.builtin_trainer", "learning_rate", str(2 * 4 + 2)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    assert CheckpointDir(tmp_path / "ckpt", {}).entries() == ["epoch-0001"]

    again = cli(*args, cache=zoo_cache)  # without --resume: refused, nothing touched
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = cli(*args, "--resume", cache=zoo_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "after epoch 1" in resumed.stderr
    same_export(tmp_path / "ref", tmp_path / "out")
    ref_report = compressx.read_manifest(tmp_path / "ref")["steps"][0]["report"]
    report = compressx.read_manifest(tmp_path / "out")["steps"][0]["report"]
    assert report["schedule"] == ref_report["schedule"]  # LBC's candidate removal, epochs before the kill included
    assert report["training"]["history"] == ref_report["training"]["history"]
    assert report["training"]["resumed_after_epoch"] == 1


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, bpe_tokenizer):
    """A local transformers checkpoint: a 4-layer tiny Llama and a BPE tokenizer trained here."""
    return save_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", bpe_tokenizer, layers=4)


def layerwise_recipe(tmp_path: Path, model_dir: Path, pass_name: str = "sparsegpt") -> Path:
    recipe = {
        "model": {"source": "hf", "id": str(model_dir)},
        "data": {"calibration": {"source": "stdlib_text", "split": "val", "samples": 8, "seq_len": 32}},
        "steps": [{"pass": pass_name, "config": {"sparsity": 0.5, "batch_size": 4}}],
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "export": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_layerwise_pruning_killed_at_layer_2_and_resumed_exports_the_same_weights(tmp_path, hf_llama_dir, zoo_cache):
    recipe = str(layerwise_recipe(tmp_path, hf_llama_dir))
    reference = cli(
        "apply", recipe, f"export.dir={tmp_path / 'ref'}", "checkpoint=null", "--no-progress", cache=zoo_cache
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    # sparsegpt_prune runs once per Linear, 7 per decoder layer: the 15th call is layer 2's first.
    kill = ["compressx.passes.sparsegpt", "sparsegpt_prune", "15"]
    killed = cli("apply", recipe, "--no-progress", cache=zoo_cache, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert CheckpointDir(tmp_path / "ckpt", {}).entries() == ["step-00-layer-0000", "step-00-layer-0001"]
    resumed = cli("apply", recipe, "--resume", "--no-progress", cache=zoo_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "decoder layer 0: pruned weights loaded" in resumed.stderr
    assert "decoder layer 1: pruned weights loaded" in resumed.stderr
    assert "decoder layer 2: pruned weights loaded" not in resumed.stderr
    same_export(tmp_path / "ref", tmp_path / "out")
    reference_steps = compressx.read_manifest(tmp_path / "ref")["steps"]
    assert compressx.read_manifest(tmp_path / "out")["steps"] == reference_steps


def run(*args) -> int:
    return main([*args, "--no-progress"] if args[0] == "apply" else list(args))


def test_resume_refusals_are_one_clear_error(tmp_path, hf_llama_dir, capsys):
    recipe = str(layerwise_recipe(tmp_path, hf_llama_dir, "wanda"))
    assert run("apply", recipe, "checkpoint=null", "--resume") == 2
    assert "--resume: this recipe keeps no checkpoints; add train.checkpoint" in capsys.readouterr().err

    assert run("apply", recipe, "checkpoint={dir: ''}") == 2
    assert "checkpoint.dir: got ''; expected a directory path" in capsys.readouterr().err
    assert run("apply", recipe, "checkpoint={dir: x, every: 2}") == 2
    assert "checkpoint.every: unknown key 'every'; allowed: dir" in capsys.readouterr().err

    assert run("validate", recipe, f"checkpoint.dir={tmp_path / 'out' / 'ckpt'}") == 2
    assert "overlaps export.dir" in capsys.readouterr().err

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run("validate", recipe, f"checkpoint.dir={foreign}") == 2
    assert "is not empty and is not a compressx checkpoint directory" in capsys.readouterr().err
    assert run("apply", recipe, f"checkpoint.dir={foreign}", "--resume") == 2
    assert os.listdir(foreign) == ["notes.txt"]

    assert run("apply", recipe) == 0  # completes; its per-layer checkpoints stay
    assert len(CheckpointDir(tmp_path / "ckpt", {}).entries()) == 4
    capsys.readouterr()
    assert run("apply", recipe, f"export.dir={tmp_path / 'other'}") == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert run("apply", recipe, "steps.0.config.sparsity=0.6", f"export.dir={tmp_path / 'other'}", "--resume") == 2
    assert "belong to another run: recipe block(s) steps differ" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    # The same recipe resumes (every layer loaded), with another export dir: the same weights.
    assert run("apply", recipe, f"export.dir={tmp_path / 'again'}", "--resume") == 0
    same_export(tmp_path / "out", tmp_path / "again")
