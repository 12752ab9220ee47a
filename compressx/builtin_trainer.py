"""The built-in trainer behind a recipe's ``train:`` block: image classification on accelerate.

```yaml
train:
  data: {source: digits, split: train, train_images: 500, noise: 0.25}   # or image_folder (compressx.images)
  epochs: 40
  batch_size: 64
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}  # or adamw; norm_weight_decay: 0
  schedule: {name: cosine, warmup_epochs: 0}                             # or constant
  label_smoothing: 0.0
  seed: 0
  checkpoint: {dir: ckpt/run, every: 5}                                  # optional: resumable (--resume)
```

It is an ordinary loop that calls the training passes' ``handle.on_epoch_start(epoch)`` before every epoch, so
``compressx apply`` and a user's own loop drive the passes the same way. It runs on ``accelerate``:
``accelerate launch -m compressx apply recipe.yaml`` trains with DDP on several GPUs (the batch size is per
process; gradients, hence LBC's scores, are all-reduced, so every process removes the same candidates).

The learning rate is set every iteration: linear warm-up over ``warmup_epochs``, then cosine to 0 (the LBC and
SpRe recipes: 5 warm-up epochs, cosine, SGD 0.1 momentum 0.9, weight decay 1e-4, label smoothing 0.1).

With ``checkpoint``, every ``every`` epochs (and after the last) the state a bit-identical continuation needs is
written atomically (``compressx.checkpoint``): the model's ``state_dict`` (with the pass's scores and masks), the
optimizer's state, the handles' ``state_dict``, the RNG states (torch, CUDA, numpy, Python, the data loader's
generator, which sets the data order) and the epoch; the learning-rate schedule is a function of the epoch.
``train(..., resume=True)`` continues after the latest one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.checkpoint import (
    CheckpointDir,
    CheckpointSpec,
    join_tensors,
    json_digest,
    model_digest,
    split_tensors,
)
from compressx.config import Block, option, seed_option
from compressx.errors import CheckpointError, ConfigError
from compressx.images import ImageDataSpec, loader

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainSpec(Block):
    """A recipe's ``train:`` block. ``optimizer: {...}`` and ``schedule: {...}`` are read into flat fields."""

    data: ImageDataSpec = option(missing="a train block needs 'data' (e.g. {source: digits, split: train})")
    epochs: int = option(ge=1, missing="a train block needs 'epochs'")
    batch_size: int = option(64, ge=1)
    optimizer: str = option("sgd", group="optimizer", key="name", choices=OPTIMIZERS)
    lr: float = option(0.1, group="optimizer", ge=1e-12)
    momentum: float = option(0.9, group="optimizer", ge=0)
    weight_decay: float = option(1e-4, group="optimizer", ge=0)
    norm_weight_decay: float = option(0.0, group="optimizer", ge=0)
    nesterov: bool = option(False, group="optimizer")
    schedule: str = option("cosine", group="schedule", key="name", choices=SCHEDULES)
    warmup_epochs: int = option(0, group="schedule", ge=0)
    label_smoothing: float = option(0.0, ge=0, lt=1)
    seed: int = seed_option()
    checkpoint: CheckpointSpec | None = None

    def __post_init__(self) -> None:
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"got {self.warmup_epochs}; must be < epochs ({self.epochs})", "schedule.warmup_epochs")

    def fingerprint(self) -> str:
        """What decides the training's result: everything but where and how often checkpoints are written."""
        return json_digest({k: v for k, v in self.to_dict().items() if k != "checkpoint"})


parse_train_spec = TrainSpec.from_dict  # the name callers know


def learning_rate(spec: TrainSpec, iteration: int, per_epoch: int) -> float:
    """The learning rate at ``iteration`` (0-based, over the whole run) with ``per_epoch`` iterations an epoch."""
    warmup = spec.warmup_epochs * per_epoch
    if iteration < warmup:
        return spec.lr * (iteration + 1) / warmup
    if spec.schedule == "constant":
        return spec.lr
    progress = (iteration - warmup) / max(spec.epochs * per_epoch - warmup, 1)
    return 0.5 * spec.lr * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters; normalisation layers' parameters get ``norm_weight_decay``."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in norm_ids], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if id(p) in norm_ids], "weight_decay": spec.norm_weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    return torch.optim.AdamW(groups, lr=spec.lr)


def _rng_state(generators: list[torch.Generator]) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for generator, generator_state in zip(generators, state["generators"], strict=True):
        generator.set_state(generator_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loader_generators(*loaders: Any) -> list[torch.Generator]:
    """The generators that decide a loader's order (the shuffling sampler's, the loader's own), each once."""
    found: dict[int, torch.Generator] = {}
    for data in loaders:
        samplers = [getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)]
        for owner in [data, *samplers]:
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def save_training_checkpoint(
    store: CheckpointDir,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    handles: list[Any],
    generators: list[torch.Generator],
    history: list[dict[str, Any]],
    digest: str,
) -> None:
    """Write ``epoch-NNNN`` (everything a bit-identical continuation needs), then delete the older entries."""
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = {
        "kind": "train",
        "epoch": epoch,
        "model_digest": digest,
        "model": [k[len("model.") :] for k in tensors],
        "optimizer": split_tensors(optimizer.state_dict(), "optimizer.", tensors),
        "handles": [
            split_tensors(h.state_dict(), "handle.", tensors) if hasattr(h, "state_dict") else None for h in handles
        ],  # fmt: skip
        "rng": split_tensors(_rng_state(generators), "rng.", tensors),
        "history": history,
    }
    name = f"epoch-{epoch:04d}"
    store.write(name, tensors, state)
    for older in store.entries("epoch-"):
        if older < name:
            store.remove(older)
    log.info("checkpoint after epoch %d written to %s", epoch, store.path / name)


