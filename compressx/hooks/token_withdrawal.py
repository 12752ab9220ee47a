"""Withdrawing tokens from the upper decoder layers of a multimodal LLM, shared by the ``vtw`` and ``fastv`` passes.

Layers ``0 … K-1`` of the text decoder run on the whole sequence; from layer ``K`` on, only the kept positions go
through. Everything the decoder computes once and hands to every layer is gathered to the kept positions before
each withdrawn layer: the hidden states (at layer K), the rotary ``(cos, sin)``, ``position_ids`` and both axes of
the 4-D attention mask. Positions therefore stay those of the full sequence (the paper's "keep" positions).

Cached decoding: the per-layer ``DynamicCache`` keeps all entries in layers < K and only the kept ones in layers
>= K. The keep-index of the prompt is stored on the cache object itself, so a later step (any query length) gathers
the mask's key columns as ``prompt keep-index ∪ every position appended since``. Layer 0's cache keeps the full
length, so positions and masks of later steps are those of the full sequence. State lives on the handle (for the
forward in flight) and on the cache (for a generation), never in globals: batches, several images per prompt and
several models at once work.

The cache is found by type, not by name: transformers hands it to the decoder as ``past_key_values`` up to 5.23
and as ``cache`` from 5.24, and the next rename must not make a cache invisible (a ``StaticCache`` that is not seen
is not refused, and a cache without the keep-index record decodes with the wrong mask). Whatever cannot be seen
into is refused: a value that is not a ``Cache`` under a cache-like argument name (a legacy tuple cache), an
object that looks like a cache but is not a transformers ``Cache``, two caches in one call, and decoder layers
that do not receive the cache the decoder was given.

Refused with a ``CompressxError``: model classes other than ``SUPPORTED``, attention implementations other than
eager / sdpa (flash and flex take other mask layouts), sliding-window decoders, caches other than a plain
``DynamicCache`` (under any argument name), a prefill with vision tokens on a non-empty cache (chunked prefill,
prefix reuse), ``labels`` (the output is shorter than the input), and a batch whose rows keep different numbers of
tokens. Not supported and not detected: assisted / speculative decoding and contrastive search (``cache.crop``
cuts every layer to one length), and several threads sharing one hooked model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compressx.errors import CompressxError

SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
_CACHE_ATTR = "_compressx_withdrawal"  # (prompt keep-index [B, n_keep], prompt length) on a DynamicCache
# Argument names that may hold a cache (``past_key_values`` <= 5.23, ``cache`` >= 5.24, ``past_key_value`` in
# older layers), and the cache-named arguments that are flags or positions, not caches.
_CACHE_NAME_PARTS = ("past", "cache", "key_value")
_NOT_CACHES = ("use_cache", "cache_position", "cache_implementation")

# select(vision [B, n] bool, last_attention [B, n] or None) -> keep-index [B, n_keep], sorted per row
SelectFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def decoder_of(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, Any]:
    """The text decoder of a supported multimodal model, its layers and its config; refuses anything else."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise CompressxError(
            f"token withdrawal supports {', '.join(SUPPORTED)} (with a Llama, Mistral or Qwen2 decoder); got {name}"
        )
    text_model = model.model.language_model
    config = model.config.text_config
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise CompressxError(
            f"the {config.model_type} decoder uses sliding-window attention (sliding_window="
            f"{config.sliding_window}); its cache drops old entries, which token withdrawal cannot track"
        )
    return text_model, text_model.layers, config


def check_attention(config: Any) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise CompressxError(
            f"token withdrawal supports attn_implementation {', '.join(ATTENTION_IMPLEMENTATIONS)}; the model uses "
            f"{impl!r} (load it with attn_implementation='sdpa')"
        )


def vision_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The placeholder ids of vision features: images, and videos where the model has them (Qwen2-VL). Qwen2-VL's
    ``<|vision_start|>`` / ``<|vision_end|>`` stay: they are text, as the official code keeps all text."""
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return tuple(int(i) for i in ids if i is not None)


def withdraw_vision(vision: torch.Tensor, last_attention: torch.Tensor | None = None) -> torch.Tensor:
    """VTW's keep-index: every position that is not a vision token, per row, in order."""
    return keep_index((~vision).nonzero(as_tuple=True), vision.shape[0])


def keep_index(nonzero: tuple[torch.Tensor, torch.Tensor], batch: int) -> torch.Tensor:
    """``[B, n_keep]`` from the (row, column) indices of the kept positions; every row must keep as many."""
    rows, cols = nonzero
    counts = torch.bincount(rows, minlength=batch)
    if batch and bool((counts != counts[0]).any()):
        raise CompressxError(
            f"the rows of this batch keep different numbers of tokens ({counts.tolist()}): the images give different "
            "numbers of vision tokens; run these prompts one at a time"
        )
    return cols.view(batch, -1)


