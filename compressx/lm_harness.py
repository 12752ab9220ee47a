"""The ``lm_eval`` metric: EleutherAI's lm-evaluation-harness on the in-memory model, with local tasks and data.

``eval: [{metric: lm_eval, tasks: [my_task], task_dir: lm_tasks, num_fewshot: 0, limit: 100, batch_size: 8}]``

* The model evaluated is the one in memory (through the harness's ``HFLM`` wrapper given the model instance and
  its tokenizer), so runtime passes (hooks, token withdrawal) count, as they do for the built-in metrics.
* Tasks are the harness's YAML task files in ``task_dir`` (relative paths in a recipe: from the recipe's folder);
  the harness's own task list is not searched. Each task must read local data: a local ``dataset_path`` or a
  file-reading builder (``json``, ``csv``, ``parquet``, ``text``, ``arrow``) with ``dataset_kwargs.data_files``,
  whose relative paths are read from the task file's folder. Nothing is fetched from the Hub.
* Every aggregated value of every task (e.g. ``acc``, ``acc_norm``; standard errors left out) becomes one entry
  ``lm_eval <task> <metric>`` of the recipe's before/after results, recorded in the export's manifest.

The harness is an optional extra (``pip install 'compressx[lm_eval]'``), imported only when the metric runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import random
from pathlib import Path
from typing import Any

import torch

from compressx.errors import CompressxError, ConfigError, unknown_key_message

LM_EVAL_EXTRA = "pip install 'compressx[lm_eval]'"
# datasets builders that read the files named in data_files (or found in data_dir), never the Hub
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
_KEYS = {"metric", "tasks", "task_dir", "num_fewshot", "limit", "batch_size"}

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LmEvalSpec:
    """One ``lm_eval`` entry of a recipe's eval list; ``task_dir`` is absolute once parsed from a recipe."""

    tasks: tuple[str, ...]
    task_dir: str
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    metric: str = "lm_eval"

    @property
    def settings(self) -> str:
        """`` (5-shot, limit 100)`` when either is set: two entries with other settings get other labels."""
        settings = [f"{self.num_fewshot}-shot"] if self.num_fewshot is not None else []
        settings += [f"limit {self.limit}"] if self.limit is not None else []
        return f" ({', '.join(settings)})" if settings else ""

    @property
    def label(self) -> str:
        return f"lm_eval {', '.join(self.tasks)}{self.settings}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "tasks": list(self.tasks), "task_dir": self.task_dir}
        out |= {k: getattr(self, k) for k in ("num_fewshot", "limit") if getattr(self, k) is not None}
        return out | {"batch_size": self.batch_size}


def _positive_int(block: dict, key: str, minimum: int) -> int | None:
    value = block.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"got {value!r}; expected an integer >= {minimum}", path=key)
    return value


def parse_lm_eval_spec(block: dict, base_dir: str | Path | None = None) -> LmEvalSpec:
    """Validate an ``lm_eval`` entry; a relative ``task_dir`` is taken from ``base_dir`` (else the working dir)."""
    for key in block:
        if key not in _KEYS:
            raise ConfigError(unknown_key_message(str(key), _KEYS), path=str(key))
    tasks = block.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"got {tasks!r}; expected a non-empty list of task names (from task_dir)", path="tasks")
    task_dir = block.get("task_dir")
    if not isinstance(task_dir, str) or not task_dir:
        raise ConfigError(
            f"got {task_dir!r}; expected the folder of the harness's task YAML files (local tasks only)",
            path="task_dir",
        )
    path = Path(task_dir).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    return LmEvalSpec(
        tasks=tuple(tasks),
        task_dir=str(path.resolve()),
        num_fewshot=_positive_int(block, "num_fewshot", 0),
        limit=_positive_int(block, "limit", 1),
        batch_size=_positive_int(block, "batch_size", 1) or 8,
    )


