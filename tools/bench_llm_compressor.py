"""Benchmark: compressx's wanda/sparsegpt beside llm-compressor's WandaPruningModifier/SparseGPTModifier.

Same model (the zoo's ``smollm2_135m``, read by both sides from the zoo cache directory with
``from_pretrained``), same calibration token ids and held-out token ids (written once to a safetensors file that
both sides read), same sparsity, one thread each. Every run is a fresh subprocess (``--worker``) so its peak RSS
is its own; runs are interleaved (compressx, llm-compressor, compressx, ...) so that a change in the shared
machine's load hits both sides alike. Measured in the worker around the pruning call only: CPU time (user + sys
of the process), wall time, and peak RSS (``ru_maxrss`` read right after pruning, so it covers loading and
pruning but not the evaluation); then the perplexity of the pruned model on the held-out windows (the same
code on both sides) and the sparsity of the decoder Linears.

llm-compressor (PyPI ``llmcompressor``) is never a dependency of compressx: it runs in its own virtualenv, given
by ``--llmc-python`` (or ``$LLMC_PYTHON``); without one, its column is skipped with a message. The compressx
side runs with ``--cx-python`` (default: this interpreter), with this checkout on ``PYTHONPATH``.

Run (one thread per run; at 16 calibration windows a run costs ~35 s of CPU for Wanda and ~75 s for SparseGPT,
plus loading and evaluation; results and commands in docs/results/llm_pruning.md):
    OMP_NUM_THREADS=1 python tools/bench_llm_compressor.py --llmc-python /work/venv-llmc/bin/python --same-torch \
        --repeats 3 --calib-samples 16 --eval-samples 8 --jobs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = {"50%": (0.5, None), "60%": (0.6, None), "70%": (0.7, None), "2:4": (0.5, (2, 4)), "4:8": (0.5, (4, 8))}


# ----------------------------------------------------------------------------------------------- worker side
def _cpu_seconds() -> float:
    # children too: a library that tokenizes or maps data in worker processes spends its CPU there
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _perplexity(model, tokens, batch_size: int = 8) -> float:
    import math

    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]
            logits = model(input_ids=batch).logits.float()
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


DECODER = ["re:.*layers\\.\\d+\\..*"]


def compressx_step(method: str, sparsity: float, nm, batch_size: int) -> dict | None:
    """The compressx step of a method name: ``magnitude`` (per layer), ``wanda``, ``sparsegpt``,
    ``dsnot-<init>`` (DSnoT at its defaults on the ``init`` mask) and ``dsnot0-<init>`` (the same code with 0
    cycles: DSnoT's matched initial mask, same per-row grouping); ``dense`` is no step."""
    pattern = {"pattern": f"{nm[0]}:{nm[1]}"} if nm else {"sparsity": sparsity}
    if method == "dense":
        return None
    if method == "magnitude":
        return {"pass": "magnitude", "config": pattern, "targets": DECODER}
    if method in ("wanda", "sparsegpt"):
        return {"pass": method, "config": dict(pattern, batch_size=batch_size)}
    kind, init = method.split("-")
    cycles = {"max_cycles": 0} if kind == "dsnot0" else {}
    return {"pass": "dsnot", "config": dict(pattern, init=init, batch_size=batch_size, **cycles)}


def _prune_compressx(model, calib, method: str, sparsity: float, nm, batch_size: int) -> dict:
    import compressx

    step = compressx_step(method, sparsity, nm, batch_size)
    if step is None:
        return {}
    report = compressx.apply(model, [step], data=calib, progress=False).steps[0].report
    refined = report.get("refinement", {})
    return {
        "expected_error_reduction": report.get("expected_error_reduction"),
        "refined_lower": sum(r["mean_abs_error_after"] < r["mean_abs_error_before"] for r in refined.values()),
        "refined": len(refined),
    }


def _prune_llmcompressor(model, calib, method: str, sparsity: float, nm, batch_size: int) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    structure = f"{nm[0]}:{nm[1]}" if nm else "0:0"
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = modifier(
        sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )  # its documented usage; lm_head is tied to the embeddings here
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * len(calib)})
    oneshot(
        model=model, dataset=dataset, recipe=[recipe], num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], batch_size=batch_size, pipeline="sequential", shuffle_calibration_samples=False,
    )  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokens = load_file(args.tokens)
    sparsity, nm = PATTERNS[args.pattern]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    rss_loaded = _peak_rss_mib()
    prune = _prune_compressx if args.side == "compressx" else _prune_llmcompressor
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    info = prune(model, tokens["calib"], args.method, sparsity, nm, args.batch_size)
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    peak = _peak_rss_mib()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    result = {
        "side": args.side, "method": args.method, "pattern": args.pattern, "cpu_s": cpu, "wall_s": wall,
        "peak_rss_mib": peak, "rss_after_load_mib": rss_loaded, "sparsity": zeros / total,
        "ppl": {name[len("heldout_"):]: _perplexity(model, t) for name, t in tokens.items()
                if name.startswith("heldout_")},
        "torch": torch.__version__, "threads": torch.get_num_threads(), **(info or {}),
    }  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- driver side
