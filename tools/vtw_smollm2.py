"""VTW on the zoo LLaVA with a pretrained decoder (``llava_smollm2_digits``, SmolLM2-135M): accuracy versus the
withdrawal layer K for every K, the search's two curves (mean KL and changed answers per K), the K each criterion
picks, FastV at the paper's setting, FLOPs ratios and measured prefill time ratios. Prints a Markdown table
(docs/results/vtw.md has the measured one) and writes every number to ``--json``.

Run:  PYTHONPATH=. python tools/vtw_smollm2.py [--questions 200] [--calibration 20] [--repeats 7] [--json out.json]
On a shared machine, split the accuracy rows over processes and merge (docs/results/vtw.md has the commands):
      ... --ks 0 1 2 --rows-only --json a.json;  ... --ks 3 4 --json b.json;  ... --merge a.json b.json
The zoo model is built on first use (see docs/zoo.md) and cached under $COMPRESSX_CACHE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import compressx
from compressx.hooks.flops import withdrawal_flops
from compressx.passes.vtw import first_under
from compressx.zoo import load_zoo_model
from compressx.zoo.llava_smollm2_digits import N_VIS, NAME, accuracy, calibration_prompts, prompt_ids, vqa_batches

PAPER_ETA = 0.003  # the official η for LLaVA-1.5-7B and every unlisted model (arXiv:2405.05803, official code)
LLAVA_DIGITS_ETA = 0.03  # the η of the llava_digits recipe (recipes/mllm/vtw_llava_digits.yaml)
SEARCH_START = 5  # the official first candidate, as in recipes/mllm/vtw.yaml


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """One prefill (the logits of the last position only, as ``generate()`` computes them)."""
    start = time.perf_counter()
    model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], logits_to_keep=1, use_cache=True)
    return time.perf_counter() - start


def timed_ratio(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: list[dict], repeats: int) -> dict:
    """Prefill time of the full model and of each step (applied and removed in turn), interleaved over
    ``repeats`` rounds; the medians and each round's ratios to the full model in the same round."""
    times: dict[str, list[float]] = {"full": [], **{s["label"]: [] for s in steps}}
    prefill_seconds(model, batch)  # warm-up
    for _ in range(repeats):
        times["full"].append(prefill_seconds(model, batch))
        for s in steps:
            handle = compressx.apply(model, [s["step"]], progress=False).steps[0].handle
            times[s["label"]].append(prefill_seconds(model, batch))
            handle.remove()
    out = {"median_seconds": {k: statistics.median(v) for k, v in times.items()}}
    out["ratio_per_round"] = {
        s["label"]: [round(t / f, 3) for t, f in zip(times[s["label"]], times["full"], strict=True)] for s in steps
    }
    out["ratio_of_medians"] = {s["label"]: out["median_seconds"][s["label"]] / out["median_seconds"]["full"]
                               for s in steps}  # fmt: skip
    return out


