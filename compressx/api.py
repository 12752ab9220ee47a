"""``compressx.apply``: run compression steps on a model. ``run_recipe``: what ``compressx apply recipe.yaml`` does.

The whole engine is one plain loop: for each step, look the pass up, build its config, select its target
modules, call the pass. No session or global state: everything a run decided is in the returned ``ApplyResult``
(per-step reports, handles of runtime/training passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.config import PassConfig
from compressx.errors import RecipeError
from compressx.recipe import Recipe, StepSpec, check_export_target, check_recipe, check_steps_on_model, parse_step
from compressx.registry import PassContext, PassSpec, get_pass, summarize_report
from compressx.targets import select_targets
from compressx.threads import tiny_model_threads

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepResult:
    """What one step did."""

    pass_name: str
    kind: str
    config: PassConfig
    targets: list[str]
    report: dict[str, Any]
    handle: Any = None
    reapply_config: PassConfig | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class ApplyResult:
    """The steps applied to a model, in order, with their reports."""

    steps: list[StepResult]

    def report(self) -> list[dict[str, Any]]:
        return [{"pass": s.pass_name, "kind": s.kind, **s.report} for s in self.steps]


StepLike = StepSpec | dict[str, Any]


def _as_step(step: StepLike, index: int) -> tuple[StepSpec, PassSpec]:
    """A step and its pass, from a ``StepSpec`` or a mapping whose ``pass`` is a name or a decorated function."""
    if isinstance(step, StepSpec):
        return step, get_pass(step.pass_name)
    if isinstance(step, dict) and callable(step.get("pass")):
        spec = get_pass(step["pass"])
        config = step.get("config", {})
        config = config if isinstance(config, PassConfig) else spec.config.from_dict(config)
        targets = step.get("targets")
        return StepSpec(spec.name, config, tuple(targets) if targets else None, tuple(step.get("ignore", ()))), spec
    if isinstance(step, dict) and isinstance(step.get("config"), PassConfig):
        step = dict(step, config=step["config"].to_dict())
    parsed = parse_step(step, f"steps[{index}]")
    return parsed, get_pass(parsed.pass_name)


def apply(model: nn.Module, steps: Sequence[StepLike], data: Any = None, *, progress: bool = True) -> ApplyResult:
    """Apply compression steps to ``model`` in place, in order.

    Every step is checked (config, targets, shapes, calibration data) before the first one runs, so a bad step
    never leaves the model half-compressed.

    Args:
        model: the model (an ``nn.Module``; a diffusers pipeline for pipeline passes).
        steps: ``StepSpec`` objects or mappings ``{"pass": name | decorated fn, "config": {...} | PassConfig,
            "targets": [...], "ignore": [...]}``.
        data: calibration data for passes that need it (e.g. a ``[samples, seq_len]`` token tensor).
        progress: show progress bars.

    Returns:
        An ``ApplyResult`` with one ``StepResult`` (report, handle) per step.
    """
    parsed = [_as_step(step, i) for i, step in enumerate(steps)]
    problems = check_steps_on_model(model, parsed) if isinstance(model, nn.Module) else []
    problems += [
        f"steps[{i}]: pass '{spec.name}' needs calibration data: pass data=..."
        for i, (_, spec) in enumerate(parsed)
        if "calibration" in spec.needs and data is None
    ]
    if problems:
        raise RecipeError(problems, "<steps>")
    # Dense values for steps that refine what an earlier step pruned: copied before anything changes.
    originals = {
        i: {
            name: module.weight.detach().to("cpu", copy=True)
            for name, module in select_targets(
                model, step.targets or spec.default_targets, step.ignore, spec.target_types, f"steps[{i}]"
            ).items()
        }
        for i, (step, spec) in enumerate(parsed)
        if getattr(step.config, "needs_original_weights", False)
    }
    results = []
    for i, (step, spec) in enumerate(tqdm(parsed, desc="compressx steps", disable=not progress or len(parsed) < 2)):
        # Targets are resolved again here: an earlier step may have replaced modules.
        targets = (
            select_targets(model, step.targets or spec.default_targets, step.ignore, spec.target_types, f"steps[{i}]")
            if spec.takes_targets
            else {}
        )
        start = time.perf_counter()
        context = PassContext(targets, calibration=data, progress=progress, original_weights=originals.get(i))
        out = spec.fn(model, step.config, context)
        seconds = time.perf_counter() - start
        summary = summarize_report(out.report)
        log.info("step %d: %s on %d module(s) in %.1f s: %s", i, spec.name, len(targets), seconds, summary)
        results.append(
            StepResult(
                pass_name=spec.name,
                kind=spec.kind,
                config=step.config,
                targets=list(targets),
                report=out.report,
                handle=out.handle,
                reapply_config=out.reapply_config,
                seconds=seconds,
            )
        )
    return ApplyResult(results)


def prepare(
    model: nn.Module,
    pass_name: str,
    config: dict[str, Any] | PassConfig | None = None,
    *,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> Any:
    """Prepare ``model`` for a training pass (``lbc``, ``spre``, ``sr_ste``, ``magnitude_finetune``, ...).

    Returns the pass's ``TrainingHandle``: call ``handle.on_epoch_start(epoch)`` before every epoch of your loop
    and ``handle.finalize()`` at the end (see ``compressx.training``). Build the optimizer after this call: some
    passes add parameters (LBC's scores, SpRe's extra branches).
    """
    kind = get_pass(pass_name).kind
    if kind != "training":
        raise RecipeError([f"pass '{pass_name}' is a {kind} pass; prepare() takes training passes (apply() the rest)"])
    step: dict[str, Any] = {"pass": pass_name, "config": config or {}}
    if targets is not None:
        step["targets"] = list(targets)
    if ignore:
        step["ignore"] = list(ignore)
    return apply(model, [step], progress=False).steps[0].handle


@dataclasses.dataclass
class RunResult:
    """What ``run_recipe`` produced."""

    model: Any
    result: ApplyResult
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    export_dir: str | None


def is_main_process() -> bool:
    """False on the non-main processes of a distributed run (``accelerate launch``), which must not export."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _train_and_finalize(model: nn.Module, recipe: Recipe, step: StepResult, progress: bool) -> None:
    """Run the built-in trainer on the recipe's training step, finalise it, and record both in its report."""
    from compressx.trainer import train

    summary = train(model, recipe.train, [step.handle], progress=progress)
    step.handle.finalize()
    step.report = {
        **step.report,
        **step.handle.final_report,
        "schedule": step.handle.history,
        "training": summary,
    }
    log.info("step %s finalized after training: %s", step.pass_name, summarize_report(step.handle.final_report))


