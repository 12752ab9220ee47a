"""Benchmark: magnitude pruning of the zoo LM (llama_byte_1m) — perplexity and pass time per pattern.

Every row is measured in the same process against the dense model. Pruned weights stay dense (exact zeros), so
this measures quality, not speed: no pattern here runs faster on CPU. Pass times: ``--repeats`` interleaved rounds
(tools/benchlib.py), each on a fresh copy of the dense model; median and range, and the ratio to the 50% per-layer
row measured round by round.

Run:  PYTHONPATH=. python tools/bench_magnitude.py [--out docs/results/magnitude.md] [--samples 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy

import benchlib

import compressx
from compressx.data import DataSpec, load_tokens
from compressx.evaluate import perplexity
from compressx.zoo import load_zoo_model

ROWS = [
    ("unstructured 30%, per layer", {"sparsity": 0.3}),
    ("unstructured 50%, per layer", {"sparsity": 0.5}),
    ("unstructured 50%, per row", {"sparsity": 0.5, "scope": "row"}),
    ("unstructured 70%, per layer", {"sparsity": 0.7}),
    ("unstructured 70%, per row", {"sparsity": 0.7, "scope": "row"}),
    ("4:8", {"pattern": "4:8"}),
    ("2:4", {"pattern": "2:4"}),
    ("1:4", {"pattern": "1:4"}),
]
REFERENCE = "unstructured 50%, per layer"


def prune(model, config: dict):
    return compressx.apply(model, [{"pass": "magnitude", "config": config, "ignore": ["lm_head"]}], progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_arguments(parser, out="docs/results/magnitude.md", repeats=5, clock="cpu")
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    run = benchlib.start(args)

    dense, tokenizer = load_zoo_model("llama_byte_1m")
    tokens = load_tokens(DataSpec("stdlib_text", split="test", samples=args.samples, seq_len=256), tokenizer)
    dense_ppl = perplexity(dense, tokens, progress=False)
    configs = dict(ROWS)
    times = benchlib.interleaved(
        {label: (lambda model, label=label: prune(model, configs[label])) for label in configs},
        args.repeats,
        setup=lambda label: copy.deepcopy(dense),
        clock=args.clock,
    )
    lines = [
        "# magnitude on the zoo LM",
        "",
        f"Model `zoo:llama_byte_1m` (byte-level Llama, {sum(p.numel() for p in dense.parameters()):,} parameters),",
        f"perplexity on the stdlib `test` split, {args.samples} windows x 256 bytes, seed 0. All Linear layers of",
        "the decoder are pruned; `lm_head` is kept dense (as in recipes/llm/magnitude_llama_byte.yaml).",
        "",
        *run.header(),
        "",
        f"Pass time: {args.clock} ms, median (range) of {args.repeats} interleaved rounds, each on a fresh copy of "
        f"the dense model; the ratio to `{REFERENCE}` is taken round by round (the figure to compare: the "
        "absolute times move with the machine's load).",
        "",
        "| pattern | sparsity reached | perplexity | vs dense | pass time (ms) | time vs 50% per layer |",
        "|---|---|---|---|---|---|",
        f"| dense | 0.000 | {dense_ppl:.3f} | 1.000x | - | - |",
    ]
    for label, config in ROWS:
        model = copy.deepcopy(dense)
        sparsity = prune(model, config).steps[0].report["sparsity"]
        ppl = perplexity(model, tokens, progress=False)
        ratio = benchlib.ratio(times[label], times[REFERENCE])
        lines.append(
            f"| {label} | {sparsity:.3f} | {ppl:.3f} | {ppl / dense_ppl:.3f}x | {times[label].format(1, 1000)} "
            f"| {ratio.format(2)} |"
        )
        print(lines[-1], flush=True)
    benchlib.write(args.out, lines)


if __name__ == "__main__":
    main()
