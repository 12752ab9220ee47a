"""Benchmark: peak memory of layer-by-layer pruning, model in memory vs decoder layers offloaded to disk.

A random Llama checkpoint (hidden 1024, 8 layers, ~100M parameters, fp32) is written once; then, each in a
fresh process, it is loaded either fully into memory or with every decoder layer on disk (transformers
``device_map`` + ``offload_folder``) and pruned (Wanda, SparseGPT, DSnoT; 50%) on random calibration tokens.

What is measured: each process samples ``/proc/self/status`` every 2 ms and reports, for the pruning phase, the
peak of its *anonymous* resident memory (``RssAnon``: heap and tensor memory) above the level it had once the
model was loaded, and the peak of its *file-backed* resident memory (``RssFile``: pages of the safetensors
checkpoint and of the offload ``.dat`` files the process maps; the OS can drop them) above that level,
separately. Total RSS mixes the two and is dominated by them (``from_pretrained`` maps the checkpoint), which
is why the first version of this benchmark could not be compared with the formula.

Each disk-offloaded configuration also runs with glibc's mmap threshold fixed at 1 MiB
(``MALLOC_MMAP_THRESHOLD_=1048576``): then every tensor of 1 MiB or more gets its own mapping that is unmapped
when freed, so the peak is the tensors' working set without the allocator's retained heap. The default
allocator run is what a user gets.

The formula (docs/passes/wanda.md, "Memory") is evaluated next to the measurements.

Linux only (reads /proc). Run:  python tools/bench_offload_memory.py [--out docs/results/offload_memory.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

CONFIG = dict(
    vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=512,
)  # fmt: skip
SAMPLES, SEQ_LEN, BATCH = 16, 256, 4
REPEATS = 2
PASSES = ("wanda", "sparsegpt", "dsnot")
DEFAULT_PASSES = ("wanda", "sparsegpt")  # DSnoT takes ~1 min a run here: --passes dsnot
MODES = (("memory", False), ("disk", False), ("disk", True))  # (where the decoder layers are, fixed mmap threshold)

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch, transformers
    torch.set_num_threads(1)
    import compressx

    def rss():  # MiB of anonymous and file-backed resident memory
        out = {{}}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
        return out["RssAnon"], out["RssFile"]

    peak = list(rss())
    done = threading.Event()
    def sample():  # the maxima over the phase
        while not done.is_set():
            anon, file = rss()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], file)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    imported = rss()
    ckpt, mode, offload, pass_name = sys.argv[1:5]
    if mode == "memory":
        model = transformers.LlamaForCausalLM.from_pretrained(ckpt, use_safetensors=True)
    else:
        device_map = {{"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}}
        device_map.update({{f"model.layers.{{i}}": "disk" for i in range({LAYERS})}})
        model = transformers.LlamaForCausalLM.from_pretrained(
            ckpt, device_map=device_map, offload_folder=offload, use_safetensors=True
        )
    loaded = rss()
    peak[0], peak[1] = loaded  # from here on, the peak of the pruning phase
    tokens = torch.randint(0, 256, ({SAMPLES}, {SEQ_LEN}), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    result = compressx.apply(model, [{{"pass": pass_name, "config": {{"sparsity": 0.5, "batch_size": {BATCH}}}}}],
                             data=tokens, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    time.sleep(0.01)
    after = rss()
    print(json.dumps({{
        "load_anon": loaded[0] - imported[0], "load_file": loaded[1] - imported[1],
        "peak_anon": peak[0] - loaded[0], "peak_file": peak[1] - loaded[1], "after_anon": after[0] - loaded[0],
        "seconds": seconds, "sparsity": result.steps[0].report["sparsity"],
    }}))
    """
)


