"""Analytic FLOPs of a decoder LM's prefill and decode with and without token withdrawal (``vtw``, ``fastv``).

A model of the Linears (attention projections, gated MLP) and the attention products; the vision tower, norms and
biases are left out (the vision tower is the same either way). Reported by the passes and used by the VTW tools.
"""

from __future__ import annotations

from typing import Any


def layer_linear_params(config: Any) -> int:
    """Weights of one decoder layer's Linears (attention projections and gated MLP), biases ignored."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    return d * (q + 2 * kv) + q * d + 3 * d * config.intermediate_size


def decoder_flops(config: Any, n_tokens: list[int], context: list[int]) -> int:
    """FLOPs (2 per multiply-add) of one decoder forward: layer ``l`` runs ``n_tokens[l]`` queries against
    ``context[l]`` keys (projections, MLP, ``Q·Kᵀ`` and ``A·V``); the final norm and lm_head on one position."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    per_layer = layer_linear_params(config)
    total = sum(2 * n * per_layer + 4 * n * c * q_width for n, c in zip(n_tokens, context, strict=True))
    return total + 2 * config.hidden_size * config.vocab_size


def withdrawal_flops(config: Any, n_text: int, n_vis: int, n_kept_vis: int, layer: int) -> dict[str, Any]:
    """Analytic prefill FLOPs and per-token decode FLOPs (first generated token) with and without withdrawal.

    Layers < ``layer`` see ``n_text + n_vis`` tokens, later layers ``n_text + n_kept_vis`` (0 for VTW). Prefill
    attention is counted as the full square the kernels compute. The vision tower is the same either way and is
    not counted.
    """
    n_layers = config.num_hidden_layers
    layer = min(layer, n_layers)
    full, cut = n_text + n_vis, n_text + n_kept_vis
    rows = [full] * layer + [cut] * (n_layers - layer)
    prefill_full = decoder_flops(config, [full] * n_layers, [full] * n_layers)
    prefill_cut = decoder_flops(config, rows, rows)
    decode_full = decoder_flops(config, [1] * n_layers, [full + 1] * n_layers)
    decode_cut = decoder_flops(config, [1] * n_layers, [r + 1 for r in rows])
    return {
        "text_tokens": n_text,
        "vision_tokens": n_vis,
        "prefill_flops": prefill_cut,
        "prefill_flops_full": prefill_full,
        "prefill_ratio": round(prefill_cut / prefill_full, 4),
        "decode_flops_per_token": decode_cut,
        "decode_flops_per_token_full": decode_full,
        "decode_ratio": round(decode_cut / decode_full, 4),
    }
