"""The recipe runner: ``run_recipe`` is what ``compressx apply recipe.yaml`` does, ``check_recipe`` what
``compressx validate`` does.

It sits on top of the engine (``compressx.engine``) and the recipe file format (``compressx.recipe``): it builds
the model (``compressx.models``), loads the calibration data, evaluates before and after, runs the built-in trainer
for a training step, and exports (``compressx.export``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compressx.builtin_trainer import train
from compressx.checkpoint import CheckpointDir
from compressx.data import load_calibration
from compressx.engine import ApplyResult, StepResult, apply, check_families, check_steps_on_model
from compressx.errors import CompressxError, RecipeError
from compressx.evaluate import check_metric_applies, evaluate
from compressx.export import overwrite_problem, recover_leftovers, save
from compressx.models import build_model
from compressx.push import PushResult, push_to_hub, token_problem
from compressx.recipe import ExportSpec, Recipe, check_checkpoint_dirs, checkpoint_dirs, recipe_fingerprint
from compressx.registry import get_pass, summarize_report
from compressx.report import report_target_problem, write_report
from compressx.threads import tiny_model_threads

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What ``run_recipe`` produced."""

    model: Any
    result: ApplyResult
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    export_dir: str | None
    pushed: PushResult | None = None  # what the export block's push_to_hub uploaded
    report: str | None = None  # report.html, when the recipe's export block asks for one


def is_main_process() -> bool:
    """False on the non-main processes of a distributed run (``accelerate launch``), which must not export."""
    from accelerate import PartialState

    return PartialState().is_main_process


def open_checkpoint_dirs(recipe: Recipe, resume: bool) -> dict[str, CheckpointDir]:
    """The recipe's checkpoint directories (path -> ``CheckpointDir``), created or checked, before any work.

    Refused: ``resume`` when the recipe keeps no checkpoints; a directory compressx did not create; checkpoints
    of an earlier run without ``resume``; with ``resume``, checkpoints of a run with another fingerprint. Only the
    main process of a distributed run writes there.
    """
    dirs = checkpoint_dirs(recipe)
    if resume and not dirs:
        raise RecipeError(
            [
                "--resume: this recipe keeps no checkpoints; add train.checkpoint: {dir: ..., every: N} (training) "
                "or checkpoint: {dir: ...} (layer-by-layer steps: wanda, sparsegpt, dsnot)"
            ],
            recipe.source,
        )
    fingerprint = recipe_fingerprint(recipe)
    stores = {directory: CheckpointDir(directory, fingerprint) for directory in dirs}
    if is_main_process():
        for store in stores.values():
            store.open(resume)
    return stores


def _train_and_finalize(
    model: nn.Module,
    recipe: Recipe,
    step: StepResult,
    progress: bool,
    stores: dict[str, CheckpointDir] | None = None,
    resume: bool = False,
) -> None:
    """Run the built-in trainer on the recipe's training step, finalise it, and record both in its report."""
    store = (stores or {}).get(recipe.train.checkpoint.dir) if recipe.train.checkpoint else None
    summary = train(model, recipe.train, [step.handle], progress=progress, resume=resume, store=store)
    step.handle.finalize()
    step.report = {
        **step.report,
        **step.handle.final_report,
        "schedule": step.handle.history,
        "training": summary,
    }
    log.info("step %s finalized after training: %s", step.pass_name, summarize_report(step.handle.final_report))


def run_recipe(
    recipe: Recipe, *, overwrite: bool = False, progress: bool = True, export: bool = True, resume: bool = False
) -> RunResult:
    """Build the model, evaluate, apply the steps, evaluate again, export. What ``compressx apply`` runs.

    With ``resume``, layer-by-layer steps and training continue from the recipe's checkpoints
    (``checkpoint``, ``train.checkpoint``) where an interrupted run left them. A zoo model's recipe runs with the
    tiny-model thread count (``compressx.threads``): far faster on a shared machine, and the numbers are those
    of any other machine.
    """
    threads = tiny_model_threads() if recipe.model.source == "zoo" else contextlib.nullcontext()
    with threads:
        return _run_recipe(recipe, overwrite=overwrite, progress=progress, export=export, resume=resume)