def _gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``x`` along the sequence axis ``dim`` with a per-row ``[B, k]`` index (x's batch axis may be 1)."""
    batch = index.shape[0]
    shape = list(x.shape)
    batch_dim = 0 if x.dim() >= 2 and dim != 0 else None
    if batch_dim is not None and shape[0] == 1 and batch > 1:
        x = x.expand(batch, *shape[1:])
        shape[0] = batch
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    idx = index.view(view).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(shape)])
    return torch.gather(x, dim, idx)


@dataclasses.dataclass
class _Forward:
    """What one forward of the text decoder is doing."""

    n_full: int
    cache: Any = None  # the cache the text decoder was given (None: none, or one it creates itself)
    vision: torch.Tensor | None = None  # prefill: [B, n] vision positions
    keep: torch.Tensor | None = None  # prefill: [B, n_keep] query positions kept from layer K on
    # gathered mask / rotary / positions, computed once per forward; in a cached step, also the cache's "prompt"
    # (keep-index, length) record
    sliced: dict[str, Any] | None = None
    last_attention: torch.Tensor | None = None  # fastv: [B, n] attention of the last query at layer K-1


class TokenWithdrawal:
    """Hooks that withdraw tokens before decoder layer ``layer`` (a runtime pass's handle; ``remove()`` undoes).

    ``select`` picks the kept positions from the vision mask (and, with ``attention_probe``, the last query's
    attention at layer ``layer - 1``, averaged over heads). ``layer`` may be changed between forwards (the KL search
    does); ``layer >= number of layers`` leaves the model exactly as it was.
    """

    def __init__(
        self, model: nn.Module, layer: int, select: SelectFn = withdraw_vision, attention_probe: bool = False
    ):
        self.model = model
        self.text_model, self.layers, self.text_config = decoder_of(model)
        check_attention(self.text_config)
        self.layer = layer
        self.select = select
        self.attention_probe = attention_probe
        self.vision_ids = vision_token_ids(model)
        self._pending: torch.Tensor | None = None
        self._forward: _Forward | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._outer_pre, with_kwargs=True),
            self.text_model.register_forward_pre_hook(self._text_pre, with_kwargs=True),
            self.text_model.register_forward_hook(self._text_post, always_call=True),
        ]
        for index, layer_module in enumerate(self.layers):
            self._hooks.append(layer_module.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            if attention_probe:
                hook = self._probe_hook(index)
                self._hooks.append(layer_module.self_attn.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise CompressxError("token withdrawal needs input_ids (not inputs_embeds) to find the vision tokens")
            self._pending = None
            return
        vision = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.vision_ids:
            vision |= input_ids == token
        if kwargs.get("labels") is not None and bool(vision.any()) and self.layer < len(self.layers):
            raise CompressxError("token withdrawal shortens the output sequence: labels (training, loss) are refused")
        self._pending = vision

    def _text_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        vision, self._pending = self._pending, None
        self._forward = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        check_attention(self.text_config)
        cache = find_cache(args, kwargs, "the text decoder")
        if cache is not None:
            _check_cache(cache)
        recorded = getattr(cache, _CACHE_ATTR, None) if cache is not None else None
        if recorded is not None:
            self._forward = _Forward(n_full=embeds.shape[1], cache=cache, sliced={"prompt": recorded})
            return
        if vision is None or not bool(vision.any()) or self.layer >= len(self.layers):
            return
        if vision.shape != embeds.shape[:2]:
            raise CompressxError(f"vision mask {tuple(vision.shape)} does not match the input {tuple(embeds.shape)}")
        if cache is not None and cache.get_seq_length() > 0:
            raise CompressxError(
                "a prompt with vision tokens on a non-empty cache (chunked prefill, prefix-cache reuse) is not "
                "supported by token withdrawal: start from an empty cache"
            )
        self._forward = _Forward(n_full=embeds.shape[1], cache=cache, vision=vision.to(embeds.device))

    def _text_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward = None

    def _probe_hook(self, index: int) -> Callable:
        def probe(module: nn.Module, args: tuple, kwargs: dict) -> None:
            step = self._forward
            if step is None or step.vision is None or index != self.layer - 1:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            step.last_attention = last_query_attention(
                module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask")
            )

        return probe

    def _layer_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            step = self._forward
            if step is None or index < self.layer:
                return None
            if step.vision is not None:
                return self._prefill(step, args, kwargs)
            return self._cached_step(step, args, kwargs)

        return hook

    def _prefill(self, step: _Forward, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if step.keep is None:
            cache = find_cache(args, kwargs, "a decoder layer")
            if step.cache is not None and cache is not step.cache:
                raise CompressxError(
                    f"the decoder layers do not receive the cache the text decoder was given (they got "
                    f"{type(cache).__name__}): token withdrawal cannot record what it keeps there"
                )
            if cache is not None:
                _check_cache(cache)  # one the decoder created itself
            step.keep = self.select(step.vision, step.last_attention)
            if cache is not None:
                setattr(cache, _CACHE_ATTR, (step.keep, step.n_full))
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if hidden.shape[1] == step.n_full:
            hidden = _gather_seq(hidden, step.keep, 1)
        if step.sliced is None:
            step.sliced = {}
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                step.sliced["attention_mask"] = _gather_seq(_gather_seq(mask, step.keep, 2), step.keep, 3)
            cos, sin = kwargs["position_embeddings"]
            if cos.dim() != 3 or cos.shape[1] != step.n_full:  # transformers < 5.17: Qwen2-VL's are [3, B, n, d]
                raise CompressxError(
                    f"the decoder's rotary embeddings have shape {tuple(cos.shape)}, not [batch, {step.n_full}, "
                    "head_dim]: token withdrawal does not know this layout (it needs transformers >= 5.17)"
                )
            step.sliced["position_embeddings"] = (_gather_seq(cos, step.keep, 1), _gather_seq(sin, step.keep, 1))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                step.sliced["position_ids"] = _gather_seq(kwargs["position_ids"], step.keep, 1)
        kwargs.update(step.sliced)
        return (hidden, *args[1:]), kwargs

    def _cached_step(self, step: _Forward, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return None  # sdpa without padding: no mask, the shorter cache is all there is to attend to
        if "attention_mask" not in step.sliced:
            prompt_keep, prompt_len = step.sliced["prompt"]
            batch = max(mask.shape[0], prompt_keep.shape[0])
            appended = torch.arange(prompt_len, mask.shape[-1], device=mask.device).expand(batch, -1)
            key_keep = torch.cat([prompt_keep.to(mask.device).expand(batch, -1), appended], dim=1)
            step.sliced["attention_mask"] = _gather_seq(mask, key_keep, 3)
        kwargs["attention_mask"] = step.sliced["attention_mask"]
        return args, kwargs


def _looks_like_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache) or all(
        callable(getattr(value, method, None)) for method in ("update", "get_seq_length")
    )


def find_cache(args: tuple, kwargs: dict, where: str) -> Any:
    """The one cache among a forward's arguments, whatever its name; None if there is none.

    Refuses what it cannot see into: a value under a cache-like name that is neither a cache nor a flag / tensor
    (a legacy tuple cache), and two caches in one call.
    """
    found = [(f"positional argument {i}", v) for i, v in enumerate(args) if _looks_like_cache(v)]
    found += [(f"{name}=", v) for name, v in kwargs.items() if _looks_like_cache(v)]
    for name, value in kwargs.items():
        plain = value is None or isinstance(value, bool | int | str | torch.Tensor) or _looks_like_cache(value)
        if not plain and name not in _NOT_CACHES and any(part in name.lower() for part in _CACHE_NAME_PARTS):
            raise CompressxError(
                f"{where} got {name}= as a {type(value).__name__}, which token withdrawal cannot see into; "
                "pass a transformers DynamicCache (legacy tuple caches are not supported)"
            )
    if len({id(v) for _, v in found}) > 1:
        names = ", ".join(f"{name} ({type(v).__name__})" for name, v in found)
        raise CompressxError(f"{where} got more than one cache ({names}); token withdrawal tracks exactly one")
    return found[0][1] if found else None


def _check_cache(cache: Any) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise CompressxError(
            f"token withdrawal keeps a shorter cache in the withdrawn layers, which only a DynamicCache of "
            f"DynamicLayers allows; got {type(cache).__name__} ({', '.join(kinds) or 'no layers'})"
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def last_query_attention(
    attention: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of the last position over all positions, averaged over heads: ``[B, n]``.

    Recomputed from the layer's own projections (Llama / Mistral / Qwen2 attention: ``q_proj``, ``k_proj``,
    rotary on both), so it works with sdpa, which returns no attention weights.
    """
    batch, n, _ = hidden.shape
    head_dim = attention.head_dim
    q = attention.q_proj(hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, n, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q = q * cos[:, -1:, None].transpose(1, 2) + _rotate_half(q) * sin[:, -1:, None].transpose(1, 2)
    k = k * cos[:, :, None].transpose(1, 2) + _rotate_half(k) * sin[:, :, None].transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(2, 3)) * attention.scaling  # [B, H, 1, n]
    if isinstance(mask, torch.Tensor):
        last = mask[:, :, -1:, :].to(scores.device)
        scores = scores.masked_fill(~last, float("-inf")) if last.dtype == torch.bool else scores + last.float()
    return scores.softmax(-1).mean(dim=1)[:, 0]
