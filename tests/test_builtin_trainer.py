"""compressx.builtin_trainer: the train block's validation, the learning-rate schedule, the optimizer groups, and
train() driving training-pass handles (in process, and under DDP with two CPU processes)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import compressx
from compressx.builtin_trainer import TrainSpec, build_optimizer, learning_rate, parse_train_spec, train
from compressx.errors import ConfigError
from compressx.zoo.resnet_digits import build_empty

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BLOCK = {"data": {"source": "digits", "split": "train"}, "epochs": 10}


def with_(**changes):
    block = json.loads(json.dumps(BLOCK))
    for key, value in changes.items():
        if value is None:
            block.pop(key)
        else:
            block[key] = value
    return block


@pytest.mark.parametrize(
    "block, path, fragments",
    [
        (with_(optimizer={"lrr": 0.1}), "optimizer.lrr", ["unknown key 'lrr'", "did you mean 'lr'?", "momentum"]),
        (with_(schedule={"warmup": 2}), "schedule.warmup", ["did you mean 'warmup_epochs'?"]),
        (with_(epoch=3), "epoch", ["unknown key 'epoch'", "did you mean 'epochs'?"]),
        (with_(data=None), "data", ["needs 'data'"]),
        (with_(epochs=None), "epochs", ["needs 'epochs'"]),
        (with_(epochs=0), "epochs", ["expected an integer >= 1"]),
        (with_(epochs=2.5), "epochs", ["expected an integer >= 1"]),
        (with_(schedule={"warmup_epochs": 10}), "schedule.warmup_epochs", ["must be < epochs (10)"]),
        (with_(schedule={"name": "step"}), "schedule.name", ["'step'", "cosine, constant"]),
        (with_(optimizer={"name": "adam"}), "optimizer.name", ["'adam'", "allowed: sgd, adamw"]),
        (with_(optimizer={"lr": 0}), "optimizer.lr", ["expected a number >="]),
        (with_(optimizer={"lr": "0.1"}), "optimizer.lr", ["expected a number"]),
        (with_(optimizer={"nesterov": "yes"}), "optimizer.nesterov", ["true or false"]),
        (with_(optimizer={"weight_decay": -1e-4}), "optimizer.weight_decay", [">= 0"]),
        (with_(optimizer="sgd"), "optimizer", ["expected a mapping"]),
        (with_(label_smoothing=1.0), "label_smoothing", ["[0, 1)"]),
        (with_(batch_size=0), "batch_size", [">= 1"]),
        (with_(batch_size=True), "batch_size", [">= 1"]),
        (with_(seed=-1), "seed", [">= 0"]),
        (with_(data={"source": "digits", "split": "val"}), "data.split", ["allowed: train, test"]),
        (with_(data={"source": "digits", "nosie": 0.2}), "data.nosie", ["did you mean 'noise'?"]),
        (with_(data="digits"), "data", ["expected a mapping"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_parse_errors_carry_their_path(block, path, fragments):
    with pytest.raises(ConfigError) as info:
        parse_train_spec(block)
    assert info.value.path == path, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_parse_fills_defaults_and_round_trips():
    spec = parse_train_spec(BLOCK)
    assert (spec.batch_size, spec.optimizer, spec.lr, spec.momentum, spec.weight_decay) == (64, "sgd", 0.1, 0.9, 1e-4)
    assert (spec.schedule, spec.warmup_epochs, spec.label_smoothing, spec.seed) == ("cosine", 0, 0.0, 0)
    full = parse_train_spec(
        with_(
            optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "norm_weight_decay": 0.01},
            schedule={"name": "constant", "warmup_epochs": 2},
            label_smoothing=0.1,
            batch_size=16,
            seed=3,
        )
    )
    assert full.optimizer == "adamw" and full.norm_weight_decay == 0.01 and full.warmup_epochs == 2
    assert parse_train_spec(full.to_dict()) == full
    assert parse_train_spec(spec.to_dict()) == spec


def spec_of(**changes) -> TrainSpec:
    data = parse_train_spec(BLOCK).data
    return TrainSpec(data=data, **{"epochs": 10, "lr": 0.1, **changes})


def test_learning_rate_warms_up_linearly_then_follows_the_cosine_to_zero():
    spec = spec_of(warmup_epochs=2)
    per_epoch = 5
    lrs = [learning_rate(spec, i, per_epoch) for i in range(50)]
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])  # linear, reaching lr at its end
    assert lrs[10] == pytest.approx(0.1)  # the cosine starts at the peak
    assert lrs[10 + 20] == pytest.approx(0.05)  # half way through the 40 cosine iterations
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # strictly decreasing after the warm-up
    assert 0 < lrs[-1] < 0.002  # ~0 at the last iteration
    assert learning_rate(spec, 50, per_epoch) == pytest.approx(0.0, abs=1e-12)  # one past the end: exactly 0


def test_learning_rate_without_warmup_and_constant_schedule():
    cosine = spec_of()
    assert learning_rate(cosine, 0, 7) == pytest.approx(0.1)
    assert learning_rate(cosine, 35, 7) == pytest.approx(0.05)
    constant = spec_of(schedule="constant", warmup_epochs=1)
    assert learning_rate(constant, 0, 4) == pytest.approx(0.025)
    assert [learning_rate(constant, i, 4) for i in range(3, 40)] == pytest.approx([0.1] * 37)


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = build_empty()
        self.norm = nn.LayerNorm(10)
        self.frozen = nn.Linear(10, 10)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_optimizer_puts_norm_parameters_in_their_own_group(name):
    model = WithLayerNorm()
    optimizer = build_optimizer(
        model, spec_of(optimizer=name, weight_decay=5e-4, norm_weight_decay=0.0, nesterov=True)
    )
    assert type(optimizer) is (torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
    decayed, norm = optimizer.param_groups
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.LayerNorm)]
    norm_params = {id(p) for m in norms for p in m.parameters()}
    assert len(norms) == 8  # 7 BatchNorm2d in resnet_digits + the LayerNorm
    assert {id(p) for p in norm["params"]} == norm_params and norm["weight_decay"] == 0.0
    expected = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in norm_params}
    assert {id(p) for p in decayed["params"]} == expected and decayed["weight_decay"] == 5e-4
    assert id(model.frozen.weight) not in expected | norm_params  # frozen parameters are left out
    assert {id(model.body.conv1.weight), id(model.body.fc.bias)} <= {id(p) for p in decayed["params"]}
    if name == "sgd":
        assert decayed["momentum"] == 0.9 and decayed["nesterov"] is True


def test_build_optimizer_without_norm_layers_has_one_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, spec_of())
    assert len(optimizer.param_groups) == 1 and len(optimizer.param_groups[0]["params"]) == 4


class Recorder:
    """A stand-in training-pass handle: records the epochs it is told about and the model mode at that time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = []

    def on_epoch_start(self, epoch: int) -> None:
        self.calls.append((epoch, [p.detach().clone() for p in self.model.parameters()][0].sum().item()))


