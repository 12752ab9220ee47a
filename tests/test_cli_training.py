"""`compressx apply` on a training recipe (LBC 1:16 on the digits ResNet, shortened), end to end in subprocesses:
the trainer runs, the handle is finalised, the export packs the N:M weights and reloads with the same accuracy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compressx
from compressx.export import load_sparse_state_dict
from compressx.ops.sparsity import is_nm_sparse
from compressx.zoo.resnet_digits import ResNetDigits

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "cnn" / "lbc_resnet_digits.yaml")
QUICK = ["train.epochs=12", "steps.0.config.end_epoch=6"]  # 40 epochs in the recipe; ~10 s this way
TOP1 = "top1 (digits/test)"


def cli(*args, cache):
    env = dict(os.environ, COMPRESSX_CACHE=cache, OMP_NUM_THREADS="1")  # one thread: tiny steps, busy machine
    return subprocess.run(
        [sys.executable, "-m", "compressx.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def lbc_export(zoo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-training") / "lbc"
    run = cli("apply", RECIPE, *QUICK, f"export.dir={out}", "--no-progress", cache=zoo_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


@pytest.mark.slow
def test_apply_trains_finalizes_and_reports(lbc_export):
    out, run = lbc_export
    assert "step 0: lbc (training) on 8 module(s): pattern=1:16" in run.stdout
    assert "sparsity=0.9375" in run.stdout and "unfinished_blocks=0" in run.stdout
    assert "dense_modules={conv1: stem (skip_stem), fc: classifier (skip_classifier)}" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith(TOP1)]
    assert len(table) == 1, run.stdout
    before, after = (float(v) for v in table[0].split()[-3:-1])
    assert before < 20 < 50 < after  # a fresh init is at chance; 12 epochs of LBC training are far above it
    assert "trained 12 epoch(s)" in run.stderr and "lbc finalized" in run.stderr  # logged

    manifest = compressx.read_manifest(out)
    assert manifest["model"] == {
        "class": "compressx.zoo.resnet_digits.ResNetDigits",
        "dtype": "float32",
        "format": "zoo",
        "member": "resnet_digits",
    }
    assert manifest["eval"]["after"][TOP1] == pytest.approx(after, abs=1e-4)
    (step,) = manifest["steps"]
    report = step["report"]
    assert step["pass"] == "lbc" and step["kind"] == "training"
    assert report["pattern"] == "1:16" and report["sparsity"] == 0.9375 and report["unfinished_blocks"] == 0
    assert set(report["dense_modules"]) == {"conv1", "fc"}
    assert report["per_module"] == dict.fromkeys(
        [f"layer{i}.{name}" for i in (1, 2) for name in ("conv1", "conv2", "downsample.0")], 0.9375
    )
    # The removal schedule: 16 candidates per block down to one at end_epoch 6, never increasing.
    kept = [entry["candidates_kept"] for entry in report["schedule"]]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 1 and kept[0] < 16
    assert report["schedule"][-1] == {"epoch": 6, "candidates_kept": 1, "scores_frozen": True}
    training = report["training"]
    assert training["epochs"] == 12 and training["processes"] == 1
    assert [h["epoch"] for h in training["history"]] == list(range(12))
    assert training["history"][-1]["loss"] < training["history"][0]["loss"]
    # Every N:M weight is recorded and packed; the stem and classifier are dense, so not recorded.
    assert set(manifest["sparsity"]) == {f"{name}.weight" for name in report["per_module"]}
    assert all(v == {"sparsity": 0.9375, "pattern": "1:16"} for v in manifest["sparsity"].values())
    packed = manifest["sparse_format"]
    assert packed["format"] == "nm" and packed["file"] == "sparse.safetensors" and packed["tensors"] == 6
    assert packed["ratio"] < 0.15 and "sparse.safetensors" in manifest["files"]
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["epochs"] == 12 and resolved["train"]["data"]["train_images"] == 500
    assert resolved["steps"][0]["config"]["end_epoch"] == 6


@pytest.mark.slow
def test_load_eval_reproduces_the_recorded_accuracy(lbc_export, zoo_cache):
    out, _ = lbc_export
    run = cli("load", str(out), "--eval", "--no-progress", cache=zoo_cache)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "loaded ResNetDigits" in run.stdout
    assert "reloaded model reproduces the recorded metrics exactly" in run.stdout
    show = cli("show", str(out), cache=zoo_cache)
    assert show.returncode == 0 and "1:16 ×6" in show.stdout and "packed (nm)" in show.stdout


@pytest.mark.slow
def test_python_load_gives_the_nm_weights_of_the_packed_file(lbc_export):
    out, _ = lbc_export
    model = compressx.load(out)  # format zoo: no model= needed
    assert type(model) is ResNetDigits and not model.training
    packed = load_sparse_state_dict(out)
    state = model.state_dict()
    assert len(packed) == 6
    for name, weight in packed.items():
        assert torch.equal(state[name], weight), name
        assert is_nm_sparse(state[name], 1, 16), name
    assert not is_nm_sparse(state["conv1.weight"], 1, 16) and bool((state["fc.weight"] != 0).all())
    # The reloaded model gives the recorded accuracy in this process too.
    from compressx.images import parse_image_data_spec, top1

    recorded = compressx.read_manifest(out)["eval"]["after"][TOP1]
    assert top1(model, parse_image_data_spec({"source": "digits", "split": "test", "noise": 0.25})) == recorded


@pytest.mark.slow
def test_bad_train_block_exits_2_before_any_work(zoo_cache, tmp_path):
    out = tmp_path / "never"
    run = cli("apply", RECIPE, "train.optimizer.lrr=0.1", f"export.dir={out}", "--no-progress", cache=zoo_cache)
    assert run.returncode == 2
    assert f"{RECIPE}: train.optimizer.lrr: unknown key 'lrr'" in run.stderr and "did you mean 'lr'?" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    run = cli("apply", RECIPE, "train.schedule.warmup_epochs=40", f"export.dir={out}", cache=zoo_cache)
    assert run.returncode == 2 and "train.schedule.warmup_epochs: got 40; must be < epochs (40)" in run.stderr