def _run_recipe(recipe: Recipe, *, overwrite: bool, progress: bool, export: bool, resume: bool) -> RunResult:
    # Everything that can be checked without weights is checked first: no hour of work before a typo error.
    check_recipe(recipe, overwrite=overwrite, run_model_code=True)  # apply runs model code it is told to trust
    stores = open_checkpoint_dirs(recipe, resume)
    if recipe.train is not None:
        torch.manual_seed(recipe.train.seed)  # the init of a model built from scratch (pretrained: false)
    loaded = build_model(recipe.model, progress=progress)
    calibration = None
    if recipe.calibration is not None:
        calibration = load_calibration(recipe.calibration, loaded.tokenizer)
    before = evaluate(loaded.model, loaded.tokenizer, list(recipe.eval), progress)
    layer_store = stores.get(recipe.checkpoint.dir) if recipe.checkpoint else None
    measure = None
    if recipe.eval:  # passes may report the recipe's metrics after each of their stages

        def measure(model: nn.Module) -> dict[str, float]:
            return evaluate(model, loaded.tokenizer, list(recipe.eval), progress=False)

    result = apply(
        loaded.model,
        recipe.steps,
        calibration,
        progress=progress,
        checkpoint=layer_store,
        resume=resume,
        evaluate=measure,
    )
    if recipe.train is not None:
        _train_and_finalize(loaded.model, recipe, result.steps[-1], progress, stores, resume)
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
    report = None
    if export_dir and recipe.export.report:
        report = str(write_report(export_dir))
    pushed = None
    if export_dir and recipe.export.push_to_hub:  # only a written export, verified again by push_to_hub
        spec = recipe.export.push_to_hub
        pushed = push_to_hub(
            export_dir,
            spec.repo_id,
            private=spec.private,
            revision=spec.revision,
            commit_message=spec.commit_message,
        )
    return RunResult(loaded.model, result, before, after, export_dir, pushed, report)


def check_export_target(export: ExportSpec, overwrite: bool = False) -> str | None:
    """A problem with the export directory, found before any work is done; None when it is fine."""
    target = Path(export.dir)
    recover_leftovers(target)  # a killed run's old export is put back before it is judged
    if os.path.lexists(target):
        if not (overwrite or export.overwrite):
            return f"export.dir: {target} exists; pass --overwrite (or export.overwrite: true) to replace it"
        problem = overwrite_problem(target)  # the same rule save() applies: only a compressx export is replaced
        if problem:
            return f"export.dir: {problem}"
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"export.dir: cannot create {target}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK):
        return f"export.dir: cannot write under {parent}"
    return None


def check_recipe(recipe: Recipe, overwrite: bool = False, run_model_code: bool = False) -> None:
    """Checks that need the model (built on the meta device): targets, shapes, metrics, calibration, export.

    Python code shipped with a model (``trust_remote_code``) runs only with ``run_model_code=True``, as
    ``compressx apply`` passes (it runs that code when it builds the model anyway); ``validate`` never runs it.
    """
    problems = []
    if recipe.export:
        problem = check_export_target(recipe.export, overwrite)
        if problem:
            problems.append(problem)
        if recipe.export.report:
            problem = report_target_problem(recipe.export.dir)
            if problem:
                problems.append(f"export.report: {problem}")
    if recipe.export and recipe.export.push_to_hub:
        problem = token_problem()
        if problem:
            problems.append(f"export.push_to_hub: {problem}")
    problems += check_checkpoint_dirs(recipe)
    if recipe.model is None:
        problems.append("model: a recipe run from the CLI needs a model block")
        raise RecipeError(problems, recipe.source)
    try:
        loaded = build_model(recipe.model, meta=True, run_model_code=run_model_code)
    except CompressxError as err:
        if recipe.model.kwargs.get("trust_remote_code") and not run_model_code:
            problems.append(
                "model.kwargs.trust_remote_code: validate never runs Python code shipped with a model, and this "
                "architecture is defined by such code; `compressx apply` runs it and checks the steps then"
            )
        else:
            problems.append(f"model: {err}")
        raise RecipeError(problems, recipe.source) from err
    family_problems = check_families(loaded.family, recipe.steps)
    problems += family_problems
    if not isinstance(loaded.model, nn.Module):
        problems += [
            f"steps[{i}]: pass '{s.pass_name}' changes torch modules; a {recipe.model.source} pipeline is not one"
            for i, s in enumerate(recipe.steps)
            if get_pass(s.pass_name).kind != "pipeline"
        ]
    # A step on the wrong family would only add its own version of the same refusal: keep the family problem.
    wrong_family = tuple(p.split(":", 1)[0] for p in family_problems)  # "steps[i]"
    problems += [
        p
        for p in check_steps_on_model(loaded.model, [(s, get_pass(s.pass_name)) for s in recipe.steps])
        if not p.startswith(tuple(f"{w}{sep}" for w in wrong_family for sep in ":."))
    ]
    for i, step in enumerate(recipe.steps):
        if "calibration" in get_pass(step.pass_name).needs_for(step.config) and recipe.calibration is None:
            problems.append(f"steps[{i}]: pass '{step.pass_name}' needs calibration data: add data.calibration")
    for i, spec in enumerate(recipe.eval):
        problem = check_metric_applies(spec, loaded.family)
        if problem:
            problems.append(f"eval[{i}]: {problem}")
    if problems:
        raise RecipeError(problems, recipe.source)
