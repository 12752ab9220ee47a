"""Metrics a recipe's ``eval:`` block can name, run before and after the steps.

``eval: [{metric: perplexity, data: {source: stdlib_text, split: test, samples: 64, seq_len: 256}}]``

* ``perplexity`` — causal language models: exp of the mean next-token cross-entropy over the windows of the
  data block (every position but the first of each window is predicted).
* ``top1`` — image classifiers: top-1 accuracy in percent on an image data block (``compressx.images``:
  ``{source: digits, split: test}`` or ``{source: image_folder, path: ..., split: val}``).
* ``vqa_accuracy`` — multimodal LLMs on ``digits_vqa``: the fraction of questions whose greedy next token is the
  answer (``samples`` questions, the four kinds in equal parts; ``llava_smollm2_digits``: "which digit" only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.data import DataSpec, load_tokens, parse_data_spec
from compressx.errors import CompressxError, ConfigError, unknown_key_message, unknown_name_message
from compressx.images import ImageDataSpec, parse_image_data_spec, top1
from compressx.layerwise import execution_device


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One entry of a recipe's eval list."""

    metric: str
    data: DataSpec | ImageDataSpec
    batch_size: int = 8

    @property
    def label(self) -> str:
        if isinstance(self.data, ImageDataSpec):
            return f"{self.metric} ({self.data.label})"
        split = f"/{self.data.split}" if self.data.split else ""
        if self.metric == "vqa_accuracy":
            return f"{self.metric} ({self.data.source}{split}, {self.data.samples} questions)"
        return f"{self.metric} ({self.data.source}{split}, {self.data.samples}x{self.data.seq_len})"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "data": self.data.to_dict(), "batch_size": self.batch_size}


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
    from compressx.zoo import llava_smollm2_digits
    from compressx.zoo.llava_digits import TASKS, accuracy, vqa_batches

    split = spec.data.split or "test"
    if llava_smollm2_digits.is_its_tokenizer(tokenizer):  # its chat-format questions, not llava_digits' words
        data = spec.data
        questions = llava_smollm2_digits.vqa_batches(tokenizer, split, data.samples, data.seed, spec.batch_size)
        return llava_smollm2_digits.accuracy(model, questions)
    per_task = -(-spec.data.samples // len(TASKS))
    return accuracy(model, vqa_batches(split, per_task, spec.data.seed, spec.batch_size))


# metric name -> (model families it applies to, runner, parser of its data block)
METRICS: dict[str, tuple[tuple[str, ...], Callable[[Any, Any, EvalSpec, bool], float], Callable[[Any], Any]]] = {
    "perplexity": (("llm",), _run_perplexity, parse_data_spec),
    "vqa_accuracy": (("mllm",), _run_vqa_accuracy, parse_data_spec),
    "top1": (("cnn", "vit", "any"), _run_top1, parse_image_data_spec),
}
_KEYS = {"metric", "data", "batch_size"}


def parse_eval_spec(block: Any) -> EvalSpec:
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping like {{metric: perplexity, data: {{...}}}}, got {block!r}")
    for key in block:
        if key not in _KEYS:
            raise ConfigError(unknown_key_message(str(key), _KEYS), path=str(key))
    if not isinstance(block.get("metric"), str) or block["metric"] not in METRICS:
        raise ConfigError(unknown_name_message("metric", str(block.get("metric")), METRICS), path="metric")
    if "data" not in block:
        raise ConfigError("a metric needs a 'data' block", path="data")
    try:
        data = METRICS[block["metric"]][2](block["data"])
    except ConfigError as err:
        raise ConfigError(err.detail, path=f"data.{err.path}" if err.path else "data") from err
    batch_size = block.get("batch_size", 8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"got {batch_size!r}; expected a positive integer", path="batch_size")
    return EvalSpec(metric=block["metric"], data=data, batch_size=batch_size)


def check_metric_applies(spec: EvalSpec, family: str) -> str | None:
    families = METRICS[spec.metric][0]
    if family not in families:
        return f"metric '{spec.metric}' applies to {', '.join(families)} models, not to this {family} model"
    return None


def evaluate(model: Any, tokenizer: Any, specs: list[EvalSpec], progress: bool = True) -> dict[str, float]:
    """Run every metric; returns label → value."""
    return {spec.label: METRICS[spec.metric][1](model, tokenizer, spec, progress) for spec in specs}
