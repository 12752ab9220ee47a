"""Metrics a recipe's ``eval:`` block can name, run before and after the steps.

``eval: [{metric: perplexity, data: {source: stdlib_text, split: test, samples: 64, seq_len: 256}}]``

* ``perplexity`` — causal language models: exp of the mean next-token cross-entropy over the windows of the
  data block (every position but the first of each window is predicted).
* ``top1`` — image classifiers: top-1 accuracy in percent on an image data block (``compressx.images``:
  ``{source: digits, split: test}`` or ``{source: image_folder, path: ..., split: val}``).
* ``vqa_accuracy`` — multimodal LLMs on ``digits_vqa``: the fraction of questions whose greedy next token is the
  answer (``samples`` questions, the four kinds in equal parts; ``llava_smollm2_digits``: "which digit" only).
* ``lm_eval`` — causal language models: EleutherAI's lm-evaluation-harness on local task files and data
  (``compressx.lm_harness``; optional extra ``compressx[lm_eval]``); no ``data`` block, one result per task metric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.config import Block, option
from compressx.data import DataSpec, load_tokens
from compressx.errors import CompressxError, ConfigError
from compressx.images import ImageDataSpec, top1
from compressx.layerwise import execution_device
from compressx.lm_harness import LmEvalSpec, check_lm_eval_spec, parse_lm_eval_spec, run_lm_eval


def _metrics_with_data() -> tuple[str, ...]:
    return tuple(name for name, metric in METRICS.items() if metric.data is not None)


@dataclasses.dataclass(frozen=True)
class EvalSpec(Block):
    """One entry of a recipe's eval list; ``metric`` picks which keys apply (a metric of ``METRICS`` with a data
    class reads ``data``)."""

    tag: ClassVar[str] = "metric"
    shape: ClassVar[str] = "{metric: perplexity, data: {...}}"

    metric: str = option(choices=lambda: tuple(METRICS), what="metric")
    data: DataSpec | ImageDataSpec | None = option(
        None, only=_metrics_with_data, needs=_metrics_with_data, doc="the data the metric runs on"
    )
    batch_size: int = option(8, ge=1, expected="a positive integer")

    def __post_init__(self) -> None:
        reads = METRICS[self.metric].data
        if reads is not None and not isinstance(self.data, reads):
            message = f"metric '{self.metric}' reads source {', '.join(reads.tag_values())}, not '{self.data.source}'"
            raise ConfigError(message, path="data.source")

    @property
    def label(self) -> str:
        if isinstance(self.data, ImageDataSpec):
            return f"{self.metric} ({self.data.label})"
        split = f"/{self.data.split}" if self.data.split else ""
        if self.metric == "vqa_accuracy":
            return f"{self.metric} ({self.data.source}{split}, {self.data.samples} questions)"
        return f"{self.metric} ({self.data.source}{split}, {self.data.samples}x{self.data.seq_len})"


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True) -> float:
    """Perplexity of a causal LM on ``[samples, seq_len]`` token windows."""
    model.eval()
    device = execution_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def _run_perplexity(model: Any, tokenizer: Any, spec: EvalSpec, progress: bool) -> float:
    if tokenizer is None:
        raise CompressxError(f"{spec.label}: the model has no tokenizer, so text cannot be turned into tokens")
    if not callable(getattr(model, "forward", None)):
        raise CompressxError(f"{spec.label}: perplexity needs a causal language model, got {type(model).__name__}")
    return perplexity(model, load_tokens(spec.data, tokenizer), spec.batch_size, progress)


def _run_top1(model: Any, tokenizer: Any, spec: EvalSpec, progress: bool) -> float:
    return top1(model, spec.data, batch_size=spec.batch_size, progress=progress)


def _run_vqa_accuracy(model: Any, tokenizer: Any, spec: EvalSpec, progress: bool) -> float:
    if spec.data.source != "digits_vqa":
        raise CompressxError(f"{spec.label}: vqa_accuracy reads data source digits_vqa, got {spec.data.source}")
    from compressx.zoo import llava_smollm2_prompts
    from compressx.zoo.llava_digits import TASKS, accuracy, vqa_batches

    split = spec.data.split or "test"
    if llava_smollm2_prompts.is_its_tokenizer(tokenizer):  # its chat-format questions, not llava_digits' words
        data = spec.data
        questions = llava_smollm2_prompts.vqa_batches(tokenizer, split, data.samples, data.seed, spec.batch_size)
        return llava_smollm2_prompts.accuracy(model, questions)
    per_task = -(-spec.data.samples // len(TASKS))
    return accuracy(model, vqa_batches(split, per_task, spec.data.seed, spec.batch_size))


class Metric(NamedTuple):
    """A metric: the model families it applies to, how it runs (one value, or label -> value), and the data block
    it reads."""

    families: tuple[str, ...]
    run: Callable[[Any, Any, Any, bool], float | dict[str, float]]
    data: type[DataSpec] | type[ImageDataSpec] | None  # None: the metric reads no data block


METRICS: dict[str, Metric] = {
    "perplexity": Metric(("llm",), _run_perplexity, DataSpec),
    "vqa_accuracy": Metric(("mllm",), _run_vqa_accuracy, DataSpec),
    "top1": Metric(("cnn", "vit", "any"), _run_top1, ImageDataSpec),
    "lm_eval": Metric(("llm",), run_lm_eval, None),  # no data block: its tasks name their data
}


def parse_eval_spec(block: Any, base_dir: str | None = None) -> EvalSpec | LmEvalSpec:
    """One entry of an eval list; ``base_dir``: the recipe's folder, which relative file paths start from
    (lm_eval's ``task_dir``). An ``lm_eval`` entry has keys of its own (``compressx.lm_harness``)."""
    if isinstance(block, dict) and block.get("metric") == "lm_eval":
        return parse_lm_eval_spec(block, base_dir)
    return EvalSpec.from_dict(block)


def check_metric_applies(spec: EvalSpec | LmEvalSpec, family: str) -> str | None:
    """A problem found before any work (wrong model family, missing extra or task folder); None when fine."""
    families = METRICS[spec.metric].families
    if family not in families:
        return f"metric '{spec.metric}' applies to {', '.join(families)} models, not to this {family} model"
    if isinstance(spec, LmEvalSpec):
        return check_lm_eval_spec(spec)
    return None


def evaluate(
    model: Any, tokenizer: Any, specs: list[EvalSpec | LmEvalSpec], progress: bool = True
) -> dict[str, float]:
    """Run every metric; returns label → value (a metric with several values, e.g. lm_eval, labels each)."""
    results: dict[str, float] = {}
    for spec in specs:
        value = METRICS[spec.metric].run(model, tokenizer, spec, progress)
        results.update(value if isinstance(value, dict) else {spec.label: value})
    return results
