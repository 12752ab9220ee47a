"""What the training passes (``lbc``, ``spre``, ``sr_ste``, ``magnitude_finetune``) share: the N:M layer rules,
the handle a user's training loop drives, and the Hugging Face ``Trainer`` callback.

Using a training pass from your own loop::

    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 60})
    optimizer = torch.optim.SGD(model.parameters(), ...)      # after prepare: LBC adds score parameters
    for epoch in range(epochs):
        handle.on_epoch_start(epoch)                          # schedules (LBC's candidate removal, ...)
        for x, y in loader: ...                               # ordinary steps
    model = handle.finalize()                                 # plain modules, N:M weights with exact zeros

The pass state that matters for resuming (LBC's scores and alive candidates, fixed masks, SpRe's branches)
lives in the model's ``state_dict``; ``handle.state_dict()`` adds the epoch counter. Save both with your
checkpoint; to resume, ``prepare`` a fresh model, load both, and go on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch.nn as nn
from torch.nn.utils import parametrize

from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError
from compressx.ops.sparsity import is_nm_sparse, parse_nm, sparsity_report, to_input_last, zero_counts

log = logging.getLogger(__name__)

NM_TRAINABLE_TYPES = (nn.Linear, nn.Conv2d)


class InTrainingModule(nn.Module):
    """The base class of the modules a training pass adds until ``finalize()`` (weight parametrizations such as
    LBC's mask, SpRe's training-time block): an export of a model still holding one could not be rebuilt, so
    ``compressx.save`` refuses it."""


@dataclasses.dataclass(frozen=True)
class NMTrainingConfig(PassConfig):
    """Fields every N:M training pass has.

    Attributes:
        pattern: ``"N:M"``, e.g. ``"2:4"`` (quote it in YAML).
        skip_stem: keep the model's first conv dense (the papers' rule; it sees 1-3 input channels).
        skip_classifier: keep the classifier dense (timm ``get_classifier()``, transformers output embeddings,
            else the last Linear).
        incompatible: a targeted layer whose input dimension M does not divide: ``"skip"`` it (logged and
            reported) or raise an ``"error"``.
    """

    pattern: str = "2:4"
    skip_stem: bool = True
    skip_classifier: bool = True
    incompatible: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        try:
            parse_nm(self.pattern)
        except ValueError as err:
            raise ConfigError(f"{err}; allowed: 'N:M' with 0 < N < M, quoted in YAML", path="pattern") from err

    @property
    def nm(self) -> tuple[int, int]:
        return parse_nm(self.pattern)


def _classifier_names(model: nn.Module) -> set[str]:
    """Names of the modules that are the model's classifier."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    elif hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if isinstance(head, nn.Module):
        named = [name for name, module in model.named_modules() if module is head]
        if named:
            return set(named)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return {linears[-1]} if linears else set()


def layer_problem(module: nn.Module, m: int) -> str | None:
    """Why ``module`` cannot take M-blocks along its input dimension, or None."""
    if not isinstance(module, NM_TRAINABLE_TYPES):
        return f"{type(module).__name__} is not one of Linear, Conv2d"
    width = to_input_last(module.weight).shape[-1]
    if width % m:
        return f"input dimension {width} (per group) is not divisible by M={m}"
    return None


