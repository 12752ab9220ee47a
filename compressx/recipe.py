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
targets resolved against the architecture built on the meta device (no weights, no data read, no code shipped
with the model run).

A recipe file is read only when it is small UTF-8 YAML of a sane shape (``MAX_RECIPE_BYTES``, ``MAX_YAML_VALUES``
with aliases expanded, ``MAX_YAML_DEPTH``), checked on the parser's event stream before any tree is built.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException, UnsupportedInterpolationType

from compressx.checkpoint import CheckpointSpec, check_checkpoint_dir, json_digest, parse_checkpoint_spec
from compressx.config import PassConfig
from compressx.data import DataSpec, parse_calibration_spec
from compressx.errors import CompressxError, ConfigError, RecipeError, TargetError, unknown_key_message
from compressx.evaluate import EvalSpec, check_metric_applies, parse_eval_spec
from compressx.images import ImageDataSpec
from compressx.models import ModelSpec, build_model, parse_model_spec
from compressx.registry import PassSpec, get_pass
from compressx.targets import select_step_targets, unsupported_problems
from compressx.trainer import TrainSpec, parse_train_spec

TOP_KEYS = ("model", "data", "steps", "train", "eval", "export", "checkpoint")
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
    calibration: DataSpec | ImageDataSpec | None = None
    eval: tuple[EvalSpec, ...] = ()
    export: ExportSpec | None = None
    source: str = "<recipe>"
    train: TrainSpec | None = None
    checkpoint: CheckpointSpec | None = None  # per-layer checkpoints of layer-by-layer steps (--resume)

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
        if self.checkpoint:
            out["checkpoint"] = {"dir": self.checkpoint.dir}
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
                calibration = block("data.calibration", parse_calibration_spec, data["calibration"])

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
        # relative file paths in an eval entry (lm_eval's task_dir) start from the recipe's folder
        recipe_dir = str(Path(source).parent) if source != "<recipe>" else None
        for i, entry in enumerate(raw_eval):
            parsed = block(f"eval[{i}]", lambda e: parse_eval_spec(e, recipe_dir), entry)
            if parsed:
                evals.append(parsed)

    export = None
    raw_export = raw.get("export")
    if raw_export is not None:
        if not isinstance(raw_export, dict) or not isinstance(raw_export.get("dir"), str) or not raw_export["dir"]:
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

    checkpoint = None
    if raw.get("checkpoint") is not None:
        checkpoint = block("checkpoint", parse_layer_checkpoint_spec, raw["checkpoint"])

    if problems:
        raise RecipeError(problems, source)
    return Recipe(tuple(steps), model, calibration, tuple(evals), export, source, train, checkpoint)


def parse_layer_checkpoint_spec(block: Any) -> CheckpointSpec:
    """The top-level ``checkpoint: {dir: ...}``: where layer-by-layer steps save each pruned layer."""
    return parse_checkpoint_spec(block, keys=("dir",))


def recipe_fingerprint(recipe: Recipe) -> dict[str, str]:
    """Digests of what decides a run's result (model, calibration data, steps, training), by part: a checkpoint
    written by one recipe is resumed only by a recipe with the same ones. Eval, export and the checkpoint
    settings themselves may change between the interrupted run and its resumption."""
    parts = {
        "model": recipe.model.to_dict() if recipe.model else None,
        "data.calibration": recipe.calibration.to_dict() if recipe.calibration else None,
        "steps": [s.to_dict() for s in recipe.steps],
        "train": recipe.train.fingerprint() if recipe.train else None,
    }
    return {name: json_digest(value) for name, value in parts.items()}


def checkpoint_dirs(recipe: Recipe) -> list[str]:
    """The checkpoint directories a recipe writes to (train.checkpoint, then the top-level one), each once."""
    dirs = [spec.dir for spec in (recipe.train.checkpoint if recipe.train else None, recipe.checkpoint) if spec]
    return list(dict.fromkeys(dirs))