def check_lm_eval_spec(spec: LmEvalSpec) -> str | None:
    """What can be checked without running anything: the extra is installed, the task folder exists."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"metric 'lm_eval' needs EleutherAI's lm-evaluation-harness, which is not installed: {LM_EVAL_EXTRA}"
    if not Path(spec.task_dir).is_dir():
        return f"task_dir {spec.task_dir}: no such folder (it holds the harness's task YAML files)"
    return None


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise CompressxError(
            f"metric 'lm_eval' needs EleutherAI's lm-evaluation-harness, which is not installed: {LM_EVAL_EXTRA}"
        ) from err
    return lm_eval


def _local_task_config(manager: Any, name: str, spec: LmEvalSpec) -> dict[str, Any]:
    """The task's config, its data files read from the task file's folder; a task that would read the Hub: error."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or str(entry.kind.name) != "TASK":
        found = sorted(n for n, e in manager.task_index.items() if str(e.kind.name) == "TASK")
        kind = f"a {entry.kind.name.lower()}, not a task" if entry is not None else "not found"
        raise CompressxError(
            f"lm_eval task '{name}': {kind} in {spec.task_dir}; tasks there: {', '.join(found) or 'none'}"
        )
    config = dict(load_yaml(entry.yaml_path, resolve_func=True))
    where = f"lm_eval task '{name}' ({entry.yaml_path})"
    dataset = config.get("dataset_path")
    kwargs = dict(config.get("dataset_kwargs") or {})
    if dataset in LOCAL_BUILDERS:
        if not kwargs.get("data_files") and not kwargs.get("data_dir"):
            raise CompressxError(f"{where}: dataset_path {dataset} needs dataset_kwargs.data_files (local files)")
        kwargs.setdefault("data_dir", str(Path(entry.yaml_path).parent))  # relative data_files: beside the YAML
    elif not isinstance(dataset, str) or not (Path(entry.yaml_path).parent / dataset).expanduser().exists():
        raise CompressxError(
            f"{where}: dataset_path {dataset!r} is neither a local folder nor one of {', '.join(LOCAL_BUILDERS)}; "
            "compressx runs the harness offline, on local data (e.g. dataset_path: json with "
            "dataset_kwargs.data_files)"
        )
    else:
        config["dataset_path"] = str((Path(entry.yaml_path).parent / dataset).expanduser().resolve())
    config["dataset_kwargs"] = kwargs
    return config


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def run_lm_eval(model: Any, tokenizer: Any, spec: LmEvalSpec, progress: bool = True) -> dict[str, float]:
    """Run the harness on ``model`` as it is in memory; returns ``{"lm_eval <task> <metric>[ (settings)]": value}``."""
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    if not isinstance(model, PreTrainedModel):
        raise CompressxError(f"{spec.label}: the harness evaluates transformers models, got {type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise CompressxError(
            f"{spec.label}: the harness needs a transformers tokenizer, got {type(tokenizer).__name__} "
            "(the zoo's byte-level models have their own; use the perplexity metric for them)"
        )
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise CompressxError(f"{spec.label}: the tokenizer has neither a BOS nor an EOS token; the harness needs one")
    manager = TaskManager(include_path=spec.task_dir, include_defaults=False)
    configs = [_local_task_config(manager, name, spec) for name in spec.tasks]
    logger.info("lm_eval: tasks %s from %s", ", ".join(spec.tasks), spec.task_dir)
    training = model.training
    # The harness seeds Python's, numpy's and torch's global generators: keep the caller's sequences untouched.
    python_state = random.getstate()
    numpy_state = _numpy_state()
    try:
        with torch.random.fork_rng(devices=[]):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=configs,
                task_manager=manager,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                log_samples=False,
                bootstrap_iters=0,
            )
    finally:
        random.setstate(python_state)
        _set_numpy_state(numpy_state)
        model.train(training)
    values: dict[str, float] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, value in metrics.items():
            name, _, kind = key.partition(",")
            if not kind or name.endswith("_stderr") or not _number(value):
                continue  # alias, sample counts, standard errors
            suffix = f" [{kind}]" if kind != "none" else ""  # a task's filter (e.g. strict-match)
            values[f"lm_eval {task} {name}{suffix}{spec.settings}"] = float(value)
    if not values:
        raise CompressxError(f"{spec.label}: the harness returned no metric values")
    return values


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy

        numpy.random.set_state(state)