def load_training_checkpoint(
    store: CheckpointDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    handles: list[Any],
    generators: list[torch.Generator],
    digest: str,
) -> tuple[int, list[dict[str, Any]]] | None:
    """Restore the latest checkpoint into the run; returns (its epoch, the history so far), or None if none."""
    names = store.entries("epoch-")
    if not names:
        log.info("--resume: no checkpoint in %s yet; training from epoch 0", store.path)
        return None
    tensors, state = store.read(names[-1])
    if state.get("model_digest") != digest:
        raise CheckpointError(
            f"--resume: {store.path / names[-1]} was written by a run that started from other model weights; "
            "resume with the same model, or choose another checkpoint dir"
        )
    try:
        model.load_state_dict({k: tensors[f"model.{k}"] for k in state["model"]}, strict=True)
        optimizer.load_state_dict(join_tensors(state["optimizer"], tensors))
        saved_handles = state["handles"]
        if len(saved_handles) != len(handles):
            raise ValueError(f"{len(saved_handles)} pass handle(s) saved, {len(handles)} in this run")
        for handle, saved in zip(handles, saved_handles):
            if saved is not None:
                handle.load_state_dict(join_tensors(saved, tensors))
        _set_rng_state(join_tensors(state["rng"], tensors), generators)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"--resume: {store.path / names[-1]} does not fit this run: {err}") from err
    log.info("resumed from %s (after epoch %d)", store.path / names[-1], state["epoch"])
    return int(state["epoch"]), list(state["history"])


def train(
    model: nn.Module,
    spec: TrainSpec,
    handles: list[Any] = (),
    progress: bool = True,
    *,
    resume: bool = False,
    store: CheckpointDir | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place as ``spec`` says, driving the training-pass ``handles``; returns a summary.

    The summary holds the per-epoch mean loss and learning rate, the wall time, and the mean time of a training
    step (forward, backward, optimizer step) after the first epoch.

    With ``spec.checkpoint``, checkpoints go to ``store`` (default: a ``CheckpointDir`` at ``spec.checkpoint.dir``
    fingerprinted by ``spec``); ``resume`` continues after the latest one, bit-identically to a run never
    interrupted. Under DDP the main process writes, and every process loads the same checkpoint.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    # LBC freezes its scores mid-run; under DDP a parameter that stops receiving gradients must be allowed.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(spec.seed)
    data = loader(spec.data, spec.batch_size, shuffle=True, seed=spec.seed)
    optimizer = build_optimizer(model, spec)
    plain_data = data
    wrapped, optimizer, data = accelerator.prepare(model, optimizer, data)
    per_epoch = len(data)
    history, step_times = [], []
    first_epoch = 0
    generators, digest = [], ""
    if spec.checkpoint is not None:
        if store is None:
            store = CheckpointDir(spec.checkpoint.dir, {"train": spec.fingerprint()})
            store.open(resume)
        generators = _loader_generators(plain_data, data)
        digest = model_digest(model)
        restored = (
            load_training_checkpoint(store, model, optimizer, list(handles), generators, digest) if resume else None
        )
        if restored is not None:
            first_epoch, history = restored[0] + 1, restored[1]
    start = time.perf_counter()
    bar = tqdm(
        total=spec.epochs * per_epoch,
        initial=first_epoch * per_epoch,
        desc="train",
        disable=not progress or not accelerator.is_main_process,
    )
    for epoch in range(first_epoch, spec.epochs):
        for handle in handles:
            handle.on_epoch_start(epoch)
        wrapped.train()
        total, count = 0.0, 0
        for step, (images, labels) in enumerate(data):
            tick = time.perf_counter()
            lr = learning_rate(spec, epoch * per_epoch + step, per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = wrapped(images)
            loss = F.cross_entropy(getattr(logits, "logits", logits), labels, label_smoothing=spec.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            if epoch > 0:
                step_times.append(time.perf_counter() - tick)
            bar.update(1)
        history.append({"epoch": epoch, "loss": round(total / max(count, 1), 6), "lr": round(lr, 8)})
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if spec.checkpoint is not None and ((epoch + 1) % spec.checkpoint.every == 0 or epoch == spec.epochs - 1):
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(wrapped)
                save_training_checkpoint(
                    store, epoch, unwrapped, optimizer, list(handles), generators, history, digest
                )
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    log.info("trained %d epoch(s) in %.1f s: final loss %.4f", spec.epochs, seconds, history[-1]["loss"])
    resumed = {"resumed_after_epoch": first_epoch - 1} if first_epoch else {}
    return {
        **resumed,
        "epochs": spec.epochs,
        "seconds": round(seconds, 3),
        "step_seconds": round(sum(step_times) / len(step_times), 6) if step_times else None,
        "processes": accelerator.num_processes,
        "history": history,
    }