def select_nm_layers(
    model: nn.Module | None, targets: dict[str, nn.Module], config: NMTrainingConfig
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The targets that get the N:M pattern, and ``name -> reason`` for those left dense.

    The stem (the model's first conv) and the classifier are left dense when the config says so; a layer M
    cannot divide is skipped or raises ``ConfigError`` per ``config.incompatible``. With ``model=None`` (shape
    checks on a target dict alone) the stem is the first targeted conv and the classifier the last Linear.
    """
    m = config.nm[1]
    source = model.named_modules() if model is not None else targets.items()
    modules = [(name, mod) for name, mod in source if isinstance(mod, NM_TRAINABLE_TYPES)]
    convs = [name for name, mod in modules if isinstance(mod, nn.Conv2d)]
    stem = convs[0] if convs else None
    if model is not None:
        classifier = _classifier_names(model)
    else:
        linears = [name for name, mod in modules if isinstance(mod, nn.Linear)]
        classifier = {linears[-1]} if linears else set()
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    incompatible = []
    for name, module in targets.items():
        if config.skip_stem and name == stem:
            skipped[name] = "stem (skip_stem)"
        elif config.skip_classifier and name in classifier:
            skipped[name] = "classifier (skip_classifier)"
        elif (problem := layer_problem(module, m)) is not None:
            skipped[name] = problem
            incompatible.append(f"module '{name}': {problem}")
        else:
            chosen[name] = module
    if incompatible and config.incompatible == "error":
        raise ConfigError(
            "; ".join(incompatible) + " (set incompatible: skip to leave such layers dense, or add them to ignore)",
            path="incompatible",
        )
    for name, reason in skipped.items():
        log.info("%s stays dense: %s", name, reason)
    if not chosen:
        raise ConfigError(f"no targeted layer can take {config.pattern}; left dense: {skipped}", path="pattern")
    return chosen, skipped


def check_nm_layers(targets: dict[str, nn.Module], config: NMTrainingConfig) -> list[str]:
    """``register_pass(check=...)``: the layer-rule problems ``compressx validate`` reports (shapes only)."""
    try:
        select_nm_layers(None, targets, config)
    except ConfigError as err:
        return [err.detail]
    return []


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def parametrize_weights(layers: dict[str, nn.Module], make: Callable[[nn.Module], nn.Module]) -> None:
    """Give the ``weight`` of every layer the parametrization ``make(layer)`` (undone by ``unparametrize``)."""
    for module in layers.values():
        parametrize.register_parametrization(module, "weight", make(module))


def unparametrize(layers: dict[str, nn.Module], keep_projection: bool) -> None:
    """Remove the weight parametrization of ``layers``: keep its masked projection, or the dense latent weight."""
    for module in layers.values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=keep_projection)


def nm_final_report(layers: dict[str, nn.Module], pattern: str) -> dict[str, Any]:
    """Sparsity report of finalised layers; raises if any weight breaks the N:M pattern (a bug, never hidden)."""
    n, m = parse_nm(pattern)
    weights = {name: module.weight for name, module in layers.items()}
    broken = [name for name, w in weights.items() if not is_nm_sparse(w.detach(), n, m)]
    if broken:
        raise CompressxError(f"after finalize, {broken} are not {pattern} sparse; please report this bug")
    return {"pattern": pattern, **sparsity_report(zero_counts({k: w.detach() for k, w in weights.items()}))}


@dataclasses.dataclass
class TrainingHandle:
    """What a training pass returns: the hooks a training loop calls, and ``finalize``.

    Attributes:
        model: the prepared model (its modules carry the pass's parameters until ``finalize``).
        pass_name: the pass that prepared it.
        epoch_hook: ``epoch -> decisions`` (or None); what it decided is logged and kept in ``history``.
        finalize_hook: makes the mask permanent and removes every wrapper; returns the final report.
        remove_hook: removes every wrapper and restores the dense latent weights (abandons the pass).
    """

    model: nn.Module
    pass_name: str
    epoch_hook: Callable[[int], dict[str, Any] | None] | None
    finalize_hook: Callable[[], dict[str, Any]]
    remove_hook: Callable[[], None]
    epoch: int = -1
    finalized: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    final_report: dict[str, Any] | None = None

    def _check_open(self) -> None:
        if self.finalized:
            raise CompressxError(f"the {self.pass_name} handle was already finalized (or removed)")

    def on_epoch_start(self, epoch: int) -> None:
        """Call before training epoch ``epoch`` (0-based); runs the pass's schedule for that epoch."""
        self._check_open()
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise CompressxError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch
        decided = self.epoch_hook(epoch) if self.epoch_hook else None
        if decided:
            self.history.append({"epoch": epoch, **decided})
            log.info("%s epoch %d: %s", self.pass_name, epoch, decided)

    def finalize(self) -> nn.Module:
        """Make the N:M masks permanent; returns the model with plain modules and zeros in the weights."""
        self._check_open()
        self.final_report = self.finalize_hook()
        self.finalized = True
        log.info("%s finalized: sparsity %s (%s)", self.pass_name, self.final_report.get("sparsity"), self.pattern)
        return self.model

    @property
    def pattern(self) -> str:
        return str((self.final_report or {}).get("pattern", ""))

    def remove(self) -> None:
        """Undo the pass: plain modules with the dense latent weights; scores and extra branches are dropped."""
        self._check_open()
        self.remove_hook()
        self.finalized = True

    def state_dict(self) -> dict[str, Any]:
        """The handle's own state (the model's ``state_dict`` holds the rest): save it with your checkpoint."""
        return {"pass": self.pass_name, "epoch": self.epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pass") != self.pass_name:
            raise CompressxError(f"this state is for pass {state.get('pass')!r}, not {self.pass_name!r}")
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))


def trainer_callback(handle: TrainingHandle) -> Any:
    """A ``transformers.TrainerCallback`` that drives ``handle`` from a HF ``Trainer``.

    It calls ``on_epoch_start`` at the start of every epoch (the Trainer calls it again for the epoch it resumes
    in, and the passes' schedules depend only on the epoch and on state saved in the model) and writes
    ``handle.state_dict()`` as ``compressx_handle.json`` into each checkpoint directory. Call
    ``handle.finalize()`` after ``trainer.train()``.
    """
    import json
    import math
    import os

    from transformers import TrainerCallback

    state_file = "compressx_handle.json"

    class CompressxCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            # Floor: resuming mid-epoch, state.epoch still holds the checkpoint's fractional epoch (1.5 → 1).
            handle.on_epoch_start(math.floor((state.epoch or 0) + 1e-6))

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, state_file), "w") as f:
                    json.dump(handle.state_dict(), f)

    return CompressxCallback()
