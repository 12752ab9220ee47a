"""Benchmark: LLM pruning methods on the zoo LMs — perplexity, reconstruction error, time, and DSnoT's claims.

For each zoo LM, pattern (50%, 60%, 70% unstructured per row; 2:4; 4:8) and calibration seed, every method
prunes a fresh copy of the dense model (decoder Linears; lm_head dense):

* magnitude (per layer, the classic baseline) and magnitude per row;
* wanda, sparsegpt (paper's block scope);
* DSnoT on each start (wanda, magnitude, sparsegpt) and, as its matched baseline, the same start through the
  same code with ``max_cycles: 0`` (same per-row grouping).

Measured: perplexity on the stdlib test split; the relative reconstruction error of the decoder Linears,
``||(W - What) X||^2 / ||W X||^2`` averaged over Linears, with X the inputs each Linear sees in the *dense*
model on the calibration windows and on held-out windows; wall time of the pass (calibration included) as a
ratio to Wanda's in the same run. Checked for DSnoT: the mean |expected error| of every refined Linear is lower
after refinement than for its initial mask, and its per-row sparsity / N:M pattern equals the matched
baseline's.

Run:  python tools/bench_llm_pruning.py [--models llama_byte_1m,llama_byte_outlier_1m] [--seeds 0,1,2]
Writes docs/results/llm_pruning.md (or --out). For the real LM (``smollm2_135m``, English prose), a subset:
``--models smollm2_135m --data pydoc_text --patterns 50%,2:4 --methods "magnitude (per layer),wanda,sparsegpt"
--calib-samples 32 --no-reconstruction`` (the reconstruction error keeps an ``X^T X`` of every Linear: ~1 GB there).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn

import compressx
from compressx.data import DataSpec, load_tokens
from compressx.evaluate import perplexity
from compressx.zoo import load_zoo_model

PATTERNS = {
    "50%": {"sparsity": 0.5},
    "60%": {"sparsity": 0.6},
    "70%": {"sparsity": 0.7},
    "2:4": {"pattern": "2:4"},
    "4:8": {"pattern": "4:8"},
}
DECODER = ["re:.*layers\\.\\d+\\..*"]


def methods(pattern: dict) -> dict[str, dict]:
    nm = "pattern" in pattern
    magnitude_row = dict(pattern) if nm else dict(pattern, scope="row")
    out = {
        "magnitude (per layer)": {"pass": "magnitude", "config": dict(pattern), "targets": DECODER},
        "magnitude (per row)": {"pass": "magnitude", "config": magnitude_row, "targets": DECODER},
        "wanda": {"pass": "wanda", "config": dict(pattern, batch_size=8)},
        "sparsegpt": {"pass": "sparsegpt", "config": dict(pattern, batch_size=8)},
    }
    for init in ("wanda", "magnitude", "sparsegpt"):
        out[f"{init} start (dsnot, 0 cycles)"] = {
            "pass": "dsnot", "config": dict(pattern, init=init, max_cycles=0, batch_size=8),
        }  # fmt: skip
        out[f"dsnot ({init} start)"] = {"pass": "dsnot", "config": dict(pattern, init=init, batch_size=8)}
    return out


def gram_matrices(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of the inputs of every decoder Linear, from the dense model."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in n
    ]
    with torch.no_grad():
        for start in range(0, len(tokens), 8):
            model(input_ids=tokens[start : start + 8])
    for h in handles:
        h.remove()
    return grams


def reconstruction_error(dense: nn.Module, pruned: nn.Module, grams: dict[str, torch.Tensor]) -> float:
    errors = []
    for name, gram in grams.items():
        w = dense.get_submodule(name).weight.double()
        delta = w - pruned.get_submodule(name).weight.double()
        errors.append((torch.trace(delta @ gram @ delta.T) / torch.trace(w @ gram @ w.T)).item())
    return sum(errors) / len(errors)


def zero_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (m.weight == 0).sum(dim=1) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
    }


def run_model(
    name: str,
    seeds: list[int],
    samples: int,
    patterns: list[str],
    chosen: list[str] | None,
    data: str = "stdlib_text",
    calib_samples: int = 128,
    reconstruction: bool = True,
) -> tuple[list[str], list[str]]:
    dense, tokenizer = load_zoo_model(name)
    held_out = load_tokens(DataSpec(data, split="test", samples=samples, seq_len=256), tokenizer)
    dense_ppl = perplexity(dense, held_out, progress=False)
    held_grams = gram_matrices(dense, held_out[:32]) if reconstruction else {}
    # results[pattern][method] -> list of (ppl, err_calib, err_held, seconds)
    results: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    checks: list[str] = []
    for seed in seeds:
        calib = load_tokens(DataSpec(data, split="train", samples=calib_samples, seq_len=256, seed=seed), tokenizer)
        calib_grams = gram_matrices(dense, calib[:32]) if reconstruction else {}
        for label in patterns:
            pattern = PATTERNS[label]
            rows_of: dict[str, dict] = {}
            reports: dict[str, dict] = {}
            for method, step in methods(pattern).items():
                if chosen is not None and method not in chosen:
                    continue
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                result = compressx.apply(model, [step], data=calib, progress=False)
                seconds = time.perf_counter() - start
                results[label][method].append(
                    (
                        perplexity(model, held_out, progress=False),
                        reconstruction_error(dense, model, calib_grams) if reconstruction else float("nan"),
                        reconstruction_error(dense, model, held_grams) if reconstruction else float("nan"),
                        seconds,
                    )
                )
                rows_of[method] = zero_rows(model)
                reports[method] = result.steps[0].report
                print(f"{name} seed {seed} {label:4} {method:32} ppl {results[label][method][-1][0]:.3f} "
                      f"{seconds:.2f}s", flush=True)  # fmt: skip
            for init in ("wanda", "magnitude", "sparsegpt"):
                if f"dsnot ({init} start)" not in reports or f"{init} start (dsnot, 0 cycles)" not in rows_of:
                    continue
                refined = reports[f"dsnot ({init} start)"]["refinement"]
                lower = sum(r["mean_abs_error_after"] < r["mean_abs_error_before"] for r in refined.values())
                same = all(
                    torch.equal(rows_of[f"dsnot ({init} start)"][n], rows_of[f"{init} start (dsnot, 0 cycles)"][n])
                    for n in rows_of[f"dsnot ({init} start)"]
                )
                checks.append(
                    f"| {name} | {seed} | {label} | {init} | {lower}/{len(refined)} | "
                    f"{reports[f'dsnot ({init} start)']['expected_error_reduction']:.3f} | {'yes' if same else 'NO'} |"
                )
    table = [
        f"### `{name}` (dense perplexity {dense_ppl:.3f}; seeds {', '.join(map(str, seeds))})",
        "",
        "Each cell: perplexity (mean ± std over seeds) / relative reconstruction error on calibration; held-out "
        "inputs / time as a ratio to Wanda's.",
        "",
        "| method | " + " | ".join(patterns) + " |",
        "|---|" + "---|" * len(patterns),
    ]
    for method in methods(PATTERNS["50%"]):
        if chosen is not None and method not in chosen:
            continue
        cells = []
        for label in patterns:
            runs = results[label][method]
            ppl = [r[0] for r in runs]
            std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            wanda_time = statistics.mean(r[3] for r in results[label]["wanda"])
            cells.append(
                f"{statistics.mean(ppl):.3f} ± {std:.3f} / {statistics.mean(r[1] for r in runs):.4f}; "
                f"{statistics.mean(r[2] for r in runs):.4f} / {statistics.mean(r[3] for r in runs) / wanda_time:.2f}x"
            )
        table.append(f"| {method} | " + " | ".join(cells) + " |")
    return table, checks


def _quoted(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama_byte_1m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=64, help="held-out windows for perplexity")
    parser.add_argument("--out", default="docs/results/llm_pruning.md")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"a subset of {', '.join(PATTERNS)}")
    parser.add_argument("--methods", default=None, help="a comma-separated subset of the methods (default: all)")
    parser.add_argument("--data", default="stdlib_text", choices=["stdlib_text", "pydoc_text"])
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows per seed")
    parser.add_argument("--no-reconstruction", action="store_true", help="skip the reconstruction errors")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    patterns = args.patterns.split(",")
    chosen = args.methods.split(",") if args.methods else None
    if chosen is not None and "wanda" not in chosen:
        parser.error("--methods must include wanda: times are ratios to Wanda's")
    lines = [
        "# LLM pruning on the zoo LMs: magnitude, Wanda, SparseGPT, DSnoT",
        "",
        f"Command: `python tools/bench_llm_pruning.py {' '.join(_quoted(a) for a in sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Calibration: {args.calib_samples} {args.data} `train` windows x 256 "
        f"tokens per seed; perplexity: {args.samples} `test` windows x 256 tokens. Decoder Linears pruned, lm_head "
        "dense." + (" Reconstruction errors not measured (nan)." if args.no_reconstruction else ""),
        "",
    ]
    all_checks = []
    for name in args.models.split(","):
        table, checks = run_model(
            name, seeds, args.samples, patterns, chosen, args.data, args.calib_samples, not args.no_reconstruction
        )
        lines += table + [""]
        all_checks += checks
    lines += [
        "### DSnoT checks",
        "",
        "Refined Linears whose mean |expected error| (the quantity DSnoT optimises) is lower after refinement than "
        "for its initial mask; the relative reduction of the summed mean |error|; whether every Linear's per-row "
        "zero count equals the matched baseline's (same start, 0 cycles).",
        "",
        "| model | seed | pattern | start | layers lower | error reduction | same sparsity per row |",
        "|---|---|---|---|---|---|---|",
        *all_checks,
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
