"""Recipes: YAML files (loaded with omegaconf) that name a model, calibration data, steps, metrics and an export.

```yaml
model:  {source: zoo, id: llama_byte_1m, dtype: float32}
data:   {calibration: {source: stdlib_text, split: train, samples: 128, seq_len: 512, seed: 0}}
steps:
  - pass: magnitude
    targets: ["re:.*mlp.*"]
    ignore: ["lm_head"]
    config: {sparsity: 0.5, pattern: unstructured}
eval:   [{metric: perplexity, data: {source: stdlib_text, split: test, samples: 64, seq_len: 256}}]
export: {dir: out/name}
```

A recipe whose last step is a training pass (``lbc``, ``spre``, ...) also has a ``train:`` block, run by the
built-in trainer (``compressx.trainer``) between preparing the model and finalising it.

Every block is validated strictly: an unknown key anywhere is an error naming the file, the path
(``steps[1].config.sparsty``), the allowed keys and the closest match. Problems are collected, not stopped at the
first, so one ``compressx validate`` run lists them all. ``check_recipe`` adds the checks that need the model:
targets resolved against the architecture built on the meta device (no weights, no data read).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compressx.config import PassConfig
from compressx.data import DataSpec, parse_data_spec
from compressx.errors import CompressxError, ConfigError, RecipeError, TargetError, unknown_key_message
from compressx.evaluate import EvalSpec, check_metric_applies, parse_eval_spec
from compressx.models import ModelSpec, build_model, parse_model_spec
from compressx.registry import PassSpec, get_pass
from compressx.targets import select_targets
from compressx.trainer import TrainSpec, parse_train_spec

TOP_KEYS = ("model", "data", "steps", "train", "eval", "export")
STEP_KEYS = ("pass", "targets", "ignore", "config")
EXPORT_KEYS = ("dir", "overwrite", "sparse_format")
DATA_KEYS = ("calibration",)


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


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """Where to export, and whether to also write the sparse weights bitmask-packed (``docs/export.md``)."""

    dir: str
    overwrite: bool = False
    sparse_format: str = "none"


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[StepSpec, ...]
    model: ModelSpec | None = None
    calibration: DataSpec | None = None
    eval: tuple[EvalSpec, ...] = ()
    export: ExportSpec | None = None
    source: str = "<recipe>"
    train: TrainSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), as written to an export's ``recipe.yaml``."""
        out: dict[str, Any] = {}
        if self.model:
            out["model"] = self.model.to_dict()
        if self.calibration:
            out["data"] = {"calibration": self.calibration.to_dict()}
        out["steps"] = [s.to_dict() for s in self.steps]
        if self.train:
            out["train"] = self.train.to_dict()
        if self.eval:
            out["eval"] = [e.to_dict() for e in self.eval]
        if self.export:
            out["export"] = dataclasses.asdict(self.export)
        return out


def _string_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"got {value!r}; expected a list of patterns (strings)", path=path)
    return tuple(value)


