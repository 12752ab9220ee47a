"""The N:M training examples run as documented (shortened with --epochs), export, reload, and resume exactly."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import compressx
from compressx.export import load_sparse_state_dict
from compressx.images import digits_tensors, parse_image_data_spec
from compressx.ops.sparsity import is_nm_sparse
from compressx.zoo.resnet_digits import build_empty

ROOT = Path(__file__).resolve().parents[1]
PLAIN = str(ROOT / "examples" / "train_nm_plain.py")
ACCELERATE = str(ROOT / "examples" / "train_nm_accelerate.py")
INTERRUPT = str(ROOT / "tests" / "scripts" / "interrupt_after.py")
RESULT = re.compile(r"^(\d+:\d+) sparsity (\d\.\d{4}), test top-1 (\d+\.\d\d)%$", re.MULTILINE)


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: tiny steps, busy machine
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def result_line(done: subprocess.CompletedProcess) -> tuple[str, float, float]:
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = RESULT.findall(done.stdout)
    return found[0], float(found[1]), float(found[2])


@pytest.mark.slow
def test_plain_example_trains_exports_and_reloads(tmp_path):
    out = tmp_path / "plain"
    done = run(PLAIN, "--epochs", "2", "--export", str(out))
    pattern, sparsity, accuracy = result_line(done)
    assert (pattern, sparsity) == ("2:4", 0.5)
    assert accuracy > 50  # two epochs on the full digits training split
    assert f"exported to {out}" in done.stdout
    manifest = compressx.read_manifest(out)
    assert manifest["sparse_format"]["format"] == "nm" and manifest["sparse_format"]["tensors"] == 6
    assert all(entry["pattern"] == "2:4" for entry in manifest["sparsity"].values())
    model = compressx.load(out, model=build_empty())
    for name, weight in load_sparse_state_dict(out).items():
        assert torch.equal(model.state_dict()[name], weight) and is_nm_sparse(weight, 2, 4), name
    images, labels = digits_tensors(parse_image_data_spec({"source": "digits", "split": "test"}))
    with torch.no_grad():
        reloaded = (model(images).argmax(1) == labels).float().mean().item() * 100
    assert f"{reloaded:.2f}" == f"{accuracy:.2f}"


@pytest.mark.slow
def test_plain_example_resume_equals_an_uninterrupted_run(tmp_path):
    # Uninterrupted: 4 epochs. Interrupted: the same command stopped right after its 2nd checkpoint (as a crash
    # would), then resumed with --resume. Same printed result, and the same exported weights bit for bit.
    whole = run(
        PLAIN, "--epochs", "4", "--checkpoint", str(tmp_path / "a.safetensors"), "--export", str(tmp_path / "a")
    )
    expected = result_line(whole)
    checkpoint = str(tmp_path / "b.safetensors")
    stopped = run(INTERRUPT, "2", PLAIN, "--epochs", "4", "--checkpoint", checkpoint, "--export", str(tmp_path / "b"))
    assert stopped.returncode == 3 and "interrupted" in stopped.stdout and not RESULT.search(stopped.stdout)
    with safe_open(checkpoint, framework="pt") as f:  # safetensors; the state beside the tensors is JSON
        assert json.loads(f.metadata()["state"])["handle"]["epoch"] == 1
    resumed = run(PLAIN, "--epochs", "4", "--checkpoint", checkpoint, "--resume", "--export", str(tmp_path / "b"))
    assert result_line(resumed) == expected
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ after resuming, e.g. {differing[:3]}"


@pytest.mark.slow
def test_accelerate_example_runs_one_epoch():
    done = run(ACCELERATE, "--epochs", "1")
    pattern, sparsity, accuracy = result_line(done)
    assert (pattern, sparsity) == ("2:4", 0.5)
    assert 10 < accuracy <= 100
    assert re.search(r"^epoch 0: loss \d+\.\d{4}$", done.stdout, re.MULTILINE), done.stdout
