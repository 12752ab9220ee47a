"""VTW speed on CPU: prefill and per-token decode time with and without VTW, next to the analytic FLOPs ratio.

A LLaVA-1.5-shaped model scaled down to run on a CPU (random weights; speed does not depend on them): 576 vision
tokens between a 35-token system prompt and a 30-token instruction (641 prompt tokens), a Llama decoder of 16
layers (hidden 512, 8 heads, SwiGLU 1376, vocabulary 32064) and K = 8 (the paper's K/L = 1/2 for LLaVA-1.5-7B).
The image features are given precomputed (``mm_encoder_outputs``), so the time is the decoder's, as the FLOPs
count is. Both settings run in the same process, interleaved; the medians of the repeats are reported.

Run:  PYTHONPATH=. python tools/bench_vtw.py [--repeats 7] [--threads 1] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from compressx.hooks.flops import withdrawal_flops
from compressx.hooks.token_withdrawal import TokenWithdrawal

N_SYS, N_VIS, N_INSTR, IMAGE_TOKEN = 35, 576, 30, 32000


def build(layers: int, hidden: int) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=4096,
    )  # fmt: skip
    vision = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)  # fmt: skip
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, image_seq_length=N_VIS)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@torch.no_grad()
def run(model, ids, features, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, mean seconds per decoded token) of one greedy generation with a DynamicCache."""
    cache = DynamicCache(config=model.config.text_config)
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    start = time.perf_counter()
    # logits_to_keep=1 as generate() does: the lm_head runs on the last position only, as counted
    logits = model(
        input_ids=ids, mm_encoder_outputs=encoded, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return prefill, (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 30000, (N_SYS,), generator=gen), torch.full((N_VIS,), IMAGE_TOKEN),
                     torch.randint(3, 30000, (N_INSTR,), generator=gen)])[None]  # fmt: skip
    features = [torch.randn(N_VIS, args.hidden, generator=gen)]
    handle = TokenWithdrawal(model, args.layers)
    times: dict[str, list[tuple[float, float]]] = {"full": [], "vtw": []}
    run(model, ids, features, 2)  # warm-up
    for _ in range(args.repeats):
        for name, layer in (("full", args.layers), ("vtw", args.k)):
            handle.layer = layer
            times[name].append(run(model, ids, features, args.new_tokens))
    flops = withdrawal_flops(model.config.text_config, N_SYS + N_INSTR, N_VIS, 0, args.k)
    med = {name: [statistics.median(t[i] for t in runs) for i in (0, 1)] for name, runs in times.items()}
    prefill_speedup = med["full"][0] / med["vtw"][0]
    decode_speedup = med["full"][1] / med["vtw"][1]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.repeats} interleaved repeats, medians")  # fmt: skip
    print(f"model: {args.layers} layers, hidden {args.hidden}; prompt {ids.shape[1]} tokens ({N_VIS} vision); "
          f"K = {args.k}; {args.new_tokens} decoded tokens")  # fmt: skip
    print("\n| | full | VTW | measured speed-up | analytic speed-up (FLOPs) | measured / analytic |")
    print("|---|---|---|---|---|---|")
    analytic_prefill = 1 / flops["prefill_ratio"]
    analytic_decode = 1 / flops["decode_ratio"]
    print(f"| prefill (s) | {med['full'][0]:.3f} | {med['vtw'][0]:.3f} | {prefill_speedup:.2f}x | "
          f"{analytic_prefill:.2f}x | {prefill_speedup / analytic_prefill:.0%} |")  # fmt: skip
    print(f"| decode (ms/token) | {1000 * med['full'][1]:.1f} | {1000 * med['vtw'][1]:.1f} | {decode_speedup:.2f}x | "
          f"{analytic_decode:.2f}x | {decode_speedup / analytic_decode:.0%} |")  # fmt: skip
    paired = sorted(f[0] / v[0] for f, v in zip(times["full"], times["vtw"], strict=True))
    print(f"\nprefill speed-up of each repeat (full / VTW, same repeat): {', '.join(f'{x:.2f}' for x in paired)}")
    giga, mega = 1e9, 1e6
    print(f"analytic FLOPs: prefill {flops['prefill_flops_full'] / giga:.1f} → {flops['prefill_flops'] / giga:.1f} "
          f"GFLOP; decode {flops['decode_flops_per_token_full'] / mega:.1f} → "
          f"{flops['decode_flops_per_token'] / mega:.1f} MFLOP per token")  # fmt: skip


if __name__ == "__main__":
    main()
