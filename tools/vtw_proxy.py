"""VTW on the zoo LLaVA (``llava_digits``): answer accuracy versus the withdrawal layer K, the K the KL search
picks, and FastV for comparison. Writes a Markdown table (docs/results/vtw.md has the measured one).

Run:  PYTHONPATH=. python tools/vtw_proxy.py [--questions 1000] [--calibration 20] [--threshold 0.003]
The zoo model is built on first use (about two minutes on 2 cores) and cached under $COMPRESSX_CACHE.
"""

from __future__ import annotations

import argparse
import platform

import torch

import compressx
from compressx.zoo import load_zoo_model
from compressx.zoo.llava_digits import TASKS, accuracy, calibration_prompts, vqa_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1000, help="test questions (equal parts of 4 kinds)")
    parser.add_argument("--calibration", type=int, default=20, help="calibration prompts for the KL search")
    parser.add_argument("--threshold", type=float, default=0.003, help="η of the KL search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_zoo_model("llava_digits", progress=False)
    n_layers = model.config.text_config.num_hidden_layers
    test = vqa_batches("test", args.questions // len(TASKS), seed=0)
    calib = calibration_prompts("val", args.calibration, seed=0)
    full = accuracy(model, test)

    search = compressx.apply(
        model,
        [{"pass": "vtw", "config": {"layer": "auto", "threshold": args.threshold, "search_start": 1}}],
        calib,
        progress=False,
    ).steps[0]
    chosen = search.report["layer"]
    search.handle.remove()

    rows = []
    for k in range(n_layers + 1):
        step = compressx.apply(model, [{"pass": "vtw", "config": {"layer": k}}], progress=False).steps[0]
        acc = accuracy(model, test)
        step.handle.remove()
        kl = search.report["kl_per_layer"].get(str(k))
        mark = " **(KL search)**" if k == chosen else ""
        rows.append(
            f"| vtw K={k}{mark} | {kl if kl is not None else '—'} | {100 * acc:.1f} | {100 * (acc - full):+.1f} | "
            f"{step.report['flops']['prefill_ratio']:.3f} | {step.report['flops']['decode_ratio']:.3f} |"
        )
    fastv = compressx.apply(model, [{"pass": "fastv", "config": {"layer": 2, "ratio": 0.5}}], progress=False).steps[0]
    acc = accuracy(model, test)
    fastv.handle.remove()
    rows.append(
        f"| fastv K=2 R=50% | — | {100 * acc:.1f} | {100 * (acc - full):+.1f} | "
        f"{fastv.report['flops']['prefill_ratio']:.3f} | {fastv.report['flops']['decode_ratio']:.3f} |"
    )

    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread")
    questions = sum(len(b["answers"]) for b in test)
    print(f"test questions: {questions}; calibration prompts: {len(calib)}; η = {args.threshold}; "
          f"chosen K = {chosen} of {n_layers}; full-model accuracy {100 * full:.1f}%")  # fmt: skip
    print("\n| setting | mean KL (search) | accuracy % | Δ vs full | prefill FLOPs ratio | decode FLOPs ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| full model | — | {100 * full:.1f} | — | 1.000 | 1.000 |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