def measure(args: argparse.Namespace) -> dict:
    """The numbers of the parts asked for: the search, FastV and the timing (unless ``--rows-only``) and the
    accuracy rows of ``--ks``."""
    torch.set_num_threads(1)
    started = time.time()
    model, tok = load_zoo_model(NAME, progress=True)
    text_config = model.config.text_config
    n_layers = text_config.num_hidden_layers
    test = vqa_batches(tok, "test", args.questions, seed=0)
    n_text = len(prompt_ids(tok)) - N_VIS
    record: dict = {"questions": args.questions, "n_text": n_text, "n_vis": N_VIS, "n_layers": n_layers,
                    "torch": torch.__version__, "rows": []}  # fmt: skip
    record["full_accuracy"] = full = accuracy(model, test)
    print(f"full model: {100 * full:.1f}% on {args.questions} test questions", flush=True)
    ks = range(n_layers + 1) if args.ks is None else args.ks
    for k in ks:
        handle = compressx.apply(model, [{"pass": "vtw", "config": {"layer": k}}], progress=False).steps[0].handle
        acc = accuracy(model, test)
        handle.remove()
        flops = withdrawal_flops(text_config, n_text, N_VIS, 0, k)
        record["rows"].append({"k": k, "accuracy": acc, "prefill_ratio": flops["prefill_ratio"],
                               "decode_ratio": flops["decode_ratio"]})  # fmt: skip
        print(f"K={k}: {100 * acc:.1f}%", flush=True)
    if args.rows_only:
        return record

    # One search over every K from 0 gives both curves; each criterion then reads its own (from SEARCH_START).
    calib = calibration_prompts(tok, "val", args.calibration, seed=0)
    step = compressx.apply(
        model, [{"pass": "vtw", "config": {"layer": "auto", "search_start": 0}}], calib, progress=True
    ).steps[0]
    step.handle.remove()
    mean_kl = {int(d): kl for d, kl in step.report["kl_per_layer"].items()}
    changed = {int(d): n for d, n in step.report["changed_per_layer"].items()}
    searched = {d: v for d, v in mean_kl.items() if d >= SEARCH_START}
    searched_changed = {d: v for d, v in changed.items() if d >= SEARCH_START}
    chosen = {
        f"η={PAPER_ETA:g} (paper)": first_under(searched, PAPER_ETA, n_layers),
        f"η={LLAVA_DIGITS_ETA:g} (llava_digits recipe)": first_under(searched, LLAVA_DIGITS_ETA, n_layers),
        "max_changed_answers=0": first_under(searched_changed, 0, n_layers),
    }
    print(f"chosen: {chosen}", flush=True)
    record.update(calibration=len(calib), mean_kl=mean_kl, changed=changed, chosen=chosen, search_start=SEARCH_START)

    handle = compressx.apply(model, [{"pass": "fastv", "config": {"layer": 2, "ratio": 0.5}}], progress=False)
    fastv_acc = accuracy(model, test)
    handle.steps[0].handle.remove()
    record["fastv"] = {"accuracy": fastv_acc, **withdrawal_flops(text_config, n_text, N_VIS, N_VIS - N_VIS // 2, 2)}

    timed_k = sorted({k for k in chosen.values() if k < n_layers})
    timing_batch = vqa_batches(tok, "test", args.timing_batch, seed=99, batch_size=args.timing_batch)[0]
    steps = [{"label": f"vtw K={k}", "step": {"pass": "vtw", "config": {"layer": k}}} for k in timed_k]
    steps.append({"label": "fastv K=2 R=50%", "step": {"pass": "fastv", "config": {"layer": 2, "ratio": 0.5}}})
    record["timing"] = timed_ratio(model, timing_batch, steps, args.repeats)
    record["timing"].update(batch=args.timing_batch, repeats=args.repeats)
    record["seconds"] = round(time.time() - started)
    record["load_average"] = os.getloadavg()[0]
    return record


def merge(records: list[dict]) -> dict:
    """One record from the parts of several runs (rows from all, the rest from the run that has it)."""
    out = {k: v for r in records for k, v in r.items() if k != "rows"}
    out["rows"] = sorted({r["k"]: r for rec in records for r in rec["rows"]}.values(), key=lambda r: r["k"])
    fulls = {r["full_accuracy"] for r in records}
    if len(fulls) != 1:
        raise SystemExit(f"the parts disagree on the full model's accuracy: {fulls}")
    return out


def table(record: dict) -> None:
    full, n_layers = record["full_accuracy"], record["n_layers"]
    mean_kl = {int(k): v for k, v in record["mean_kl"].items()}
    changed = {int(k): v for k, v in record["changed"].items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {record['torch']}, 1 thread")
    print(f"prompt: {record['n_text']} text + {record['n_vis']} vision tokens; {record['questions']} test questions; "
          f"{record['calibration']} calibration prompts; full-model accuracy {100 * full:.1f}%; "
          f"{n_layers} layers")  # fmt: skip
    chosen = record["chosen"]
    print(
        f"K chosen (candidates from {record['search_start']}): " + ", ".join(f"{c} → K={k}" for c, k in chosen.items())
    )
    print(f"\n| K | mean KL (search) | answers changed (of {record['calibration']}) | accuracy % | Δ vs full | "
          "prefill FLOPs | decode FLOPs | chosen by |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        k = r["k"]
        marks = ", ".join(f"**{c}**" for c, chosen_k in chosen.items() if chosen_k == k)
        kl = f"{mean_kl[k]:.4g}" if k in mean_kl else "—"
        label = f"{k} (off)" if k == n_layers else str(k)
        print(f"| {label} | {kl} | {changed.get(k, '—')} | {100 * r['accuracy']:.1f} | "
              f"{100 * (r['accuracy'] - full):+.1f} | {r['prefill_ratio']:.3f} | {r['decode_ratio']:.3f} | "
              f"{marks} |")  # fmt: skip
    fastv = record["fastv"]
    print(f"| fastv K=2 R=50% | — | — | {100 * fastv['accuracy']:.1f} | {100 * (fastv['accuracy'] - full):+.1f} | "
          f"{fastv['prefill_ratio']:.3f} | {fastv['decode_ratio']:.3f} | |")  # fmt: skip
    timing = record["timing"]
    print(f"\nmeasured prefill time ({timing['batch']} prompts per prefill, {timing['repeats']} interleaved rounds, "
          f"median full {timing['median_seconds']['full']:.3f} s):")  # fmt: skip
    for label, ratio in timing["ratio_of_medians"].items():
        print(f"- {label}: {timing['median_seconds'][label]:.3f} s, ratio of medians {ratio:.3f}; "
              f"per round {timing['ratio_per_round'][label]}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200, help="test questions ('Which digit is this?')")
    parser.add_argument("--calibration", type=int, default=20, help="calibration prompts of the search (val split)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the prefill timing")
    parser.add_argument("--timing-batch", type=int, default=16, help="prompts per timed prefill")
    parser.add_argument("--ks", type=int, nargs="+", help="only these K rows (default: every K from 0 to L)")
    parser.add_argument("--rows-only", action="store_true", help="only the accuracy rows: no search, FastV, timing")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of these parts' JSON files")
    args = parser.parse_args()
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(json.load(f))
        record = merge(parts)
    else:
        record = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if "timing" in record:
        table(record)


if __name__ == "__main__":
    main()
