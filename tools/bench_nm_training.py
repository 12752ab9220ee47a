"""Benchmark of the N:M training passes on the zoo digits ResNet: accuracy over paired seeds, and step time.

Setting ("hard", so that the methods separate): digits with 500 training images and Gaussian input noise
0.25 on train and test images, 40 epochs, SGD lr 0.05 momentum 0.9 weight decay 5e-4, cosine, batch 64; the same
init, data order and optimiser for every method of a seed (paired design). Methods:

* ``dense`` — no pass (upper bound);
* ``magnitude_finetune`` — dense for 20 epochs, magnitude N:M at epoch 20, 20 epochs with the mask fixed;
* ``sr_ste`` — SR-STE from scratch (λ 2e-4);
* ``lbc`` — removal window epochs 0-20 (the official 60-of-120 ratio), cubic;
* ``spre`` — SpRe (SR-STE main branches + spatial extra branches), folded before evaluation.

Accuracy is the **last-epoch** top-1 on the noisy test split, measured on the finalised plain model (N:M
checked). Step time: every method prepared at the pattern, trained in interleaved rounds of steps in this
process (tools/benchlib.py), CPU seconds per step (forward, backward, SGD step; one pinned intra-op thread, this
process's CPU time, so that other processes on the machine do not skew the ratio); the ratio to dense is taken
round by round, median and range. LBC is timed inside its removal window (scores still trained), its costliest
phase. Step times are recomputed when missing from the JSON (delete its ``step_times`` to re-measure only them).

Run:  PYTHONPATH=. python tools/bench_nm_training.py       (about 16 min on 2 busy CPU cores; resumable)
      PYTHONPATH=. python tools/bench_nm_training.py --seeds 1 --patterns 2:4 --epochs 4   (a quick look)
Results: docs/results/nm_training.md (and the raw runs in docs/results/nm_training.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import benchlib
import torch
import torch.nn.functional as F

import compressx
from compressx.builtin_trainer import parse_train_spec, train
from compressx.images import parse_image_data_spec, top1
from compressx.zoo import resnet_digits

METHODS = ("dense", "magnitude_finetune", "sr_ste", "lbc", "spre")
DATA = {"source": "digits", "split": "train", "train_images": 500, "noise": 0.25, "seed": 0}
TEST = {"source": "digits", "split": "test", "noise": 0.25, "seed": 0}


def train_spec(epochs: int, seed: int):
    return parse_train_spec(
        {
            "data": DATA,
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "seed": seed,
        }
    )


def pass_config(method: str, pattern: str, epochs: int) -> dict:
    half = epochs // 2
    return {
        "magnitude_finetune": {"pattern": pattern, "prune_epoch": half},
        "sr_ste": {"pattern": pattern},
        "lbc": {"pattern": pattern, "start_epoch": 0, "end_epoch": half},
        "spre": {"pattern": pattern},
    }[method]


def prepared(method: str, pattern: str, epochs: int, seed: int):
    torch.manual_seed(seed)
    model = resnet_digits.build_empty()
    handle = None if method == "dense" else compressx.prepare(model, method, pass_config(method, pattern, epochs))
    return model, handle


def run_one(method: str, pattern: str, epochs: int, seed: int) -> dict:
    model, handle = prepared(method, pattern, epochs, seed)
    summary = train(model, train_spec(epochs, seed), [handle] if handle else [], progress=False)
    if handle:
        handle.finalize()  # checks the N:M pattern of every layer (raises otherwise)
    accuracy = top1(model, parse_image_data_spec(TEST))
    return {
        "method": method,
        "pattern": pattern if handle else None,
        "seed": seed,
        "top1": accuracy,
        "seconds": summary["seconds"],
    }


def step_times(pattern: str, epochs: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """CPU seconds per training step of each method at ``pattern``, one sample per interleaved round."""
    spec = train_spec(epochs, 0)
    from compressx.images import digits_tensors

    images, labels = digits_tensors(spec.data)
    batch = (images[:64], labels[:64])
    models = {}
    for method in METHODS:
        model, handle = prepared(method, pattern, epochs, 0)
        if handle:
            handle.on_epoch_start(1)  # LBC: inside its removal window, scores trained
        model.train()
        models[method] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4))

    def train_steps(method: str) -> None:
        model, optimizer = models[method]
        for _ in range(steps):
            loss = F.cross_entropy(model(batch[0]), batch[1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # One pinned intra-op thread (benchlib.start) and CPU time: the ratios then hold even when other processes
    # share the cores (wall time under contention measures the scheduler more than the pass).
    cases = {m: (lambda m=m: train_steps(m)) for m in METHODS}
    times = benchlib.interleaved(cases, rounds, clock="cpu", progress=False)
    return {m: [t / steps for t in timing.samples] for m, timing in times.items()}


def step_ratio(timings: dict, pattern: str, method: str) -> benchlib.Timing:
    samples = timings[pattern]
    return benchlib.ratio(benchlib.Timing(tuple(samples[method])), benchlib.Timing(tuple(samples["dense"])))


def paired(results: list[dict], pattern: str, a: str, b: str) -> tuple[float, float, int, int]:
    """Mean and standard error of ``a - b`` over seeds, seeds where a > b, and seed count."""
    acc = {(r["method"], r["seed"]): r["top1"] for r in results if r["pattern"] in (pattern, None)}
    seeds = sorted({s for (m, s) in acc if m == a} & {s for (m, s) in acc if m == b})
    diffs = [acc[(a, s)] - acc[(b, s)] for s in seeds]
    if not diffs:
        return float("nan"), float("nan"), 0, 0
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, sum(d > 0 for d in diffs), len(diffs)


def expectations(results: list[dict], timings: dict, patterns: list[str]) -> list[str]:
    """The benchmark's claims, each computed from the runs, with a verdict."""
    out = []
    if "1:16" in patterns:
        _, _, wins, count = paired(results, "1:16", "lbc", "magnitude_finetune")
        verdict = "holds" if count >= 5 and wins >= 4 else "does not hold"
        out.append(f"- LBC beats magnitude + fine-tune on at least 4 of 5 seeds at 1:16: {wins}/{count} ({verdict}).")
    diffs = {p: paired(results, p, "spre", "magnitude_finetune") for p in patterns}
    cells = ", ".join(f"{p} {d[0]:+.2f} ({d[2]}/{d[3]} seeds)" for p, d in diffs.items())
    verdict = "holds" if all(d[0] >= 0 for d in diffs.values()) else "does not hold"
    out.append(f"- SpRe no worse than magnitude + fine-tune (mean paired difference >= 0): {cells} ({verdict}).")
    if "2:4" in timings:
        ratio = step_ratio(timings, "2:4", "lbc").median
        verdict = "holds" if ratio <= 1.5 else "does not hold"
        out.append(f"- LBC step time at most 1.5x dense at 2:4: {ratio:.2f}x ({verdict}).")
    return out


