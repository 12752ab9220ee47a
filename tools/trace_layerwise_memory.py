"""Diagnostic: resident memory at the start of each decoder layer's pruning, next to the tensors alive.

Companion of tools/bench_offload_memory.py (same random ~100M-parameter Llama): loads it with its decoder
layers on disk (or in memory) and prunes it with Wanda; when each layer's pruning starts it prints the
process's anonymous and file-backed resident memory (``/proc/self/status``) above the loaded model, and the
bytes of the CPU tensors still referenced from Python (counted through ``gc``; the scan itself allocates
Python objects between tensors, as a larger program would). At the end, the same and the peaks. Live tensors
flat while anonymous memory climbs means the allocator, not compressx, holds the memory.

Linux only. Run:  python tools/trace_layerwise_memory.py [--mode disk|memory]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time

import torch

from compressx.layerwise import LayerwiseCalibration
from compressx.memory import live_cpu_tensor_bytes


def rss_mib() -> tuple[float, float]:
    """Anonymous and file-backed resident memory of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out["RssAnon"], out["RssFile"]


def live_tensor_mib() -> float:
    return live_cpu_tensor_bytes() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("disk", "memory"), default="disk")
    args = parser.parse_args()
    import transformers
    from bench_offload_memory import CONFIG, SAMPLES, SEQ_LEN  # tools/ is on the path when run as a script

    import compressx.passes.wanda as wanda

    torch.set_num_threads(1)
    peak = [0.0, 0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, file = rss_mib()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], file)
            time.sleep(0.002)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(f"{tmp}/ckpt")
        gc.collect()
        if args.mode == "memory":
            model = transformers.LlamaForCausalLM.from_pretrained(f"{tmp}/ckpt", use_safetensors=True)
        else:
            device_map = {
                "model.embed_tokens": "cpu",
                "model.norm": "cpu",
                "model.rotary_emb": "cpu",
                "lm_head": "cpu",
            }
            device_map.update({f"model.layers.{i}": "disk" for i in range(CONFIG["num_hidden_layers"])})
            model = transformers.LlamaForCausalLM.from_pretrained(
                f"{tmp}/ckpt", device_map=device_map, offload_folder=f"{tmp}/offload", use_safetensors=True
            )
        loaded = rss_mib()
        peak[:] = loaded
        threading.Thread(target=sample, daemon=True).start()
        print(f"loaded: anon {loaded[0]:.0f} MiB, file {loaded[1]:.0f} MiB, live tensors {live_tensor_mib():.0f} MiB")
        print("layer | anon above loaded | file above loaded | live tensors (MiB), at the start of its pruning")

        class Traced(LayerwiseCalibration):
            def __iter__(self):
                for layer in super().__iter__():
                    anon, file = rss_mib()
                    print(
                        f"{layer.index} | {anon - loaded[0]:.0f} | {file - loaded[1]:.0f} | {live_tensor_mib():.0f}",
                        flush=True,
                    )
                    yield layer

        calibrate_layers = wanda.calibrate_layers
        wanda.calibrate_layers = Traced
        tokens = torch.randint(0, 256, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        step = {"pass": "wanda", "config": {"sparsity": 0.5, "batch_size": 4}}
        import compressx

        compressx.apply(model, [step], data=tokens, progress=False)
        wanda.calibrate_layers = calibrate_layers
        done.set()
        after = rss_mib()
        print(
            f"after: anon {after[0] - loaded[0]:.0f}, file {after[1] - loaded[1]:.0f}, live tensors "
            f"{live_tensor_mib():.0f} MiB; peaks above loaded: anon {peak[0] - loaded[0]:.0f}, "
            f"file {peak[1] - loaded[1]:.0f} MiB"
        )


if __name__ == "__main__":
    main()
