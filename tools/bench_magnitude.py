"""Benchmark: magnitude pruning of the zoo LM (llama_byte_1m) — perplexity and pass time per pattern.

Every row is measured in the same process against the dense model. Pruned weights stay dense (exact zeros), so
this measures quality, not speed: no pattern here runs faster on CPU.

Run:  python tools/bench_magnitude.py [--out docs/results/magnitude.md] [--samples 128]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/magnitude.md")
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()

    dense, tokenizer = load_zoo_model("llama_byte_1m")
    tokens = load_tokens(DataSpec("stdlib_text", split="test", samples=args.samples, seq_len=256), tokenizer)
    dense_ppl = perplexity(dense, tokens, progress=False)
    lines = [
        "# magnitude on the zoo LM",
        "",
        f"Model `zoo:llama_byte_1m` (byte-level Llama, {sum(p.numel() for p in dense.parameters()):,} parameters),",
        f"perplexity on the stdlib `test` split, {args.samples} windows x 256 bytes, seed 0. All Linear layers of",
        "the decoder are pruned; `lm_head` is kept dense (as in recipes/llm/magnitude_llama_byte.yaml).",
        "",
        f"Command: `python tools/bench_magnitude.py --samples {args.samples}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "",
        "| pattern | sparsity reached | perplexity | vs dense | pass time (s) |",
        "|---|---|---|---|---|",
        f"| dense | 0.000 | {dense_ppl:.3f} | 1.000x | - |",
    ]
    for label, config in ROWS:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        result = compressx.apply(
            model, [{"pass": "magnitude", "config": config, "ignore": ["lm_head"]}], progress=False
        )
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tokens, progress=False)
        sparsity = result.steps[0].report["sparsity"]
        lines.append(f"| {label} | {sparsity:.3f} | {ppl:.3f} | {ppl / dense_ppl:.3f}x | {seconds:.3f} |")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
