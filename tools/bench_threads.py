"""Benchmark: one ``llama_byte_1m`` training step with 1 and with 2 torch threads (see docs/results/zoo_build.md).

Run it on a machine whose other cores are busy to see why zoo builds use one thread (``compressx/threads.py``):
the steps are those of the build (batch 16 x 256, forward + backward + AdamW). Each round times ``--steps`` steps
at 1 thread and at 2 (interleaved, tools/benchlib.py; wall time, since the question is what a user waits);
median and range per setting and the ratio 2 threads / 1 thread taken round by round.

Run:  PYTHONPATH=. python tools/bench_threads.py [--repeats 5] [--steps 2]
"""

from __future__ import annotations

import argparse

import benchlib
import torch

from compressx.zoo import llama_byte


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_arguments(parser, repeats=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed sample")
    args = parser.parse_args()
    run = benchlib.start(args)  # the thread count is what this benchmark varies: --threads only pins the setup
    train_ids, _ = llama_byte._data()
    hp = llama_byte.TRAINING
    gen = torch.Generator().manual_seed(hp["seed"])
    model = llama_byte._init(hp["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

    def steps(threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            for _ in range(args.steps):
                starts = torch.randint(0, train_ids.numel() - hp["seq_len"], (hp["batch"],), generator=gen)
                batch = torch.stack([train_ids[s : s + hp["seq_len"]] for s in starts.tolist()])
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            torch.set_num_threads(args.threads)

    times = benchlib.interleaved({"1 thread": lambda: steps(1), "2 threads": lambda: steps(2)}, args.repeats)
    print("\n".join(run.header()))
    for name, timing in times.items():
        print(f"{name}: {timing.format(3, 1 / args.steps)} s per step (median, range of {args.repeats} rounds)")
    print(f"2 threads / 1 thread: {benchlib.ratio(times['2 threads'], times['1 thread']).format(2)}")


if __name__ == "__main__":
    main()
