"""Benchmark: one ``llama_byte_1m`` training step with 1 and with 2 torch threads (see docs/results/zoo_build.md).

Run it on a machine whose other cores are busy to see why zoo builds use one thread (``compressx/threads.py``):
the steps are those of the build (batch 16 x 256, forward + backward + AdamW), timed at 1, 2, 1, 2 threads.

Run:  python tools/bench_threads.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from compressx.zoo import llama_byte


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (the first is dropped)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    train_ids, _ = llama_byte._data()
    hp = llama_byte.TRAINING
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        model = llama_byte._init(hp["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        gen = torch.Generator().manual_seed(hp["seed"])
        times = []
        for _ in range(args.steps):
            starts = torch.randint(0, train_ids.numel() - hp["seq_len"], (hp["batch"],), generator=gen)
            batch = torch.stack([train_ids[s : s + hp["seq_len"]] for s in starts.tolist()])
            start = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        steps = ", ".join(f"{t:.2f}" for t in times)
        print(f"threads={threads}: median step {statistics.median(times[1:]):.3f} s ({steps})", flush=True)


if __name__ == "__main__":
    main()
