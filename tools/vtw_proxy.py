"""VTW on the zoo LLaVA (``llava_digits``): answer accuracy versus the withdrawal layer K, the K the KL search
picks, and FastV for comparison. Writes a Markdown table (docs/results/vtw.md has the measured one).

Run:  PYTHONPATH=. python tools/vtw_proxy.py [--questions 1000] [--calibration 20] [--thresholds 0.003 0.03]
The zoo model is built on first use (about two minutes on 2 cores) and cached under $COMPRESSX_CACHE.
"""

from __future__ import annotations

import argparse
import platform

import torch

import compressx
from compressx.hooks.flops import withdrawal_flops
from compressx.passes.vtw import first_under
from compressx.zoo import load_zoo_model
from compressx.zoo.llava_digits import N_VIS, TASKS, accuracy, calibration_prompts, prompt_ids, vqa_batches


def flops_ratios(text_config, layer: int, dropped: float = 1.0) -> tuple[float, float]:
    """Prefill and decode FLOPs ratios when ``dropped`` of the vision tokens leave at ``layer``, summed over the
    four question kinds' prompts."""
    totals = [0, 0, 0, 0]
    for task in TASKS:
        n_vis = N_VIS * (2 if task in ("larger", "equal") else 1)
        kept = n_vis - int(dropped * n_vis)
        f = withdrawal_flops(text_config, len(prompt_ids(task)) - n_vis, n_vis, kept, layer)
        for i, key in enumerate(("prefill_flops", "prefill_flops_full", "decode_flops_per_token")):
            totals[i] += f[key]
        totals[3] += f["decode_flops_per_token_full"]
    return totals[0] / totals[1], totals[2] / totals[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1000, help="test questions (equal parts of 4 kinds)")
    parser.add_argument("--calibration", type=int, default=20, help="calibration prompts for the KL search")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.003, 0.03], help="η values of the KL search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_zoo_model("llava_digits", progress=False)
    n_layers = model.config.text_config.num_hidden_layers
    test = vqa_batches("test", args.questions // len(TASKS), seed=0)
    calib = calibration_prompts("val", args.calibration, seed=0)
    full = accuracy(model, test)

    search = compressx.apply(
        model,
        [{"pass": "vtw", "config": {"layer": "auto", "threshold": args.thresholds[0], "search_start": 1}}],
        calib,
        progress=False,
    ).steps[0]
    search.handle.remove()
    mean_kl = {int(d): kl for d, kl in search.report["kl_per_layer"].items()}
    chosen = {eta: first_under(mean_kl, eta, n_layers) for eta in args.thresholds}  # the KL does not depend on η

    rows = []
    for k in range(n_layers + 1):
        step = compressx.apply(model, [{"pass": "vtw", "config": {"layer": k}}], progress=False).steps[0]
        acc = accuracy(model, test)
        step.handle.remove()
        kl = search.report["kl_per_layer"].get(str(k))
        changed = search.report["changed_per_layer"].get(str(k))
        etas = [f"η={eta:g}" for eta, layer in chosen.items() if layer == k]
        mark = f" **(KL search, {', '.join(etas)})**" if etas else ""
        prefill, decode = flops_ratios(model.config.text_config, k)
        rows.append(
            f"| vtw K={k}{mark} | {kl if kl is not None else '—'} | {changed if changed is not None else '—'} | "
            f"{100 * acc:.1f} | {100 * (acc - full):+.1f} | "
            f"{prefill:.3f} | {decode:.3f} |"
        )
    fastv = compressx.apply(model, [{"pass": "fastv", "config": {"layer": 2, "ratio": 0.5}}], progress=False).steps[0]
    acc = accuracy(model, test)
    fastv.handle.remove()
    prefill, decode = flops_ratios(model.config.text_config, 2, dropped=0.5)
    delta = 100 * (acc - full)
    rows.append(f"| fastv K=2 R=50% | — | — | {100 * acc:.1f} | {delta:+.1f} | {prefill:.3f} | {decode:.3f} |")

    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread")
    questions = sum(len(b["answers"]) for b in test)
    picks = ", ".join(f"η={eta:g} → K={layer}" for eta, layer in chosen.items())
    print(f"test questions: {questions}; calibration prompts: {len(calib)}; {picks} (of {n_layers} layers); "
          f"full-model accuracy {100 * full:.1f}%")  # fmt: skip
    print(f"\n| setting | mean KL (search) | answers changed (of {len(calib)}) | accuracy % | Δ vs full | "
          "prefill FLOPs ratio | decode FLOPs ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| full model | — | — | {100 * full:.1f} | — | 1.000 | 1.000 |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
