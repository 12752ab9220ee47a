"""The engine: ``apply`` runs compression steps on a model; ``prepare`` readies one for a training pass.

The whole engine is one plain loop: for each step, look the pass up, build its config, select its target
modules, call the pass. No session or global state: everything a run decided is in the returned ``ApplyResult``
(per-step reports, handles of runtime/training passes). A step is a ``StepSpec``, parsed and checked here
(``parse_step``, ``check_steps_on_model``) for the Python API and for recipes alike.

The engine imports the registry, the target selection, the config mechanism, the errors and the per-layer
checkpoints, never the model builders, the evaluators, the trainer or the recipe file format: those sit on top
of it (``compressx.runner``). docs/architecture.md draws the layers.
"""

from __future__ import annotations

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
from compressx.errors import CompressxError, ConfigError, DataError, RecipeError, TargetError, unknown_key_message
from compressx.registry import PassContext, PassSpec, get_pass, summarize_report
from compressx.targets import select_step_targets, unsupported_problems, weight_tensors

log = logging.getLogger(__name__)

STEP_KEYS = ("pass", "targets", "ignore", "config")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One step: a pass, its config, and the modules it applies to."""

    pass_name: str
    config: PassConfig
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.pass_name}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        out["config"] = self.config.to_dict()
        return out


def _string_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"got {value!r}; expected a list of patterns (strings)", path=path)
    return tuple(value)


def check_targets_not_empty(targets: Sequence[str] | None, spec: PassSpec, path: str) -> None:
    """An empty ``targets`` list is an error: it would select nothing (or, read as "unset", the whole model)."""
    if targets is not None and len(targets) == 0:
        default = ", ".join(spec.default_targets) if spec.default_targets else "the whole model"
        raise ConfigError(
            f"an empty list selects nothing; omit the key for the pass's default targets ({default})",
            path=f"{path}.targets",
        )


def parse_step(block: Any, path: str) -> StepSpec:
    """Validate one step mapping; ``ConfigError.path`` is relative to the recipe root."""
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping with a 'pass' key, got {block!r}", path=path)
    for key in block:
        if key not in STEP_KEYS:
            raise ConfigError(unknown_key_message(str(key), STEP_KEYS), path=f"{path}.{key}")
    if "pass" not in block:
        raise ConfigError("a step needs 'pass: <name>' (see `compressx list`)", path=f"{path}.pass")
    if not isinstance(block["pass"], str):
        raise ConfigError(f"got {block['pass']!r}; expected a pass name (see `compressx list`)", path=f"{path}.pass")
    try:
        spec = get_pass(block["pass"])
    except CompressxError as err:
        raise ConfigError(str(err), path=f"{path}.pass") from err
    config_block = block.get("config") or {}
    if not isinstance(config_block, dict):
        raise ConfigError(f"expected a mapping, got {config_block!r}", path=f"{path}.config")
    try:
        config = spec.config.from_dict(config_block)
    except ConfigError as err:
        raise err.under(f"{path}.config") from err
    targets = _string_list(block["targets"], f"{path}.targets") if block.get("targets") is not None else None
    check_targets_not_empty(targets, spec, path)
    ignore = _string_list(block["ignore"], f"{path}.ignore") if block.get("ignore") is not None else ()
    if (targets is not None or ignore) and not spec.takes_targets:
        raise ConfigError(f"pass '{spec.name}' acts on the whole model and takes no targets/ignore", path=path)
    return StepSpec(pass_name=spec.name, config=config, targets=targets, ignore=ignore)


def check_steps_on_model(model: Any, steps: Sequence[tuple[StepSpec, PassSpec]]) -> list[str]:
    """Resolve every step's targets on ``model`` (a meta model will do) and run the passes' model and shape checks.

    ``model`` is an ``nn.Module``, or, for pipeline passes, a pipeline or its ``model_index.json`` mapping.
    """
    problems = []
    for i, (step, spec) in enumerate(steps):
        if spec.check_model:
            problems += [f"steps[{i}]: {p}" for p in spec.check_model(model, step.config)]
        if not spec.takes_targets or not isinstance(model, nn.Module):
            continue
        targets = step.targets or None
        try:
            chosen = select_step_targets(
                model, targets, step.ignore, spec.target_types, f"steps[{i}]", spec.default_targets
            )
        except TargetError as err:
            problems.append(str(err))
            continue
        unsupported = unsupported_problems(
            model, chosen, targets, step.ignore, spec.target_types, spec.name, spec.default_targets
        )
        problems += [f"steps[{i}]: {p}" for p in unsupported]
        if spec.check:
            problems += [f"steps[{i}]: {p}" for p in spec.check(chosen, step.config)]
    return problems


def check_families(family: str, steps: Sequence[StepSpec]) -> list[str]:
    """A problem per step whose pass does not declare the model's family (``any``: a model compressx cannot place)."""
    problems = []
    for i, step in enumerate(steps):
        families = get_pass(step.pass_name).families
        if family not in families:
            problems.append(
                f"steps[{i}]: pass '{step.pass_name}' applies to {', '.join(families)} models; this model is {family}"
            )
    return problems


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
    needs = [spec.needs_for(step.config) for step, spec in parsed]
    problems = check_steps_on_model(model, parsed)
    problems += [
        f"steps[{i}]: pass '{spec.name}' needs calibration data: pass data=..."
        for i, (_, spec) in enumerate(parsed)
        if "calibration" in needs[i] and data is None
    ]
    if problems:
        raise RecipeError(problems, "<steps>")
    if data is not None and any("calibration" in step_needs for step_needs in needs):
        problem = check_calibration(model, data)
        if problem:
            raise DataError(f"data: {problem}")
    # Dense values for steps that refine what an earlier step pruned: copied before anything changes (by
    # ``weight_tensors``' names: a module's name for its weight, ``name.param`` for fused experts' 3-D parameters).
    originals = {
        i: {
            key: weight.detach().to("cpu", copy=True)
            for name, module in select_step_targets(
                model, step.targets or None, step.ignore, spec.target_types, f"steps[{i}]", spec.default_targets
            ).items()
            for key, weight in weight_tensors(name, module).items()
        }
        for i, (step, spec) in enumerate(parsed)
        if "original_weights" in needs[i]
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
