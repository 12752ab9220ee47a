"""VTW: visual-token withdrawal for multimodal LLMs.

Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid Inference",
AAAI 2025, arXiv:2405.05803 (official code ``lzhxmu/VTW``). In LLaVA-style models the vision tokens hand their
information to the text tokens in the first layers and get little attention afterwards, so from decoder layer K
on they are withdrawn: layers ``K … L-1`` run on the text tokens only (system prompt, instruction, generated
tokens), with their original rotary positions (a gap where the image was). Nothing is trained.

``layer: auto`` picks K as the paper does: on the calibration prompts, for every candidate d in
``search_start … L-1``, the KL divergence ``KL(P_withdrawn@d ‖ P_full)`` of the last position's next-token
distribution is averaged over the prompts; K is the first d whose mean is <= ``threshold`` (η, default 0.003, the
official value for LLaVA-1.5-7B and every unlisted model). Instead of η, ``max_changed_answers: N`` (not in the
paper) takes the first d at which the greedy next token changes on at most N calibration prompts. Both curves
(mean KL and changed answers per candidate) are logged and reported, whichever criterion chose K.

Models: ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` (Llama, Mistral or Qwen2
decoders) and ``Qwen2VLForConditionalGeneration``; anything else gets a ``CompressxError``.

Touches: forward hooks on the outer model, its text decoder and every decoder layer (``compressx.hooks.
token_withdrawal``); no weight changes. ``remove()`` on the handle restores the model exactly.

Deviations from the official code, all beyond its batch-size-1 / one-image / global-state design:

* the vision positions are every ``image_token_id`` of each row (several images, LLaVA-NeXT's variable counts),
  not one span with the hard-coded 35 / 576 offsets of the official K search;
* padded batches work (the attention mask is gathered on both axes, and on the key axis in cached steps — the
  official code leaves it unsliced, which is only right for sdpa without padding);
* no candidate under η gives K = L (withdrawal off) with a warning; the official code raises ``IndexError``;
* the KL is computed in float64 (the official code uses the fp16 logits);
* the search start is configurable (the official 5 exceeds the depth of small models).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError
from compressx.hooks.flops import withdrawal_flops
from compressx.hooks.token_withdrawal import TokenWithdrawal, check_attention, decoder_of, vision_token_ids
from compressx.registry import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)


DEFAULT_THRESHOLD = 0.003  # the official η for LLaVA-1.5-7B and every model the official code does not list


@dataclasses.dataclass(frozen=True)
class VtwConfig(PassConfig):
    """Config of the ``vtw`` pass.

    Attributes:
        layer: K, the first decoder layer without vision tokens (0-based; K >= L leaves the model unchanged),
            or ``"auto"`` for the KL search on the calibration prompts.
        threshold: η, the largest mean KL divergence accepted by the search (0.003 when neither criterion is
            given: the paper's value for LLaVA-1.5-7B; the official code uses 0.0005 for 13B and 0.0001 for
            LLaVA-1.6-vicuna-7B).
        max_changed_answers: the other criterion (give one of the two): the search takes the first layer at which
            the greedy next token changes on at most this many calibration prompts (0: on none).
        search_start: the first candidate layer of the search (default 5, the official value).
        calibration_samples: how many calibration prompts the search uses (default 20, the official value).
    """

    layer: int | str = "auto"
    threshold: float | None = None
    max_changed_answers: int | None = None
    search_start: int = 5
    calibration_samples: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.layer, str) and self.layer != "auto":
            raise ConfigError(f"got {self.layer!r}; expected a layer index (integer >= 0) or 'auto'", path="layer")
        if isinstance(self.layer, int) and self.layer < 0:
            raise ConfigError(f"got {self.layer}; expected a layer index >= 0 or 'auto'", path="layer")
        if self.threshold is not None and self.max_changed_answers is not None:
            raise ConfigError(
                "give one search criterion: threshold (η, the mean KL) or max_changed_answers, not both",
                path="max_changed_answers",
            )
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"got {self.threshold}; expected a finite number >= 0", path="threshold")
        if self.max_changed_answers is not None and self.max_changed_answers < 0:
            raise ConfigError(f"got {self.max_changed_answers}; expected an integer >= 0", path="max_changed_answers")
        if self.search_start < 0:
            raise ConfigError(f"got {self.search_start}; expected >= 0", path="search_start")
        if self.calibration_samples < 1:
            raise ConfigError(f"got {self.calibration_samples}; expected >= 1", path="calibration_samples")

    @property
    def criterion(self) -> tuple[str, float]:
        """The search criterion in use: ``("max_changed_answers", N)`` or ``("threshold", η)``."""
        if self.max_changed_answers is not None:
            return "max_changed_answers", self.max_changed_answers
        return "threshold", DEFAULT_THRESHOLD if self.threshold is None else self.threshold


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q) = Σ p (log p − log q)`` per row, in float64, from logits ``[B, V]``."""
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def first_under(per_layer: dict[int, float], bound: float, disabled: int) -> int:
    """The first candidate layer (in increasing order) whose value (mean KL, or changed answers) is <= ``bound``;
    ``disabled`` if none."""
    for layer in sorted(per_layer):
        if per_layer[layer] <= bound:
            return layer
    return disabled


