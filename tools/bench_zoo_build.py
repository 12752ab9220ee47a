"""Benchmark: how long each zoo member takes to build from scratch (the budget is 3 minutes on 2 CPU cores).

Builds into a fresh temporary folder, so nothing cached is reused: one build per member per round, members
interleaved across ``--repeats`` rounds (tools/benchlib.py); wall seconds, median and range. Builds pin their own
thread count (``compressx/threads.py``), so ``--threads`` changes only the rest of the process.

Run:  PYTHONPATH=. python tools/bench_zoo_build.py [--members llama_byte_1m ...] [--repeats 1]
"""

from __future__ import annotations

import argparse
import tempfile

import benchlib

from compressx import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_arguments(parser, repeats=1)
    parser.add_argument("--out", type=benchlib.repo_path, help="also write the table there (from the repository root)")
    parser.add_argument("--members", nargs="+", default=list(zoo.MEMBERS), choices=list(zoo.MEMBERS))
    args = parser.parse_args()
    run = benchlib.start(args)
    info: dict[str, dict] = {}

    def build(name: str) -> None:
        model, info[name] = zoo.MEMBERS[name].train(progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)

    times = benchlib.interleaved(
        {name: (lambda name=name: build(name)) for name in args.members}, args.repeats, warmup=0
    )
    lines = [
        "# Zoo build times",
        "",
        *run.header(),
        "",
        f"Wall seconds per build, median (range) of {args.repeats} interleaved round(s), fresh folder each time.",
        "",
        "| member | build seconds (wall) | val perplexity | parameters |",
        "|---|---|---|---|",
    ]
    for name, timing in times.items():
        ppl = info[name].get("val_perplexity", float("nan"))
        lines.append(f"| {name} | {timing.format(1)} | {ppl:.3f} | {info[name]['parameters']:,} |")
    print("\n".join(lines))
    if args.out:  # docs/results/zoo_build.md holds more than this table: pasted there by hand
        benchlib.write(args.out, lines)


if __name__ == "__main__":
    main()
