"""``llama_byte_outlier_1m``: ``llama_byte_1m`` with a few fixed large-magnitude hidden channels, as in large LLMs.

Pruning methods for LLMs that weigh weights by their input activations (Wanda, DSnoT) owe their gains over
magnitude pruning to *outlier features*: in LLMs of billions of parameters, a handful of hidden dimensions carry
values far larger than the rest, in the same dimensions in every layer (Dettmers et al., "LLM.int8()",
arXiv:2208.07339, report them up to ~20x larger; Sun et al., "Massive Activations in Large Language Models",
arXiv:2402.17762). A 1M-parameter model trained for two minutes does not develop them, so on ``llama_byte_1m``
those methods have little to exploit. This member puts the phenomenon in, by construction, and otherwise is
``llama_byte_1m``: the same ``LlamaForCausalLM`` architecture, corpus, seed, batches and optimizer schedule.

Construction. ``OUTLIERS["channels"]`` hidden channels (4 of 128, drawn once by a generator seeded with
``OUTLIERS["seed"]``; the same channels in every layer, as observed in LLMs) get an RMSNorm gain of
``OUTLIERS["gain"]`` (20, the magnitude LLM.int8() reports) in ``input_layernorm`` and
``post_attention_layernorm`` of every decoder layer, and those gain entries are frozen: their gradients are
zeroed before clipping (so they neither move nor count in the clipping norm) and they are restored after each
AdamW step (which undoes the decoupled weight decay). Large norm gains in fixed dimensions are where such
outliers sit in trained transformers (Kovaleva et al., "BERT Busters", arXiv:2105.06990; Wei et al., "Outlier
Suppression", arXiv:2209.13325, who call the LayerNorm gain the outlier amplifier), so the inputs of every
``q/k/v/gate/up_proj`` carry persistent large-magnitude channels and the rest of the network trains around
them. The gains and channels are fixed in advance from the literature and were not tuned against any
compression method. The inputs of ``o_proj`` and ``down_proj`` are not given outliers.

The result is a plain ``LlamaForCausalLM`` checkpoint (the gains are ordinary weights); ``outlier_ratio``
measures the effect and is recorded in ``build.json``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from compressx.data import corpus_fingerprint
from compressx.threads import tiny_model_threads
from compressx.zoo import llama_byte

NAME = "llama_byte_outlier_1m"
# Bump when anything below changes the trained weights; llama_byte's BUILDER_VERSION is in the cache key too.
BUILDER_VERSION = 2  # 2: built with a fixed torch thread count (compressx.threads)
TRAINING = dict(llama_byte.TRAINING)
OUTLIERS = {"channels": 4, "gain": 20.0, "seed": 0}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_Q_PROJ = re.compile(r"model\.layers\.\d+\.self_attn\.q_proj")


def config() -> LlamaConfig:
    return llama_byte.config()


def build_empty() -> LlamaForCausalLM:
    """The architecture with freshly initialised weights (on the meta device under ``torch.device('meta')``)."""
    return llama_byte.build_empty()


def cache_salt() -> str:
    """Part of the cache key: the corpus, and llama_byte's builder version (its training loop is reused)."""
    return f"{corpus_fingerprint()[:16]}-lb{llama_byte.BUILDER_VERSION}"


def outlier_channels(hidden_size: int | None = None) -> list[int]:
    """The fixed outlier channels: ``OUTLIERS["channels"]`` of ``hidden_size``, drawn from a seeded generator."""
    hidden = hidden_size if hidden_size is not None else config().hidden_size
    gen = torch.Generator().manual_seed(OUTLIERS["seed"])
    return sorted(torch.randperm(hidden, generator=gen)[: OUTLIERS["channels"]].tolist())


def outlier_gains(model: LlamaForCausalLM) -> list[nn.Parameter]:
    """The RMSNorm gains that feed decoder-layer Linears: ``input_layernorm`` and ``post_attention_layernorm``."""
    return [getattr(layer, norm).weight for layer in model.model.layers for norm in _NORMS]


def outlier_ratio(model: nn.Module, tokens: torch.Tensor) -> float:
    """Largest over median per-channel RMS of the inputs of ``model.layers.*.self_attn.q_proj``, mean over layers.

    The RMS of each input channel is taken over every token of ``tokens`` (``[samples, seq_len]``). About 1-3 for
    a model without outlier channels; about the outlier magnitude for one with them.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if _Q_PROJ.fullmatch(n)]
    if not handles:
        raise ValueError("the model has no modules named model.layers.*.self_attn.q_proj")
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    ratios = []
    for name, total in sums.items():
        rms = (total / counts[name]).sqrt()
        ratios.append((rms.max() / rms.median()).item())
    return sum(ratios) / len(ratios)


@tiny_model_threads()
def train(steps: int | None = None, progress: bool = True) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train the model from scratch, deterministically (with the tiny-model thread count). ``steps`` overrides the
    default (tests use a few)."""
    hp = dict(TRAINING, steps=steps if steps is not None else TRAINING["steps"])
    train_ids, val_windows = llama_byte._data()
    start = time.perf_counter()
    model = llama_byte._init(hp["seed"])
    channels = torch.tensor(outlier_channels(model.config.hidden_size))
    gains = outlier_gains(model)

    def restore() -> None:  # also the initialisation; after a step it undoes AdamW's weight decay
        with torch.no_grad():
            for weight in gains:
                weight[channels] = OUTLIERS["gain"]

    def freeze_grads() -> None:  # frozen entries neither move nor count in the clipping norm
        for weight in gains:
            if weight.grad is not None:
                weight.grad[channels] = 0.0

    restore()
    llama_byte._fit(
        model, hp, train_ids, f"building zoo model {NAME}", progress, after_backward=freeze_grads, after_step=restore
    )
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "base_builder_version": llama_byte.BUILDER_VERSION,
        "training": hp,
        "outliers": {
            "channels": channels.tolist(),
            "gain": OUTLIERS["gain"],
            "seed": OUTLIERS["seed"],
            "norms": [f"model.layers.*.{norm}.weight" for norm in _NORMS],
        },
        "corpus": "stdlib_text (train split)",
        "corpus_fingerprint": corpus_fingerprint(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_perplexity": round(llama_byte._perplexity(model, val_windows), 4),
        # max / median per-channel RMS of the q_proj inputs on the validation windows, mean over layers
        "val_outlier_ratio": round(outlier_ratio(model, val_windows), 3),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info


def load(directory: str) -> LlamaForCausalLM:
    return llama_byte.load(directory)