def write_markdown(results: list[dict], timings: dict, args, run: benchlib.Run, wall: float) -> None:
    lines = [
        "# N:M training on the zoo digits ResNet: accuracy and step time",
        "",
        *run.header(),
        f"(the header describes the last invocation, which ran only what the JSON lacked; {wall / 60:.0f} min wall "
        "over all invocations, other work sharing the 2 cores)",
        "",
        "Setting: `resnet_digits` from scratch (stem and classifier dense for all but SpRe, whose classifier is N:M "
        "as in its ResNets), digits with 500 training images and input noise σ = 0.25 (train and test), "
        f"{args.epochs} epochs, SGD 0.05 / momentum 0.9 / weight decay 5e-4, cosine, batch 64. Same init, data "
        "order and optimiser per seed for every method (paired). **Last-epoch** test top-1 (%, 540 noisy test "
        "images; one image = 0.19 points), on the finalised plain model, whose N:M pattern is checked.",
        "",
        "## Accuracy (mean ± std over seeds)",
        "",
        "| method | " + " | ".join(args.patterns) + " |",
        "|---|" + "---|" * len(args.patterns),
    ]
    for method in METHODS:
        cells = []
        for pattern in args.patterns:
            values = [r["top1"] for r in results if r["method"] == method and r["pattern"] in (pattern, None)]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {std:.2f} (n={len(values)})" if values else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (percentage points; mean ± standard error; seeds won)", ""]
    lines += ["| comparison | " + " | ".join(args.patterns) + " |", "|---|" + "---|" * len(args.patterns)]
    for a, b in [
        ("lbc", "magnitude_finetune"),
        ("spre", "magnitude_finetune"),
        ("sr_ste", "magnitude_finetune"),
        ("lbc", "sr_ste"),
        ("spre", "sr_ste"),
    ]:
        cells = []
        for pattern in args.patterns:
            mean, se, wins, count = paired(results, pattern, a, b)
            cells.append(f"{mean:+.2f} ± {se:.2f} ({wins}/{count})")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines += ["", "## The issue's expectations, checked on these numbers", ""]
    lines += expectations(results, timings, args.patterns)
    lines += [
        "",
        "## Per seed (top-1 %)",
        "",
        "| pattern | method | " + " | ".join(f"seed {s}" for s in args.seed_list) + " |",
    ]
    lines.append("|---|---|" + "---|" * len(args.seed_list))
    for pattern in args.patterns:
        for method in METHODS:
            row = {r["seed"]: r["top1"] for r in results if r["method"] == method and r["pattern"] in (pattern, None)}
            lines.append(
                f"| {pattern} | {method} | "
                + " | ".join(f"{row[s]:.2f}" if s in row else "–" for s in args.seed_list)
                + " |"
            )
    if timings:
        lines += ["", "## Training-step time, ratio to dense", ""]
        lines += [
            f"{args.rounds} interleaved rounds of {args.steps} steps (batch 64, forward + backward + SGD step), CPU "
            "time of one pinned intra-op thread; the ratio to dense taken round by round, median (range). LBC "
            "inside its removal window (scores trained).",
            "",
        ]
        lines += ["| pattern | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for pattern in timings:
            cells = [f"{step_ratio(timings, pattern, m).format(2)}x" for m in METHODS]
            lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
        lines.append("")
        dense = {p: benchlib.Timing(tuple(t["dense"])) for p, t in timings.items()}
        lines.append("Dense step (CPU ms): " + ", ".join(f"{p}: {t.format(1, 1000)}" for p, t in dense.items()))
    benchlib.write(args.out.with_suffix(".md"), lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "1:16"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    # tiny convs: one thread is as fast, and steady beside other processes
    benchlib.add_arguments(parser, out="docs/results/nm_training")
    args = parser.parse_args()
    run = benchlib.start(args)
    args.seed_list = list(range(args.seeds))
    logging.basicConfig(level=logging.WARNING)
    raw_path = args.out.with_suffix(".json")
    state = json.loads(raw_path.read_text()) if raw_path.is_file() else {"runs": [], "step_times": {}}
    if state.get("epochs", args.epochs) != args.epochs:
        state = {"runs": [], "step_times": {}}
    state.pop("timings", None)  # medians only, before tools/benchlib.py: measured again as step_times
    state.setdefault("step_times", {})
    state["epochs"] = args.epochs
    done = {(r["method"], r["pattern"], r["seed"]) for r in state["runs"]}
    start = time.perf_counter()
    for seed in args.seed_list:
        for method in METHODS:
            for pattern in [None] if method == "dense" else args.patterns:
                if (method, pattern, seed) in done:
                    continue
                result = run_one(method, pattern or "2:4", args.epochs, seed)
                result["pattern"] = pattern
                state["runs"].append(result)
                raw_path.write_text(json.dumps(state, indent=1) + "\n")
                label = f"seed {seed} {method:<18} {pattern or 'dense':<5}"
                print(f"{label} top1 {result['top1']:.2f}  ({result['seconds']:.0f} s)", flush=True)
    timings = state["step_times"]
    for pattern in args.patterns:
        if pattern not in timings:
            timings[pattern] = step_times(pattern, args.epochs, args.rounds, args.steps)
            raw_path.write_text(json.dumps(state, indent=1) + "\n")
            print(pattern, {m: f"{step_ratio(timings, pattern, m).median:.2f}x" for m in METHODS}, flush=True)
    state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - start
    raw_path.write_text(json.dumps(state, indent=1) + "\n")
    write_markdown(state["runs"], timings, args, run, state["wall_seconds"])


if __name__ == "__main__":
    main()