def check_checkpoint_dirs(recipe: Recipe) -> list[str]:
    """Problems with the recipe's checkpoint directories: a file, a directory compressx did not create, or one
    that is, holds or sits inside the export directory (an export replaces its whole directory)."""
    problems = [f"checkpoint: {problem}" for d in checkpoint_dirs(recipe) if (problem := check_checkpoint_dir(d))]
    if recipe.export:
        export = Path(recipe.export.dir).resolve()
        for directory in checkpoint_dirs(recipe):
            resolved = Path(directory).resolve()
            if resolved == export or export in resolved.parents or resolved in export.parents:
                problems.append(
                    f"checkpoint: {directory} overlaps export.dir {recipe.export.dir}; keep checkpoints apart from "
                    "the export"
                )
    return problems


# A recipe is a few kilobytes of YAML. These limits refuse what is not one before a parser builds anything: a huge
# file, an alias bomb ("billion laughs"), or a nesting deep enough to overflow the C stack of libyaml's composer.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000  # values (scalars, lists, mappings) with aliases expanded: omegaconf's own default limit
MAX_YAML_DEPTH = 32
OMEGACONF_RESOLVERS = ("oc.env", "oc.select", "oc.decode", "oc.create", "oc.dict.keys", "oc.dict.values")


def check_yaml_shape(text: str) -> str | None:
    """Why YAML ``text`` is too deep or too large to be a recipe, or None when it is fine.

    Walks the parser's event stream (iterative: no tree is built, nothing recurses) and counts every value, an
    ``*alias`` counting as all the values under its ``&anchor``: an alias bomb is measured, never expanded.
    Syntax errors raise ``yaml.YAMLError``.
    """
    anchored: dict[str, int] = {}  # anchor -> values under it, aliases expanded (capped just above the limit)
    open_counts: list[list] = [[0, None]]  # per open collection: [values so far, its anchor]
    written = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        line = f"line {event.start_mark.line + 1}" if event.start_mark else "recipe"
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchored:
                return f"{line}: alias *{event.anchor} refers to no complete &{event.anchor} before it"
            open_counts[-1][0] += anchored[event.anchor]
        elif isinstance(event, yaml.ScalarEvent):
            written += 1
            open_counts[-1][0] += 1
            if event.anchor:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            written += 1
            open_counts.append([1, event.anchor])
            if len(open_counts) - 1 > MAX_YAML_DEPTH:
                return f"{line}: nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs a few"
        elif isinstance(event, yaml.CollectionEndEvent):
            count, anchor = open_counts.pop()
            open_counts[-1][0] += count
            if anchor:
                anchored[anchor] = min(count, MAX_YAML_VALUES + 1)
        if written > MAX_YAML_VALUES:
            return f"{line}: more than {MAX_YAML_VALUES} values; a recipe is a small file (data belongs in data files)"
        if sum(count for count, _ in open_counts) > MAX_YAML_VALUES:
            return (
                f"{line}: YAML aliases (*name) expand the recipe to more than {MAX_YAML_VALUES} values; "
                "write the values out or use fewer aliases"
            )
    return None


def _read_recipe_text(path: str | os.PathLike) -> str:
    """The recipe file's text, refused (``RecipeError``) when missing, too large, not UTF-8 or of a bad shape."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # never more: a 50 MB file (or /dev/zero) is refused unread
    except FileNotFoundError as err:
        raise RecipeError(["no such recipe file"], source) from err
    except OSError as err:
        raise RecipeError([f"cannot read the recipe: {err.strerror or err}"], source) from err
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError([f"larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a small YAML file"], source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise RecipeError(
            [f"line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8; save the recipe as UTF-8"],
            source,
        ) from err
    try:
        problem = check_yaml_shape(text)
    except yaml.YAMLError as err:
        raise RecipeError([f"cannot read YAML: {_yaml_message(err)}"], source) from err
    if problem:
        raise RecipeError([problem], source)
    return text


def _yaml_message(err: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: where, what, and in what context."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(err).split())
    context, context_mark = err.context, err.context_mark
    where = f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})" if context_mark else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{where if context else ''}"


def _omegaconf_message(err: BaseException) -> str:
    """An omegaconf error's own message, without its multi-line ``full_key:`` / ``object_type=`` context."""
    return str(getattr(err, "msg", None) or err).split("\n")[0]