def write_tokens(path: Path, calib_samples: int, seq_len: int, eval_samples: int, seed: int) -> Path:
    """The calibration windows (pydoc_text train) and held-out windows (pydoc_text and stdlib source test), and
    the zoo cache directory of smollm2_135m (built if missing)."""
    import torch
    from safetensors.torch import save_file

    from compressx.data import DataSpec, load_tokens
    from compressx.zoo import load_zoo_model

    _, tokenizer = load_zoo_model("smollm2_135m")
    tokens = {
        "calib": load_tokens(
            DataSpec("pydoc_text", split="train", samples=calib_samples, seq_len=seq_len, seed=seed), tokenizer
        ),  # fmt: skip
        "heldout_prose": load_tokens(
            DataSpec("pydoc_text", split="test", samples=eval_samples, seq_len=seq_len), tokenizer
        ),  # fmt: skip
        "heldout_source": load_tokens(
            DataSpec("stdlib_text", split="test", samples=eval_samples, seq_len=seq_len), tokenizer
        ),  # fmt: skip
    }
    save_file({k: v.to(torch.int64).contiguous() for k, v in tokens.items()}, str(path))
    return zoo_dir()


def zoo_dir() -> Path:
    """Where the zoo cached smollm2_135m's weights and tokenizer (an ordinary ``from_pretrained`` directory)."""
    from compressx.zoo import cache_dir, get_member

    return cache_dir(get_member("smollm2_135m"))


def run_one(python: str, side: str, method: str, pattern: str, model: Path, tokens: Path, batch_size: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if side.startswith("compressx"):
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--side", side.split("@")[0], "--method", method,
           "--pattern", pattern, "--model", str(model), "--tokens", str(tokens),
           "--batch-size", str(batch_size)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {method} {pattern} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _summary(values: list[float], fmt: str = "{:.1f}") -> str:
    med = fmt.format(statistics.median(values))
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["compressx", "llmcompressor"])
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="50%")
    parser.add_argument("--model")
    parser.add_argument("--tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON"))
    parser.add_argument("--cx-python", default=sys.executable)
    parser.add_argument(
        "--same-torch", action="store_true",
        help="also run compressx with the llm-compressor virtualenv's python (same torch and transformers builds)",
    )  # fmt: skip
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="50%,2:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (2: both sides of a setting together)")
    parser.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sides = ["compressx"]
    if args.llmc_python and Path(args.llmc_python).exists():
        sides += ["compressx@llmc-venv"] if args.same_torch else []
        sides.append("llmcompressor")
    else:
        print("llm-compressor column skipped: no --llmc-python / $LLMC_PYTHON (a virtualenv with PyPI llmcompressor)")
    work = Path(tempfile.mkdtemp(prefix="bench-llmc-"))
    tokens = work / "tokens.safetensors"
    model = write_tokens(tokens, args.calib_samples, args.seq_len, args.eval_samples, args.seed)
    python = {"compressx": args.cx_python, "compressx@llmc-venv": args.llmc_python, "llmcompressor": args.llmc_python}
    tasks = []
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                for side in sides if repeat % 2 == 0 else sides[::-1]:  # alternate who goes first
                    tasks.append((repeat, side, method, pattern))

    def run(task):
        repeat, side, method, pattern = task
        r = run_one(python[side], side, method, pattern, model, tokens, args.batch_size)
        r["side"], r["repeat"] = side, repeat
        print(json.dumps(r), flush=True)
        return r

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results: list[dict] = list(pool.map(run, tasks))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    load = os.getloadavg()
    lines = [
        f"Machine: {platform.machine()} ({platform.processor() or 'unknown cpu'}), {os.cpu_count()} cores, one thread "
        f"per run, load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. "
        + "; ".join(f"{s}: torch {next(r['torch'] for r in results if r['side'] == s)}" for s in sides)
        + f". Calibration: {args.calib_samples} pydoc_text train windows x {args.seq_len} tokens (seed {args.seed}), "
        f"batch size {args.batch_size}; perplexity on {args.eval_samples} held-out windows of prose (pydoc_text "
        f"test) and of stdlib source (stdlib_text test). {args.repeats} interleaved repeats"
        f"{f', {args.jobs} runs at a time' if args.jobs > 1 else ''}; median (min–max).",
        "",
        "| method | pattern | side | CPU s | wall s | peak RSS MiB | sparsity | ppl prose | ppl source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            for side in sides:
                rs = [r for r in results if (r["side"], r["method"], r["pattern"]) == (side, method, pattern)]
                lines.append(
                    f"| {method} | {pattern} | {side} | {_summary([r['cpu_s'] for r in rs])} | "
                    f"{_summary([r['wall_s'] for r in rs])} | {_summary([r['peak_rss_mib'] for r in rs], '{:.0f}')} | "
                    f"{rs[0]['sparsity']:.4f} | {_summary([r['ppl']['prose'] for r in rs], '{:.3f}')} | "
                    f"{_summary([r['ppl']['source'] for r in rs], '{:.3f}')} |"
                )
            for cx in [s for s in sides if s.startswith("compressx")] if "llmcompressor" in sides else []:

                def med(side, key, method=method, pattern=pattern):
                    return statistics.median(
                        r[key] for r in results if (r["side"], r["method"], r["pattern"]) == (side, method, pattern)
                    )

                lines.append(
                    f"| {method} | {pattern} | **ratio {cx} / llmcompressor** | "
                    f"{med(cx, 'cpu_s') / med('llmcompressor', 'cpu_s'):.2f}x | "
                    f"{med(cx, 'wall_s') / med('llmcompressor', 'wall_s'):.2f}x | "
                    f"{med(cx, 'peak_rss_mib') / med('llmcompressor', 'peak_rss_mib'):.2f}x | | | |"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(f"raw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
