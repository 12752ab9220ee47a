"""``llama_byte_1m``: a byte-level Llama causal LM (~0.9M parameters) trained on the stdlib corpus.

A real ``transformers.LlamaForCausalLM`` (4 layers, hidden 128, SwiGLU 384, 4 heads, vocabulary = the 256 byte
values, untied embeddings) trained from a fixed seed on the ``train`` split of ``compressx.data.stdlib_text``.
It stands in for a pretrained LLM in tests and quality comparisons: pruning it moves its held-out perplexity
the way pruning a large LLM does, at a size that trains in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from compressx.data import ByteTokenizer, corpus_fingerprint, sample_windows, stdlib_text
from compressx.threads import tiny_model_threads

NAME = "llama_byte_1m"
# Bump when anything below changes the trained weights: it is part of the cache key. 2: built with a fixed torch
# thread count (compressx.threads), so the weights no longer depend on the machine's core count.
BUILDER_VERSION = 2
TRAINING = {"seed": 0, "steps": 600, "batch": 16, "seq_len": 256, "lr": 3e-3, "warmup": 40, "weight_decay": 0.1}


def config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_empty() -> LlamaForCausalLM:
    """The architecture with freshly initialised weights (on the meta device under ``torch.device('meta')``)."""
    return LlamaForCausalLM(config())


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """The training token stream and the fixed validation windows (32 x 256 tokens, seed 1)."""
    tokenizer = ByteTokenizer()
    train_ids = torch.tensor(tokenizer.encode(stdlib_text("train")), dtype=torch.long)
    val_windows = sample_windows(torch.tensor(tokenizer.encode(stdlib_text("val")), dtype=torch.long), 32, 256, 1)
    return train_ids, val_windows


def _init(seed: int) -> LlamaForCausalLM:
    """Freshly initialised weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        return build_empty()


def _fit(
    model: LlamaForCausalLM,
    hp: dict[str, Any],
    train_ids: torch.Tensor,
    desc: str,
    progress: bool,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """The training loop (AdamW, warmup + cosine schedule, clipping), shared by the zoo's byte-level LMs.

    ``after_backward`` runs before gradient clipping, ``after_step`` after each optimizer step: other members use
    them to hold some weights fixed. Without them the loop is exactly ``llama_byte_1m``'s.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    gen = torch.Generator().manual_seed(hp["seed"])
    model.train()
    bar = tqdm(range(hp["steps"]), desc=desc, disable=not progress, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, hp["steps"], hp["lr"], hp["warmup"])
        starts = torch.randint(0, train_ids.numel() - hp["seq_len"], (hp["batch"],), generator=gen)
        batch = torch.stack([train_ids[s : s + hp["seq_len"]] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _perplexity(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=windows, labels=windows).loss.item())


@tiny_model_threads()
def train(steps: int | None = None, progress: bool = True) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train the model from scratch, deterministically (with the tiny-model thread count, so the weights do not
    depend on the machine's core count). ``steps`` overrides the default (tests use a few)."""
    hp = dict(TRAINING, steps=steps if steps is not None else TRAINING["steps"])
    train_ids, val_windows = _data()
    start = time.perf_counter()
    model = _init(hp["seed"])
    _fit(model, hp, train_ids, f"building zoo model {NAME}", progress)
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "training": hp,
        "corpus": "stdlib_text (train split)",
        "corpus_fingerprint": corpus_fingerprint(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_perplexity": round(_perplexity(model, val_windows), 4),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info


def cache_salt() -> str:
    """Part of the cache key: the fingerprint of the corpus the model is trained on."""
    return corpus_fingerprint()[:16]


def load(directory: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory, use_safetensors=True).eval()