def parse_step(block: Any, path: str) -> StepSpec:
    """Validate one step mapping; ``ConfigError.path`` is relative to the recipe root."""
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping with a 'pass' key, got {block!r}", path=path)
    for key in block:
        if key not in STEP_KEYS:
            raise ConfigError(unknown_key_message(str(key), STEP_KEYS), path=f"{path}.{key}")
    if "pass" not in block:
        raise ConfigError("a step needs 'pass: <name>' (see `compressx list`)", path=f"{path}.pass")
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
    ignore = _string_list(block["ignore"], f"{path}.ignore") if block.get("ignore") is not None else ()
    if (targets is not None or ignore) and not spec.takes_targets:
        raise ConfigError(f"pass '{spec.name}' acts on the whole model and takes no targets/ignore", path=path)
    return StepSpec(pass_name=spec.name, config=config, targets=targets, ignore=ignore)


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; raises ``RecipeError`` listing every problem found."""
    problems: list[str] = []

    def block(path: str, parse, value):
        try:
            return parse(value)
        except ConfigError as err:
            problems.extend(err.under(path).lines())
        except CompressxError as err:
            problems.append(f"{path}: {err}")
        return None

    if not isinstance(raw, dict):
        raise RecipeError([f"a recipe is a mapping with keys {', '.join(TOP_KEYS)}, got {type(raw).__name__}"], source)
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{key}: {unknown_key_message(str(key), TOP_KEYS)}")
    model = block("model", parse_model_spec, raw["model"]) if "model" in raw else None

    calibration = None
    data = raw.get("data")
    if data is not None:
        if not isinstance(data, dict):
            problems.append(f"data: expected a mapping with key 'calibration', got {data!r}")
        else:
            for key in data:
                if key not in DATA_KEYS:
                    problems.append(f"data.{key}: {unknown_key_message(str(key), DATA_KEYS)}")
            if "calibration" in data:
                calibration = block("data.calibration", parse_data_spec, data["calibration"])

    steps: list[StepSpec] = []
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append("steps: a recipe needs a non-empty list of steps")
    else:
        for i, step in enumerate(raw_steps):
            try:
                steps.append(parse_step(step, f"steps[{i}]"))
            except ConfigError as err:
                problems.extend(err.lines())

    train = block("train", parse_train_spec, raw["train"]) if raw.get("train") is not None else None
    kinds = [get_pass(s.pass_name).kind for s in steps]
    training = [i for i, kind in enumerate(kinds) if kind == "training"]
    if training and (len(training) > 1 or training[0] != len(steps) - 1):
        problems.append(f"steps: a recipe takes one training pass, as its last step; got training steps {training}")
    if training and train is None and raw.get("train") is None:  # absent or null, not merely invalid
        problems.append(
            f"train: steps[{training[0]}] is a training pass ('{steps[training[0]].pass_name}'); add a train block"
        )
    if train is not None and not training:
        problems.append("train: the train block drives a training pass (lbc, spre, ...), but no step is one")

    evals: list[EvalSpec] = []
    raw_eval = raw.get("eval") or []
    if not isinstance(raw_eval, list):
        problems.append("eval: expected a list of {metric, data} mappings")
    else:
        for i, entry in enumerate(raw_eval):
            parsed = block(f"eval[{i}]", parse_eval_spec, entry)
            if parsed:
                evals.append(parsed)

    export = None
    raw_export = raw.get("export")
    if raw_export is not None:
        if not isinstance(raw_export, dict) or not isinstance(raw_export.get("dir"), str):
            problems.append(f"export: expected {{dir: <directory>}}, got {raw_export!r}")
        else:
            for key in raw_export:
                if key not in EXPORT_KEYS:
                    problems.append(f"export.{key}: {unknown_key_message(str(key), EXPORT_KEYS)}")
            if not isinstance(raw_export.get("overwrite", False), bool):
                problems.append("export.overwrite: expected true or false")
            from compressx.export import SPARSE_FORMATS  # the values save() accepts: one list, kept there

            sparse_format = raw_export.get("sparse_format", "none")
            if not isinstance(sparse_format, str) or sparse_format not in SPARSE_FORMATS:
                problems.append(f"export.sparse_format: got {sparse_format!r}; allowed: {', '.join(SPARSE_FORMATS)}")
            export = ExportSpec(
                dir=raw_export["dir"],
                overwrite=bool(raw_export.get("overwrite", False)),
                sparse_format=str(sparse_format),
            )

    if problems:
        raise RecipeError(problems, source)
    return Recipe(tuple(steps), model, calibration, tuple(evals), export, source, train)


def _apply_override(cfg: Any, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form key.path=value")
    value = yaml.safe_load(text) if text else ""
    OmegaConf.update(cfg, key.strip(), value, merge=True)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (omegaconf dotlist, e.g. ``steps.0.config.sparsity=0.6``) and validate a recipe file."""
    source = str(path)
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError as err:
        raise RecipeError(["no such recipe file"], source) from err
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise RecipeError([f"cannot read YAML: {err}"], source) from err
    for override in overrides:
        try:
            _apply_override(cfg, override)
        except (ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
            raise RecipeError([f"override {override!r}: {err}"], source) from err
    raw = OmegaConf.to_container(cfg, resolve=True)
    return parse_recipe(raw, source)


def check_export_target(export: ExportSpec, overwrite: bool = False) -> str | None:
    """A problem with the export directory, found before any work is done; None when it is fine."""
    target = Path(export.dir)
    if target.exists() and not (overwrite or export.overwrite):
        return f"export.dir: {target} exists; pass --overwrite (or export.overwrite: true) to replace it"
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"export.dir: cannot create {target}: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK):
        return f"export.dir: cannot write under {parent}"
    return None


def check_steps_on_model(model: nn.Module, steps: Sequence[tuple[StepSpec, PassSpec]]) -> list[str]:
    """Resolve every step's targets on ``model`` (a meta model will do) and run the passes' shape checks."""
    problems = []
    for i, (step, spec) in enumerate(steps):
        if not spec.takes_targets:
            continue
        try:
            chosen = select_targets(
                model, step.targets or spec.default_targets, step.ignore, spec.target_types, f"steps[{i}]"
            )
        except TargetError as err:
            problems.append(str(err))
            continue
        if spec.check:
            problems += [f"steps[{i}]: {p}" for p in spec.check(chosen, step.config)]
    return problems


def check_recipe(recipe: Recipe, overwrite: bool = False) -> None:
    """Checks that need the model (built on the meta device): targets, shapes, metrics, calibration, export."""
    problems = []
    if recipe.export:
        problem = check_export_target(recipe.export, overwrite)
        if problem:
            problems.append(problem)
    if recipe.model is None:
        problems.append("model: a recipe run from the CLI needs a model block")
        raise RecipeError(problems, recipe.source)
    try:
        loaded = build_model(recipe.model, meta=True)
    except CompressxError as err:
        problems.append(f"model: {err}")
        raise RecipeError(problems, recipe.source) from err
    if isinstance(loaded.model, nn.Module):
        problems += check_steps_on_model(loaded.model, [(s, get_pass(s.pass_name)) for s in recipe.steps])
    else:
        problems += [
            f"steps[{i}]: pass '{s.pass_name}' changes torch modules; a {recipe.model.source} pipeline is not one"
            for i, s in enumerate(recipe.steps)
            if get_pass(s.pass_name).kind != "pipeline"
        ]
    for i, step in enumerate(recipe.steps):
        if "calibration" in get_pass(step.pass_name).needs and recipe.calibration is None:
            problems.append(f"steps[{i}]: pass '{step.pass_name}' needs calibration data: add data.calibration")
    for i, spec in enumerate(recipe.eval):
        problem = check_metric_applies(spec, loaded.family)
        if problem:
            problems.append(f"eval[{i}]: {problem}")
    if problems:
        raise RecipeError(problems, recipe.source)
