"""FastV: dropping the vision tokens that get the least attention, after layer K (the baseline VTW compares with).

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024, arXiv:2403.06764 (official code ``pkunlp-icler/FastV``). At decoder layer
K-1 the attention that the last prompt position pays to each vision token, averaged over heads, ranks the vision
tokens; from layer K on only the top ``(1 - ratio)`` of them stay, with every text token. Defaults K = 2,
ratio = 0.5 (the paper's "1/2 tokens after layer 2").

Touches: forward hooks only (``compressx.hooks.token_withdrawal``, the same machinery as ``vtw``); ``remove()``
restores the model exactly.

Deviations from the official code: the attention is recomputed from layer K-1's projections for the last
position only (the official code asks the layer for the whole attention matrix, which needs eager attention);
every ``image_token_id`` position of a row is ranked (several images, left-padded batches: the ranking query is the
last position), not one fixed span; cached
decoding keeps the shortened cache of the withdrawn layers (the official inplace variant recomputes without cache).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError
from compressx.hooks.flops import withdrawal_flops
from compressx.hooks.token_withdrawal import TokenWithdrawal, decoder_of, keep_index
from compressx.passes.vtw import withdrawal_problems
from compressx.registry import PassContext, PassResult, register_pass


@dataclasses.dataclass(frozen=True)
class FastvConfig(PassConfig):
    """Config of the ``fastv`` pass.

    Attributes:
        layer: K, the first layer that sees only the kept vision tokens (>= 1: layer K-1's attention ranks them).
        ratio: the fraction of each prompt's vision tokens dropped, in [0, 1] (default 0.5).
    """

    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ConfigError(f"got {self.layer}; expected >= 1 (layer K-1's attention ranks the tokens)", "layer")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"got {self.ratio}; expected a fraction in [0, 1]", path="ratio")


def fastv_keep(vision: torch.Tensor, attention: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """Keep-index ``[B, n_keep]``: every text position and the ``n_vis - floor(ratio * n_vis)`` vision positions of
    each row with the highest ``attention``; sorted by position."""
    if attention is None:
        raise CompressxError("fastv found no attention scores at layer K-1 (is layer K-1 a decoder layer?)")
    n_vis = vision.sum(1)
    if bool((n_vis != n_vis[0]).any()):
        raise CompressxError(f"the rows of this batch have different numbers of vision tokens ({n_vis.tolist()})")
    drop = math.floor(ratio * int(n_vis[0]))
    scores = attention.float().masked_fill(~vision, float("inf"))  # text always ranks first
    order = scores.argsort(dim=1, descending=True, stable=True)
    kept = torch.zeros_like(vision)
    kept.scatter_(1, order[:, : vision.shape[1] - drop], True)
    return keep_index(kept.nonzero(as_tuple=True), vision.shape[0])


@register_pass(
    "fastv",
    config=FastvConfig,
    kind="runtime",
    paper="An Image is Worth 1/2 Tokens After Layer 2 (FastV, arXiv:2403.06764)",
    families=("mllm",),
    check_model=withdrawal_problems,
)
def apply_fastv(model: nn.Module, config: FastvConfig, ctx: PassContext) -> PassResult:
    """Drop the least-attended vision tokens from layer K on; report the analytic FLOPs for a LLaVA prompt."""
    _, layers, text_config = decoder_of(model)

    def select(vision: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        return fastv_keep(vision, attention, config.ratio)

    handle = TokenWithdrawal(model, config.layer, select=select, attention_probe=True)
    n_vis = int(getattr(model.config, "image_seq_length", 576))
    kept = n_vis - math.floor(config.ratio * n_vis)
    report: dict[str, Any] = {
        "layer": config.layer,
        "ratio": config.ratio,
        "num_layers": len(layers),
        "flops": withdrawal_flops(text_config, 64, n_vis, kept, config.layer),
    }
    return PassResult(report=report, handle=handle)
