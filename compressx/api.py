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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.checkpoint import CheckpointDir, LayerCheckpoints, tensor_digest
from compressx.config import PassConfig
from compressx.errors import DataError, RecipeError
from compressx.recipe import (
    Recipe,
    StepSpec,
    check_export_target,
    check_recipe,
    check_steps_on_model,
    check_targets_not_empty,
    checkpoint_dirs,
    parse_step,
    recipe_fingerprint,
)
from compressx.registry import PassContext, PassSpec, get_pass, summarize_report
from compressx.targets import select_step_targets
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
        check_targets_not_empty(targets, spec, f"steps[{index}]")
        targets = tuple(targets) if targets is not None else None
        return StepSpec(spec.name, config, targets, tuple(step.get("ignore", ()))), spec
    if isinstance(step, dict) and isinstance(step.get("config"), PassConfig):
        step = dict(step, config=step["config"].to_dict())
    parsed = parse_step(step, f"steps[{index}]")
    return parsed, get_pass(parsed.pass_name)


def _input_vocabulary(model: Any) -> int | None:
    """The size of the model's input embedding table (a language model's vocabulary), or None when it has none."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _check_token_ids(ids: torch.Tensor, vocabulary: int | None, what: str) -> str | None:
    if ids.numel() == 0:
        return f"{what} is empty (shape {list(ids.shape)})"
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        return f"{what} must hold integer token ids (torch.long), got {ids.dtype}"
    if vocabulary is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocabulary):
        return (
            f"{what} holds token ids from {int(ids.min())} to {int(ids.max())}; "
            f"the model's vocabulary is 0 to {vocabulary - 1}"
        )
    return None


def check_calibration(model: Any, data: Any) -> str | None:
    """What makes calibration ``data`` unusable for ``model``, or None.

    A tensor for a language model (a model with an input embedding table) is ``[samples, seq_len]`` token ids in
    its vocabulary; any tensor must be non-empty. A list of model-input mappings (multimodal prompts) must be
    non-empty, and their ``input_ids`` integers (not range-checked: some processors use image-token ids past the
    text vocabulary, which the model replaces before embedding). A dataset or data loader (calibration images)
    must not be empty.
    """
    vocabulary = _input_vocabulary(model)
    if isinstance(data, torch.Tensor):
        if vocabulary is None:
            return f"the calibration tensor is empty (shape {list(data.shape)})" if data.numel() == 0 else None
        problem = _check_token_ids(data, vocabulary, "the calibration tensor")
        if problem is None and data.dim() != 2:
            problem = f"expected [samples, seq_len] token ids, got a tensor of shape {list(data.shape)}"
        return problem
    if isinstance(data, torch.utils.data.Dataset | torch.utils.data.DataLoader):  # images for the ViT passes
        return "the calibration dataset is empty" if hasattr(data, "__len__") and len(data) == 0 else None
    if not isinstance(data, dict | list | tuple):
        return f"expected a token tensor, model-input mappings or a dataset, got {type(data).__name__}"
    items = [data] if isinstance(data, dict) else data
    if not items:
        return "the calibration data is an empty list"
    for i, item in enumerate(items):
        ids = item.get("input_ids") if isinstance(item, dict) else None
        if isinstance(ids, torch.Tensor):
            problem = _check_token_ids(ids, None, f"item {i}'s input_ids")
            if problem:
                return problem
    return None


def _layer_checkpoints(
    store: CheckpointDir | None, resume: bool, index: int, step: StepSpec, originals: dict[str, torch.Tensor] | None
) -> LayerCheckpoints | None:
    """Step ``index``'s per-layer checkpoints in ``store``, identified by the pass, its config and the dense weights
    a refining step starts from (``begin`` adds the model and the data)."""
    if store is None:
        return None
    identity = {"step": index, "pass": step.pass_name, "config": step.config.to_dict()}
    if originals is not None:
        identity["original_weights"] = tensor_digest(sorted(originals.items()))
    return LayerCheckpoints(store, index, identity, resume)


def apply(
    model: nn.Module,
    steps: Sequence[StepLike],
    data: Any = None,
    *,
    progress: bool = True,
    checkpoint: CheckpointDir | None = None,
    resume: bool = False,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> ApplyResult:
    """Apply compression steps to ``model`` in place, in order.

    Every step is checked (config, targets, shapes, calibration data) before the first one runs, so a bad step
    never leaves the model half-compressed.

    Args:
        model: the model (an ``nn.Module``; a diffusers pipeline for pipeline passes).
        steps: ``StepSpec`` objects or mappings ``{"pass": name | decorated fn, "config": {...} | PassConfig,
            "targets": [...], "ignore": [...]}``.
        data: calibration data for passes that need it (e.g. a ``[samples, seq_len]`` token tensor); unusable data
            (empty, float token ids, ids outside the vocabulary) raises ``DataError`` before anything changes.
        progress: show progress bars.
        checkpoint: an opened checkpoint directory where layer-by-layer passes (wanda, sparsegpt, dsnot) save
            each pruned decoder layer (``compressx.checkpoint``).
        resume: load the layers saved there by an interrupted run instead of pruning them again.
        evaluate: optional ``evaluate(model) -> {label: value}`` on held-out data; passes that work in stages
            (``isvit``, ``repq_vit``, ``ptq_minmax``) report its values after each stage (``stage_eval``).

    Returns:
        An ``ApplyResult`` with one ``StepResult`` (report, handle) per step.
    """
    parsed = [_as_step(step, i) for i, step in enumerate(steps)]
    problems = check_steps_on_model(model, parsed)
    problems += [
        f"steps[{i}]: pass '{spec.name}' needs calibration data: pass data=..."
        for i, (_, spec) in enumerate(parsed)
        if "calibration" in spec.needs and data is None
    ]
    if problems:
        raise RecipeError(problems, "<steps>")
    if data is not None and any("calibration" in spec.needs for _, spec in parsed):
        problem = check_calibration(model, data)
        if problem:
            raise DataError(f"data: {problem}")
    # Dense values for steps that refine what an earlier step pruned: copied before anything changes.
    originals = {
        i: {
            name: module.weight.detach().to("cpu", copy=True)
            for name, module in select_step_targets(
                model, step.targets or None, step.ignore, spec.target_types, f"steps[{i}]", spec.default_targets
            ).items()
        }
        for i, (step, spec) in enumerate(parsed)
        if getattr(step.config, "needs_original_weights", False)
    }
    results = []
    for i, (step, spec) in enumerate(tqdm(parsed, desc="compressx steps", disable=not progress or len(parsed) < 2)):
        # Targets are resolved again here: an earlier step may have replaced modules.
        targets = (
            select_step_targets(
                model, step.targets or None, step.ignore, spec.target_types, f"steps[{i}]", spec.default_targets
            )
            if spec.takes_targets
            else {}
        )
        start = time.perf_counter()
        context = PassContext(
            targets,
            calibration=data,
            progress=progress,
            original_weights=originals.get(i),
            checkpoint=_layer_checkpoints(checkpoint, resume, i, step, originals.get(i)),
            evaluate=evaluate,
        )
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
    from compressx.trainer import train

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
    from compressx import data as data_mod
    from compressx.evaluate import evaluate
    from compressx.export import save
    from compressx.models import build_model

    # Everything that can be checked without weights is checked first: no hour of work before a typo error.
    check_recipe(recipe, overwrite=overwrite, run_model_code=True)  # apply runs model code it is told to trust
    stores = open_checkpoint_dirs(recipe, resume)
    if recipe.train is not None:
        torch.manual_seed(recipe.train.seed)  # the init of a model built from scratch (pretrained: false)
    loaded = build_model(recipe.model, progress=progress)
    calibration = None
    if recipe.calibration is not None:
        calibration = data_mod.load_calibration(recipe.calibration, loaded.tokenizer)
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
        from compressx.report import write_report

        report = str(write_report(export_dir))
    return RunResult(loaded.model, result, before, after, export_dir, report)