def calibration_batches(data: Any, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` prompts of the calibration data: a model-input mapping or a list of them."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, Iterable) or isinstance(data, torch.Tensor):
        raise CompressxError(
            "vtw calibration data must be model inputs with images: a mapping {input_ids, pixel_values, ...} or a "
            f"list of them; got {type(data).__name__}"
        )
    batches, taken = [], 0
    for batch in data:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise CompressxError("each vtw calibration item must be a mapping with input_ids (and pixel_values)")
        batches.append(batch)
        taken += batch["input_ids"].shape[0]
        if taken >= limit:
            break
    return batches


@torch.no_grad()
def search_layer(
    model: nn.Module, handle: TokenWithdrawal, batches: list[dict[str, Any]], candidates: list[int], progress: bool
) -> tuple[dict[int, float], dict[int, int]]:
    """Mean KL(withdrawn at d ‖ full) of the last position over the calibration prompts, for every candidate d,
    and on how many prompts the greedy next token changes at d (it tells whether a mean KL above η comes from
    changed answers or from shifts in confidence)."""
    n_layers = len(handle.layers)
    sums = dict.fromkeys(candidates, 0.0)
    changed = dict.fromkeys(candidates, 0)
    count = 0
    device = next(model.parameters()).device
    saved = handle.layer
    try:
        for batch in tqdm(batches, desc="vtw: KL search", disable=not progress, leave=False):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            handle.layer = n_layers
            reference = model(**inputs, use_cache=False).logits[:, -1]
            for d in candidates:
                handle.layer = d
                withdrawn = model(**inputs, use_cache=False).logits[:, -1]
                sums[d] += kl_divergence(withdrawn, reference).sum().item()
                changed[d] += int((withdrawn.argmax(-1) != reference.argmax(-1)).sum())
            count += reference.shape[0]
    finally:
        handle.layer = saved
    return {d: s / count for d, s in sums.items()}, changed


def reference_shape(model: nn.Module, batches: list[dict[str, Any]]) -> tuple[int, int]:
    """(text tokens, vision tokens) of the first calibration prompt, else of a LLaVA prompt of 64 text tokens."""
    if batches:
        ids = batches[0]["input_ids"][0]
        vision = sum(int((ids == t).sum()) for t in vision_token_ids(model))
        if "attention_mask" in batches[0]:
            ids = ids[batches[0]["attention_mask"][0].bool()]
        return int(ids.numel()) - vision, vision
    return 64, int(getattr(model.config, "image_seq_length", 576))


def withdrawal_problems(model: object, config: object = None) -> list[str]:
    """``register_pass(check_model=...)`` of vtw and fastv: what token withdrawal refuses about the model (its class,
    a sliding-window decoder, the attention implementation), found on the meta model before weights load."""
    if not isinstance(model, nn.Module):
        return [f"token withdrawal applies to a multimodal torch model, got {type(model).__name__}"]
    try:
        _, _, text_config = decoder_of(model)
        check_attention(text_config)
    except CompressxError as err:
        return [str(err)]
    return []


@register_pass(
    "vtw",
    config=VtwConfig,
    kind="runtime",
    paper="Boosting Multimodal LLMs with Visual Tokens Withdrawal for Rapid Inference (arXiv:2405.05803)",
    families=("mllm",),
    check_model=withdrawal_problems,
)
def apply_vtw(model: nn.Module, config: VtwConfig, ctx: PassContext) -> PassResult:
    """Withdraw the vision tokens before decoder layer K (given, or found by the KL search); report K and FLOPs."""
    _, layers, text_config = decoder_of(model)
    n_layers = len(layers)
    report: dict[str, Any] = {}
    batches: list[dict[str, Any]] = []
    if config.layer == "auto":
        if ctx.calibration is None:
            raise CompressxError("vtw with layer: auto needs calibration prompts (data=... / data.calibration)")
        batches = calibration_batches(ctx.calibration, config.calibration_samples)
    handle = TokenWithdrawal(model, n_layers)
    try:
        if config.layer == "auto":
            candidates = list(range(min(config.search_start, n_layers), n_layers))
            mean_kl, changed = search_layer(model, handle, batches, candidates, ctx.progress)
            criterion, bound = config.criterion
            layer = first_under(changed if criterion == "max_changed_answers" else mean_kl, bound, n_layers)
            n_prompts = sum(b["input_ids"].shape[0] for b in batches)
            for d, kl in mean_kl.items():
                log.info("vtw: K=%d mean KL %.6g, greedy next token changed on %d/%d prompts%s", d, kl, changed[d],
                         n_prompts, "  <- chosen" if d == layer else "")  # fmt: skip
            if layer == n_layers:
                what = "the mean KL" if criterion == "threshold" else "the changed answers"
                log.warning("vtw: no layer keeps %s at or under %s = %g; withdrawal is off (K = L = %d)", what,
                            criterion, bound, n_layers)  # fmt: skip
            else:
                log.info("vtw: %s = %g chose K = %d", criterion, bound, layer)
            report.update(kl_per_layer={str(d): round(kl, 8) for d, kl in mean_kl.items()}, criterion=criterion)
            report.update({criterion: bound})
            report.update(changed_per_layer={str(d): n for d, n in changed.items()}, calibration_prompts=n_prompts)
        else:
            layer = config.layer
    except BaseException:
        handle.remove()
        raise
    handle.layer = layer
    n_text, n_vis = reference_shape(model, batches)
    report.update(layer=layer, num_layers=n_layers, flops=withdrawal_flops(text_config, n_text, n_vis, 0, layer))
    log.info("vtw: vision tokens withdrawn from layer %d of %d; prefill FLOPs x%.3f", layer, n_layers,
             report["flops"]["prefill_ratio"])  # fmt: skip
    return PassResult(report=report, handle=handle, reapply_config=dataclasses.replace(config, layer=layer))
