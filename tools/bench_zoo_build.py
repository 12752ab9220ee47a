"""Benchmark: how long each zoo member takes to build from scratch (the budget is 3 minutes on 2 CPU cores).

Builds into a fresh temporary cache, so nothing cached is reused. Prints one markdown row per member.

Run:  python tools/bench_zoo_build.py
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import torch

from compressx import zoo


def main() -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print("| member | build seconds (wall) | val perplexity | parameters |")
    print("|---|---|---|---|")
    for name, member in zoo.MEMBERS.items():
        start = time.perf_counter()
        model, info = member.train(progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        print(
            f"| {name} | {seconds:.1f} | {info.get('val_perplexity', float('nan')):.3f} | {info['parameters']:,} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
