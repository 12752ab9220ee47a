"""Benchmark: the real-LM pruning table on ``smollm2_135m`` — every method x pattern x calibration seed.

Methods (compressx passes, decoder Linears, lm_head dense): ``dense``; ``magnitude`` (per layer); ``wanda``;
``sparsegpt`` (the paper's block scope); ``dsnot-wanda`` and ``dsnot-sparsegpt`` (DSnoT at its reference defaults
on that start); ``dsnot0-sparsegpt`` (DSnoT's SparseGPT start with 0 cycles: its matched initial mask, per-row
counts; for Wanda the 0-cycle start is Wanda itself, and for N:M SparseGPT's). Patterns: 50%, 60%, 70%
unstructured (per row), 2:4, 4:8.

Each run is a fresh subprocess (``tools/bench_llm_compressor.py --worker``), one thread: CPU time and wall time of
the pass (calibration included), peak RSS of the process (loading + pruning), perplexity on held-out prose
(pydoc_text test) and held-out Python source (stdlib_text test). The same calibration token ids for every method
of a seed (a safetensors file per seed). Times are reported as ratios to Wanda's in the same run and seed.

``magnitude`` and ``dense`` read no calibration data: they run once, on the first seed. ``--results FILE`` keeps
every run's JSON line in FILE and skips the runs FILE already holds, so an interrupted table resumes and the
table is always made from FILE's runs.

Run:  OMP_NUM_THREADS=1 python tools/bench_llm_table.py --seeds 0,1,2 --jobs 2 --results runs.jsonl --out table.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm_compressor import run_one, write_tokens  # noqa: E402

METHODS = ["dense", "magnitude", "wanda", "sparsegpt", "dsnot0-sparsegpt", "dsnot-wanda", "dsnot-sparsegpt"]
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (per layer)",
    "wanda": "wanda (= DSnoT's Wanda start, 0 cycles)",
    "sparsegpt": "sparsegpt",
    "dsnot0-sparsegpt": "DSnoT's SparseGPT start, 0 cycles (per-row counts)",
    "dsnot-wanda": "dsnot (wanda start)",
    "dsnot-sparsegpt": "dsnot (sparsegpt start)",
}


SEED_FREE = ("dense", "magnitude")  # no calibration data: one run serves every seed


def wanted(method: str, pattern: str) -> bool:
    # for N:M, DSnoT's SparseGPT start is SparseGPT itself
    return not (method == "dsnot0-sparsegpt" and ":" in pattern)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plan(seeds: list[int], patterns: list[str], methods: list[str]) -> list[tuple[int, str, str]]:
    """Every ``(seed, method, pattern)`` run of the table; seed-free methods on the first seed only."""
    tasks = [(seeds[0], "dense", "50%")] if "dense" in methods else []
    return tasks + [
        (seed, method, pattern)
        for seed in seeds
        for pattern in patterns
        for method in methods
        if method != "dense" and wanted(method, pattern) and (method not in SEED_FREE or seed == seeds[0])
    ]


def split_done(tasks: list[tuple[int, str, str]], results_file: Path) -> tuple[list[dict], list[tuple[int, str, str]]]:
    """The runs of ``tasks`` that ``results_file`` already holds, and the tasks still to run."""
    lines = results_file.read_text().splitlines() if results_file.exists() else []
    done = [r for r in map(json.loads, lines) if (r["seed"], r["method"], r["pattern"]) in set(tasks)]
    have = {(r["seed"], r["method"], r["pattern"]) for r in done}
    return done, [t for t in tasks if t not in have]


def table_lines(results: list[dict], seeds: list[int], patterns: list[str], methods: list[str]) -> list[str]:
    """The markdown tables of ``results`` (one JSON dict per run): perplexities, time ratios, DSnoT checks."""
    by = {(r["seed"], r["method"], r["pattern"]): r for r in results}
    dense = [r for r in results if r["method"] == "dense"]
    lines: list[str] = []
    if dense:
        lines += [
            f"Dense perplexity: prose {dense[0]['ppl']['prose']:.2f}, source {dense[0]['ppl']['source']:.2f}; "
            f"peak RSS of loading + evaluating {dense[0]['peak_rss_mib']:.0f} MiB.",
            "",
        ]
    lines += [
        "Each cell: perplexity on prose / on source (mean ± std over seeds) / pruning CPU time as a ratio to "
        "Wanda's on the same seed (magnitude, run once: to Wanda's mean) / peak RSS (MiB, loading + pruning).",
        "",
        "| method | " + " | ".join(patterns) + " |",
        "|---|" + "---|" * len(patterns),
    ]
    for method in methods:
        if method == "dense":
            continue
        cells = []
        for pattern in patterns:
            rs = [by[(seed, method, pattern)] for seed in seeds if (seed, method, pattern) in by]
            if not rs:
                cells.append("—")
                continue
            wanda_cpu = {r["seed"]: r["cpu_s"] for (_, m, p), r in by.items() if m == "wanda" and p == pattern}
            if method in SEED_FREE:  # one run for every seed: against Wanda's mean
                ratio = [r["cpu_s"] / statistics.mean(wanda_cpu.values()) for r in rs]
            else:
                ratio = [r["cpu_s"] / wanda_cpu[r["seed"]] for r in rs]
            extra = f" ({statistics.mean(r['cpu_s'] for r in rs):.0f} s)" if method == "wanda" else ""
            cells.append(
                f"{_mean_std([r['ppl']['prose'] for r in rs])} / {_mean_std([r['ppl']['source'] for r in rs])} / "
                f"{statistics.mean(ratio):.2f}x{extra} / {max(r['peak_rss_mib'] for r in rs):.0f}"
            )
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    paired = []  # DSnoT against its own start, seed by seed (the spread over seeds is mostly the data's)
    for dsnot, start in (("dsnot-wanda", "wanda"), ("dsnot-sparsegpt", "sparsegpt")):
        for pattern in patterns:
            first = start if start == "wanda" or ":" in pattern else "dsnot0-sparsegpt"
            pairs = [(by[(s, first, pattern)], by[(s, dsnot, pattern)]) for s in seeds
                     if (s, first, pattern) in by and (s, dsnot, pattern) in by]  # fmt: skip
            if not pairs:
                continue
            for data in ("prose", "source"):
                change = [d["ppl"][data] / b["ppl"][data] - 1 for b, d in pairs]
                better = sum(c < 0 for c in change)
                paired.append(
                    f"| {LABELS[dsnot]} | {pattern} | {data} | {LABELS[first]} | "
                    f"{100 * statistics.mean(change):+.1f}% | {better}/{len(pairs)} |"
                )
    if paired:
        lines += [
            "",
            "DSnoT against its initial mask on the same seed: mean relative change of perplexity, and on how many "
            "seeds it was lower.",
            "",
            "| run | pattern | held-out | initial mask | perplexity change | seeds lower |",
            "|---|---|---|---|---|---|",
            *paired,
        ]
    checks = [
        f"| {r['seed']} | {r['pattern']} | {r['method']} | {r['refined_lower']}/{r['refined']} | "
        f"{r['expected_error_reduction']:.3f} |"
        for r in results
        if r["method"].startswith("dsnot-")
    ]
    if checks:
        lines += [
            "",
            "DSnoT: refined Linears whose mean |expected error| (what DSnoT minimises) fell, and the relative "
            "reduction of the summed mean |error|.",
            "",
            "| seed | pattern | run | layers lower | error reduction |",
            "|---|---|---|---|---|",
            *checks,
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--patterns", default="50%,60%,70%,2:4,4:8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", help="JSONL of runs: the runs it holds are not repeated; new ones are appended")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    patterns = args.patterns.split(",")
    methods = args.methods.split(",")
    if "wanda" not in methods:
        parser.error("--methods must include wanda: times are ratios to Wanda's")
    work = Path(tempfile.mkdtemp(prefix="bench-llm-table-"))
    tokens = {}
    for seed in seeds:
        tokens[seed] = work / f"tokens-{seed}.safetensors"
        model = write_tokens(tokens[seed], args.calib_samples, args.seq_len, args.eval_samples, seed)
    results_file = Path(args.results) if args.results else work / "results.jsonl"
    tasks = plan(seeds, patterns, methods)
    done, todo = split_done(tasks, results_file)
    print(f"{len(done)} runs read from {results_file}, {len(todo)} to run", flush=True)

    def run(task):
        seed, method, pattern = task
        r = run_one(sys.executable, "compressx", method, pattern, model, tokens[seed], args.batch_size)
        r["seed"] = seed
        print(json.dumps(r), flush=True)
        with open(results_file, "a") as f:
            f.write(json.dumps(r) + "\n")
        return r

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = done + list(pool.map(run, todo))
    load = os.getloadavg()
    lines = [
        f"Command: `OMP_NUM_THREADS=1 python tools/bench_llm_table.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, one thread per run, "
        f"{args.jobs} run(s) at a time, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"torch {results[0]['torch']}, Python {platform.python_version()}. Calibration: {args.calib_samples} "
        f"pydoc_text train windows x {args.seq_len} tokens per seed (seeds {args.seeds}), batch size "
        f"{args.batch_size}; perplexity on {args.eval_samples} held-out windows x {args.seq_len} tokens of prose "
        "(pydoc_text test) and of Python source (stdlib_text test).",
        "",
    ]
    lines += table_lines(results, seeds, patterns, methods)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"raw results: {work / 'results.jsonl'}")


if __name__ == "__main__":
    main()