def _check_override_key(cfg: Any, key: str) -> None:
    """Refuse a key that indexes a list by name (``steps.x.pass``) or past its end, saying which indices exist."""
    parts = key.replace("[", ".").replace("]", "").split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth]) or "the recipe"
                indices = f"0 to {len(node) - 1}" if len(node) else "none: it is empty"
                example = ".".join([*parts[:depth], "0", *parts[depth + 1 :]])
                raise ValueError(
                    f"{where} is a list of {len(node)} item(s), indexed by number ({indices}): e.g. {example}"
                )
        elif not (isinstance(node, DictConfig) and part in node):
            return  # omegaconf creates missing mappings; validation then names any unknown key
        if depth == len(parts) - 1:
            return
        try:
            node = node[int(part)] if isinstance(node, ListConfig) else node[part]
        except OmegaConfBaseException:
            return  # e.g. a broken interpolation on the way: reported when the recipe is resolved


def _apply_override(cfg: Any, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError("not of the form key.path=value (e.g. steps.0.config.sparsity=0.6)")
    _check_override_key(cfg, key)
    problem = check_yaml_shape(text) if text else None
    if problem:
        raise ValueError(f"the value: {problem.removeprefix('line 1: ')}")
    value = yaml.safe_load(text) if text else ""
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (TypeError, KeyError, IndexError) as err:  # omegaconf raises these bare for some malformed keys
        raise ValueError(f"cannot set {key!r}: {err}") from err


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (omegaconf dotlist, e.g. ``steps.0.config.sparsity=0.6``) and validate a recipe file."""
    source = str(path)
    text = _read_recipe_text(path)
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as err:
        raise RecipeError([f"cannot read YAML: {_yaml_message(err)}"], source) from err
    except OmegaConfBaseException as err:
        raise RecipeError([f"cannot read YAML: {_omegaconf_message(err)}"], source) from err
    except OSError as err:  # omegaconf's word for a document that is a number or true/false
        raise RecipeError([f"a recipe is a mapping with keys {', '.join(TOP_KEYS)}; {err}"], source) from err
    for override in overrides:
        try:
            _apply_override(cfg, override)
        except OmegaConfBaseException as err:  # before ValueError: some omegaconf errors are both
            raise RecipeError([f"override {override!r}: {_omegaconf_message(err)}"], source) from err
        except yaml.YAMLError as err:
            raise RecipeError([f"override {override!r}: {_yaml_message(err)}"], source) from err
        except ValueError as err:
            raise RecipeError([f"override {override!r}: {err}"], source) from err
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except UnsupportedInterpolationType as err:
        message = f"{_omegaconf_message(err)}; resolvers: {', '.join(OMEGACONF_RESOLVERS)}"
        raise RecipeError([f"{err.full_key}: {message}"], source) from err
    except InterpolationKeyError as err:
        message = f"{_omegaconf_message(err)}; ${{a.b}} names another key of the recipe"
        raise RecipeError([f"{err.full_key}: {message}"], source) from err
    except OmegaConfBaseException as err:
        where = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise RecipeError([f"{where}cannot resolve: {_omegaconf_message(err)}"], source) from err
    return parse_recipe(raw, source)


def check_export_target(export: ExportSpec, overwrite: bool = False) -> str | None:
    """A problem with the export directory, found before any work is done; None when it is fine."""
    from compressx.export import overwrite_problem, recover_leftovers

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
        if "calibration" in get_pass(step.pass_name).needs and recipe.calibration is None:
            problems.append(f"steps[{i}]: pass '{step.pass_name}' needs calibration data: add data.calibration")
    for i, spec in enumerate(recipe.eval):
        problem = check_metric_applies(spec, loaded.family)
        if problem:
            problems.append(f"eval[{i}]: {problem}")
    if problems:
        raise RecipeError(problems, recipe.source)
