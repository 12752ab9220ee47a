"""ViT post-training quantization on the zoo's digits ViT: FP vs ``ptq_minmax``, ``repq_vit`` and ``isvit``.

For each bit-width (W = A) and seed (the calibration sample and, for ``isvit``, the reconstruction batches):

* top-1 on the noisy digits test split (``vit_digits.NOISE``), never used for calibration;
* for ``isvit``, the top-1 after each SOS stage (1: activations only, channel-wise post-LN; 2: folded; 3: all);
* calibration time (``--clock``, wall by default); the ratio to ``repq_vit``'s is reported as the median (range)
  of the per-seed ratios, the two runs of a pair made one after the other in this process (tools/benchlib.py);
* the export size of the quantized weights (packed codes + scales) against fp16, from ``quant_export``.

Calibration images come from the noisy digits training split; ``isvit`` runs its ``fast`` preset (256 images,
100 iterations, lr 1e-4) unless ``--iterations`` / ``--lr`` say otherwise. Results are appended to a JSON file
(one row per run, so an interrupted run resumes) and summarised as a markdown table on stdout.

Run: PYTHONPATH=. python tools/bench_isvit.py --json docs/results/isvit.json    (--json: from the repository root)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import benchlib
import torch

import compressx
from compressx.images import image_dataset, parse_image_data_spec, top1
from compressx.passes.isvit import IsvitConfig, run_isvit
from compressx.quant_export import write_quantized
from compressx.zoo import load_zoo_model, vit_digits

METHODS = ("ptq_minmax", "repq_vit", "isvit")


def _row_key(row: dict) -> tuple:
    return row["method"], row["bits"], row["seed"]


def run_one(fp: torch.nn.Module, method: str, bits: int, seed: int, args: argparse.Namespace, calib, test) -> dict:
    model = copy.deepcopy(fp)
    stages: dict[str, float] = {}
    tick = benchlib.CLOCKS[args.clock]
    start = tick()
    if method == "isvit":
        overrides = {k: v for k, v in (("iterations", args.iterations), ("lr", args.lr)) if v is not None}
        config = IsvitConfig(preset="fast", w_bits=bits, a_bits=bits, seed=seed, **overrides)
        timed = {"eval": 0.0}

        def after_stage(stage: int, m: torch.nn.Module) -> None:
            t = tick()
            if stage < 3:
                stages[f"stage{stage}"] = top1(m, test)
            timed["eval"] += tick() - t

        run_isvit(model, config, calib, after_stage=after_stage)
        seconds = tick() - start - timed["eval"]
    else:
        config = {"w_bits": bits, "a_bits": bits, "seed": seed}
        compressx.apply(model, [{"pass": method, "config": config}], data=calib, progress=False)
        seconds = tick() - start
    row = {"method": method, "bits": bits, "seed": seed, "top1": top1(model, test), "seconds": round(seconds, 2)}
    row["clock"] = args.clock
    if stages:
        row["stage_top1"] = stages
    if seed == args.seeds[0]:
        with tempfile.TemporaryDirectory() as tmp:
            row["export_sizes"] = write_quantized(model, Path(tmp), None)["sizes"]
    return row


def summary(rows: list[dict], fp_top1: float) -> str:
    def mean_std(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.2f}" if values else "—"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    bits = sorted({r["bits"] for r in rows})
    lines = [
        f"FP top-1: {fp_top1:.2f}",
        "",
        "| method | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for method in METHODS:
        cells = [mean_std([r["top1"] for r in rows if r["method"] == method and r["bits"] == b]) for b in bits]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    for stage in ("stage1", "stage2"):
        cells = [
            mean_std([r["stage_top1"][stage] for r in rows if r["method"] == "isvit" and r["bits"] == b]) for b in bits
        ]
        lines.append(f"| `isvit` after {stage} | " + " | ".join(cells) + " |")
    times = []
    for b in bits:
        # paired by seed: the two runs of a seed were made one after the other, under about the same load
        seconds = {(r["method"], r["seed"]): r["seconds"] for r in rows if r["bits"] == b}
        pairs = [seconds[("isvit", s)] / seconds[("repq_vit", s)] for m, s in seconds if m == "isvit"
                 if seconds.get(("repq_vit", s))]  # fmt: skip
        ratio = benchlib.Timing(tuple(pairs))
        times.append(f"{ratio.median:.0f}× ({ratio.low:.0f}–{ratio.high:.0f}×)" if pairs else "—")
    lines.append("| `isvit` calibration time / `repq_vit`'s, median (range) over seeds | " + " | ".join(times) + " |")
    sizes = []
    for b in bits:
        found = [r["export_sizes"] for r in rows if r["method"] == "isvit" and r["bits"] == b and "export_sizes" in r]
        sizes.append(f"{found[0]['ratio_to_fp16']:.3f}" if found else "—")
    lines.append("| quantized weights / fp16 (export) | " + " | ".join(sizes) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 6, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iterations", type=int, default=None, help="isvit iterations (default: fast preset)")
    parser.add_argument("--lr", type=float, default=None, help="isvit learning rate (default: fast preset)")
    parser.add_argument("--json", type=benchlib.repo_path, default=benchlib.repo_path("isvit_bench.json"))
    benchlib.add_arguments(parser, clock="wall")
    args = parser.parse_args()
    run = benchlib.start(args)
    fp, _ = load_zoo_model(vit_digits.NAME, progress=False)
    test = parse_image_data_spec({"source": "digits", "split": "test", "noise": vit_digits.NOISE})
    calib = image_dataset(parse_image_data_spec({"source": "digits", "split": "train", "noise": vit_digits.NOISE}))
    rows = json.loads(args.json.read_text())["runs"] if args.json.is_file() else []
    done = {_row_key(r) for r in rows}
    fp_top1 = top1(fp, test)
    for seed in args.seeds:  # seed-major: an interrupted run still covers every bit-width
        for bits in args.bits:
            for method in args.methods:
                if (method, bits, seed) in done:
                    continue
                row = run_one(fp, method, bits, seed, args, calib, test)
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.json.write_text(json.dumps({"fp_top1": fp_top1, "args": vars(args) | {"json": str(args.json)},
                                                 "runs": rows}, indent=1) + "\n")  # fmt: skip
    print("\n".join(run.header()))
    print(summary(rows, fp_top1))


if __name__ == "__main__":
    main()