SMALL = {
    "data": {"source": "digits", "split": "train", "train_images": 100},
    "epochs": 2,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
}


def test_train_drives_every_handle_before_every_epoch_and_returns_a_summary():
    torch.manual_seed(0)
    model = build_empty()
    first, second = Recorder(model), Recorder(model)
    start = [p.detach().clone() for p in model.parameters()]
    summary = train(model, parse_train_spec(SMALL), [first, second], progress=False)
    assert [c[0] for c in first.calls] == [0, 1] and [c[0] for c in second.calls] == [0, 1]
    assert first.calls[0][1] != first.calls[1][1]  # epoch 1 starts after epoch 0's steps changed the weights
    assert first.calls == second.calls
    assert not all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert summary["epochs"] == 2 and summary["processes"] == 1
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert all(h["loss"] > 0 and torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    spec = parse_train_spec(SMALL)
    per_epoch = 4  # 100 images, batches of 32
    assert summary["history"][0]["lr"] == pytest.approx(learning_rate(spec, per_epoch - 1, per_epoch))
    assert summary["history"][1]["lr"] == pytest.approx(learning_rate(spec, 2 * per_epoch - 1, per_epoch))
    assert summary["history"][0]["lr"] == pytest.approx(0.05)  # the end of the one warm-up epoch
    assert summary["step_seconds"] > 0 and summary["seconds"] >= summary["step_seconds"]
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_train_is_deterministic_and_seeded():
    def run(seed):
        torch.manual_seed(0)
        model = build_empty()
        summary = train(
            model,
            parse_train_spec({**SMALL, "epochs": 1, "schedule": {"name": "cosine"}, "seed": seed}),
            progress=False,
        )
        return [p.detach().clone() for p in model.parameters()], summary["history"]

    a, history_a = run(0)
    b, history_b = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and history_a == history_b
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # the seed sets the shuffling


def test_train_drives_a_real_lbc_handle():
    torch.manual_seed(0)
    model = build_empty()
    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 1})
    train(model, parse_train_spec(SMALL), [handle], progress=False)
    assert handle.epoch == 1 and handle.history == [{"epoch": 1, "candidates_kept": 1, "scores_frozen": True}]
    handle.finalize()
    assert handle.final_report["sparsity"] == 0.5 and handle.final_report["unfinished_blocks"] == 0


def run_ddp_script() -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "scripts" / "ddp_lbc.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*?\})(?=RESULT|\n|$)", run.stdout)]
    return run, results


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_ranks_identical():
    run, results = run_ddp_script()
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(r["rank"] for r in results) == [0, 1], run.stdout
    for r in results:
        assert r["processes"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["epochs"] == [0, 1] and r["sparsity"] == 0.5
        assert r["schedule"] == [{"epoch": 1, "candidates_kept": 1, "scores_frozen": True}]
    # The ranks start from different seeds and see different data shards; DDP keeps them identical.
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["masks"] == results[1]["masks"]