def run_recipe(recipe: Recipe, *, overwrite: bool = False, progress: bool = True, export: bool = True) -> RunResult:
    """Build the model, evaluate, apply the steps, evaluate again, export. What ``compressx apply`` runs.

    A zoo model's recipe runs with the tiny-model thread count (``compressx.threads``): far faster on a shared
    machine, and the numbers are those of any other machine."""
    threads = tiny_model_threads() if recipe.model.source == "zoo" else contextlib.nullcontext()
    with threads:
        return _run_recipe(recipe, overwrite=overwrite, progress=progress, export=export)


def _run_recipe(recipe: Recipe, *, overwrite: bool, progress: bool, export: bool) -> RunResult:
    from compressx import data as data_mod
    from compressx.evaluate import evaluate
    from compressx.export import save
    from compressx.models import build_model

    # Everything that can be checked without weights is checked first: no hour of work before a typo error.
    check_recipe(recipe, overwrite=overwrite)
    if recipe.train is not None:
        torch.manual_seed(recipe.train.seed)  # the init of a model built from scratch (pretrained: false)
    loaded = build_model(recipe.model, progress=progress)
    calibration = None
    if recipe.calibration is not None:
        calibration = data_mod.load_calibration(recipe.calibration, loaded.tokenizer)
    before = evaluate(loaded.model, loaded.tokenizer, list(recipe.eval), progress)
    result = apply(loaded.model, recipe.steps, calibration, progress=progress)
    if recipe.train is not None:
        _train_and_finalize(loaded.model, recipe, result.steps[-1], progress)
    after = evaluate(loaded.model, loaded.tokenizer, list(recipe.eval), progress)
    export_dir = None
    if recipe.export and export and is_main_process():
        problem = check_export_target(recipe.export, overwrite)  # again: something may have appeared meanwhile
        if problem:
            raise RecipeError([problem], recipe.source)
        export_dir = save(
            loaded.model,
            recipe.export.dir,
            result,
            recipe=recipe,
            eval_results={"before": before, "after": after},
            tokenizer=loaded.tokenizer,
            overwrite=overwrite or recipe.export.overwrite,
            sparse_format=recipe.export.sparse_format,
        )
    return RunResult(loaded.model, result, before, after, export_dir)