def estimate_mib(pass_name: str, layer_params: int) -> dict[str, float]:
    """The terms of the peak-memory formula (docs/passes/wanda.md) for this benchmark's model, in MiB."""
    hidden, inter, heads = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_attention_heads"]
    linear_inputs = [hidden] * 6 + [inter]  # q, k, v, o, gate, up take hidden; down takes intermediate
    largest = hidden * inter  # elements of the largest Linear (gate, up, down)
    terms = {
        "layer": layer_params * 4,
        "activations": 2 * SAMPLES * SEQ_LEN * hidden * 4,
        "statistics": sum(3 * c * 8 for c in linear_inputs),
    }
    if pass_name == "sparsegpt":  # DSnoT starts from Wanda by default: no Hessian
        terms["statistics"] += sum(c * c * 8 for c in linear_inputs)
    # transient, the larger of: one micro-batch's forward (q, k, v, attention output, MLP gate/up/product,
    # attention scores) and the pruning of the largest Linear
    forward = BATCH * SEQ_LEN * (4 * hidden + 3 * inter + heads * SEQ_LEN) * 4
    if pass_name == "wanda":  # scores (fp32), their sort (fp32 values + int64 indices)
        prune = 16 * largest
    elif pass_name == "sparsegpt":  # fp32 weight copy + the float64 Hessian copy, its Cholesky factor and inverse
        prune = 4 * largest + 3 * max(linear_inputs) ** 2 * 8
    else:  # DSnoT's refinement: about 4 fp32 and 4 int64 (orderings) weight-sized tensors
        prune = 48 * largest
    terms["transient"] = max(forward, prune)
    return {k: v / 2**20 for k, v in terms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/offload_memory.md")
    parser.add_argument("--passes", nargs="+", default=list(DEFAULT_PASSES), choices=PASSES)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    import torch
    import transformers

    runs: dict[tuple[str, str, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
        params = sum(p.numel() for p in model.parameters())
        layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
        model.save_pretrained(f"{tmp}/ckpt")
        del model
        child = CHILD.format(LAYERS=CONFIG["num_hidden_layers"], SAMPLES=SAMPLES, SEQ_LEN=SEQ_LEN, BATCH=BATCH)
        for repeat in range(args.repeats):  # interleaved: the page cache varies between runs
            for pass_name in args.passes:
                for mode, fixed in MODES:
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576") if fixed else os.environ
                    offload = f"{tmp}/offload-{pass_name}-{mode}-{fixed}-{repeat}"
                    out = subprocess.run(
                        [sys.executable, "-c", child, f"{tmp}/ckpt", mode, offload, pass_name],
                        capture_output=True, text=True, check=True, env=env,
                    )  # fmt: skip
                    runs.setdefault((pass_name, mode, fixed), []).append(json.loads(out.stdout.splitlines()[-1]))
                    print(pass_name, mode, fixed, runs[pass_name, mode, fixed][-1], flush=True)
    write_report(args, runs, params, layer_params, torch.__version__, transformers.__version__)


def write_report(args, runs, params: int, layer_params: int, torch_version: str, tf_version: str) -> None:
    hidden = CONFIG["hidden_size"]
    command = "python tools/bench_offload_memory.py"
    command += f" --passes {' '.join(args.passes)}" if tuple(args.passes) != DEFAULT_PASSES else ""
    command += f" --repeats {args.repeats}" if args.repeats != REPEATS else ""
    lines = [
        "# Peak memory: layer-by-layer pruning with the model in memory vs offloaded to disk",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} Linux, {os.cpu_count()} CPU cores (shared), torch {torch_version}, "
        f"transformers {tf_version}, CPU only (the compute device is the CPU, so it is resident memory that counts).",
        "",
        f"Model: random `LlamaForCausalLM`, hidden {hidden}, {CONFIG['num_hidden_layers']} layers, "
        f"{params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB fp32; one decoder layer "
        f"{layer_params * 4 / 2**20:.0f} MiB). 50% sparsity, {SAMPLES} x {SEQ_LEN} calibration tokens, batch "
        f"{BATCH}. Each configuration ran {args.repeats} time(s), interleaved, each in a fresh process; cells give "
        "min–max over the runs.",
        "",
        "Columns (MiB): *anon peak* — peak anonymous resident memory (`RssAnon`: heap and tensors) during pruning "
        "above its level once the model was loaded; *anon after* — the same level after pruning; *file peak* — peak "
        "file-backed resident memory (`RssFile`: mapped checkpoint and offload pages, reclaimable by the OS) above "
        "its loaded level; *load* — anonymous + file-backed memory that loading the model added (not part of the "
        "pruning peak). *formula* — the estimate of docs/passes/wanda.md: one layer + activations + statistics "
        "+ transient (largest of one micro-batch's forward and the pruning of the largest Linear); with the model in "
        "memory, add the model.",
        "",
        "| pass | decoder layers | allocator | load (anon + file) | anon peak | anon after | file peak | formula "
        "| time (s) | sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def span(values: list[float], fmt: str = ".0f") -> str:
        low, high = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
        return low if low == high else f"{low}–{high}"

    for (pass_name, mode, fixed), rs in runs.items():
        terms = estimate_mib(pass_name, layer_params)
        lines.append(
            f"| {pass_name} | {'in memory' if mode == 'memory' else 'on disk'} | "
            f"{'mmap threshold 1 MiB' if fixed else 'glibc default'} | "
            f"{span([r['load_anon'] for r in rs])} + {span([r['load_file'] for r in rs])} | "
            f"{span([r['peak_anon'] for r in rs])} | {span([r['after_anon'] for r in rs])} | "
            f"{span([r['peak_file'] for r in rs])} | {sum(terms.values()):.0f} | "
            f"{span([r['seconds'] for r in rs], '.1f')} | {rs[0]['sparsity']:.3f} |"
        )
    lines += ["", "Formula terms (MiB):", ""]
    for pass_name in args.passes:
        terms = estimate_mib(pass_name, layer_params)
        lines.append(
            f"- {pass_name}: " + " + ".join(f"{k} {v:.0f}" for k, v in terms.items()) + f" = {sum(terms.values()):.0f}"
        )
    lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
