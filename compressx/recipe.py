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
built-in trainer (``compressx.builtin_trainer``) between preparing the model and finalising it.

Every block is validated strictly: an unknown key anywhere is an error naming the file, the path
(``steps[1].config.sparsty``), the allowed keys and the closest match. Problems are collected, not stopped at the
first, so one ``compressx validate`` run lists them all. ``compressx.runner.check_recipe`` adds the checks that
need the model: targets resolved against the architecture built on the meta device (no weights, no data read, no
code shipped with the model run). A step is parsed by the engine's ``parse_step`` (``compressx.engine``).

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

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException, UnsupportedInterpolationType

from compressx.builtin_trainer import TrainSpec
from compressx.checkpoint import LayerCheckpointSpec, check_checkpoint_dir, json_digest
from compressx.config import Block, option
from compressx.data import CalibrationSpec
from compressx.engine import StepSpec, parse_step
from compressx.errors import CompressxError, ConfigError, RecipeError, unknown_key_message
from compressx.evaluate import EvalSpec, parse_eval_spec
from compressx.models import ModelSpec
from compressx.push import PushSpec
from compressx.registry import get_pass

TOP_KEYS = ("model", "data", "steps", "train", "eval", "export", "checkpoint")


def _sparse_formats() -> tuple[str, ...]:
    from compressx.sparse_export import SPARSE_FORMATS  # the values save() accepts: one list, kept there

    return tuple(SPARSE_FORMATS)


@dataclasses.dataclass(frozen=True)
class ExportSpec(Block):
    """Where to export, and whether to also write the sparse weights bitmask-packed (``docs/export.md``)."""

    dir: str = option(nonempty=True)
    overwrite: bool = False
    sparse_format: str = option("none", choices=_sparse_formats)
    push_to_hub: PushSpec | None = None  # upload the export, once written and verified (compressx.push)
    report: bool = False  # also write the HTML + Markdown report beside the export (compressx.report)

    @classmethod
    def from_dict(cls, values: Any) -> ExportSpec:
        if not isinstance(values, dict) or not isinstance(values.get("dir"), str) or not values["dir"].strip():
            raise ConfigError(f"expected {{dir: <directory>}}, got {values!r}")
        return super().from_dict(values)


@dataclasses.dataclass(frozen=True)
class DataBlock(Block):
    """A recipe's ``data:`` block."""

    calibration: CalibrationSpec | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[StepSpec, ...]
    model: ModelSpec | None = None
    calibration: CalibrationSpec | None = None
    eval: tuple[EvalSpec, ...] = ()
    export: ExportSpec | None = None
    source: str = "<recipe>"
    train: TrainSpec | None = None
    checkpoint: LayerCheckpointSpec | None = None  # per-layer checkpoints of layer-by-layer steps (--resume)

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
            out["export"] = self.export.to_dict()
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint.to_dict()
        return out


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
    model = block("model", ModelSpec.from_dict, raw["model"]) if "model" in raw else None

    data = block("data", DataBlock.from_dict, raw["data"]) if raw.get("data") is not None else None
    calibration = data.calibration if data else None

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

    train = block("train", TrainSpec.from_dict, raw["train"]) if raw.get("train") is not None else None
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

    export = block("export", ExportSpec.from_dict, raw["export"]) if raw.get("export") is not None else None
    checkpoint = None
    if raw.get("checkpoint") is not None:
        checkpoint = block("checkpoint", LayerCheckpointSpec.from_dict, raw["checkpoint"])

    if problems:
        raise RecipeError(problems, source)
    return Recipe(tuple(steps), model, calibration, tuple(evals), export, source, train, checkpoint)


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
    return parse_recipe(read_recipe(path, overrides), str(path))


def read_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """A recipe file's contents, overridden and resolved (interpolations filled in), not yet validated."""
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
    return raw
