"""What every benchmark under tools/ shares: pinned threads, one machine header, interleaved repeats, ``--out``.

The machines these benchmarks run on are often shared (2 cores, other jobs running), so a time measured alone says
as much about the neighbours as about the code. The rules that make the figures comparable:

* **Threads pinned** (``--threads``, default 1): torch's intra-op count is set once, before anything is timed.
* **One clock per benchmark** (``--clock``): ``wall`` (what a user waits) or ``cpu`` (this process's CPU seconds,
  which other processes on shared cores disturb far less); the page says which.
* **Interleaved repeats**: :func:`interleaved` runs every case once per round, round after round (the order rotates
  each round), so that load from other processes hits every case alike. Each case gets the **median and range**
  of its repeats (:class:`Timing`); a ratio between two cases is the median of their per-round ratios
  (:func:`ratio`), which is what the results pages report — absolute seconds are for orientation only.
* **The same machine header** (:func:`header`): CPU model, cores, pinned threads, load average at start and end,
  Python and library versions, the commit, and the command that reproduces the page.
* ``--out`` is relative to the repository root (:func:`repo_path`), so a benchmark writes to the same file from
  any working directory.

Usage::

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_arguments(parser, out="docs/results/x.md", repeats=5)
    args = parser.parse_args()
    run = benchlib.start(args)           # pins threads, records the load average
    times = benchlib.interleaved({"a": fa, "b": fb}, repeats=args.repeats)
    lines = [*run.header(), "", f"b / a: {benchlib.ratio(times['b'], times['a'])}"]
    benchlib.write(args.out, lines)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "diffusers", "timm", "accelerate")
CLOCKS: dict[str, Callable[[], float]] = {
    # wall: what a user waits; cpu: this process's CPU seconds (all its threads), steadier when the cores are shared
    "wall": time.perf_counter,
    "cpu": time.process_time,
}


def repo_path(value: str | os.PathLike) -> Path:
    """``value`` as a path; a relative one is taken from the repository root, not the working directory."""
    path = Path(value)
    return path if path.is_absolute() else ROOT / path


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    out: str | None = None,
    repeats: int | None = None,
    threads: int = 1,
    clock: str | None = None,
) -> None:
    """The shared options: ``--threads`` always; ``--out``, ``--repeats``, ``--clock`` when given a default."""
    parser.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default {threads})")
    if clock is not None:
        parser.add_argument(
            "--clock", choices=sorted(CLOCKS), default=clock, help=f"what a timing counts (default {clock})"
        )
    if out is not None:
        parser.add_argument(
            "--out", type=repo_path, default=repo_path(out), help=f"relative to the repository root (default {out})"
        )
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=int, default=repeats, help=f"interleaved timed rounds per case (default {repeats})"
        )


def pin_threads(threads: int) -> None:
    """Set torch's intra-op threads (and OMP_NUM_THREADS for child processes) to ``threads``."""
    if threads < 1:
        raise SystemExit(f"--threads {threads}: expected at least 1")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # not on this platform
        return "unknown"


def versions(libraries: Iterable[str] = LIBRARIES) -> str:
    found = [f"Python {platform.python_version()}"]
    for name in libraries:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(found)


def commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(  # the code only: a benchmark's own results files change while it runs
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "compressx", "tools"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() + (" (with local changes to the code)" if dirty.stdout.strip() else "") or "unknown"


def command(argv: list[str] | None = None) -> str:
    """The command line that reproduces this run, script and paths relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    parts = []
    for arg in argv:
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(ROOT):
            arg = str(path.relative_to(ROOT))
        parts.append(shlex.quote(arg))
    return "PYTHONPATH=. python " + " ".join(parts)


@dataclass
class Run:
    """One benchmark run: when it started, at what load, with how many threads."""

    threads: int
    load_at_start: str = field(default_factory=load_average)
    started: float = field(default_factory=time.perf_counter)
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def header(self, libraries: Iterable[str] = LIBRARIES) -> list[str]:
        """Markdown lines: the command, the machine, the load, the versions (load at end = when this is called)."""
        minutes = (time.perf_counter() - self.started) / 60
        return [
            f"Command: `{command(self.argv)}`  ",
            f"Machine: {cpu_model()}, {os.cpu_count()} cores, {self.threads} torch thread(s) pinned; "
            f"load average (1 / 5 / 15 min) {self.load_at_start} at start, {load_average()} at end "
            f"({minutes:.1f} min wall)  ",
            f"Versions: {versions(libraries)}, compressx {commit()}",
        ]


def start(args: argparse.Namespace) -> Run:
    """Pin ``args.threads`` and note the load average: call once, before loading models or timing anything."""
    pin_threads(args.threads)
    return Run(threads=args.threads)


@dataclass(frozen=True)
class Timing:
    """The repeats of one case, in seconds (or any unit): median and range."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``median (low–high)``, each multiplied by ``scale`` (e.g. 1000 for milliseconds)."""
        m, lo, hi = (x * scale for x in (self.median, self.low, self.high))
        return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"

    def __str__(self) -> str:
        return self.format()


def ratio(a: Timing, b: Timing) -> Timing:
    """``a / b`` round by round (both from the same :func:`interleaved` call): a :class:`Timing` of ratios."""
    if len(a.samples) != len(b.samples):
        raise ValueError("ratio() pairs the rounds of one interleaved() call; these have different repeat counts")
    return Timing(tuple(x / y for x, y in zip(a.samples, b.samples)))


def interleaved(
    cases: dict[str, Callable[..., Any]],
    repeats: int,
    *,
    setup: Callable[[str], Any] | None = None,
    warmup: int = 1,
    clock: str = "wall",
    progress: bool = True,
) -> dict[str, Timing]:
    """Time each case ``repeats`` times, one of each per round, the order rotated by one every round.

    ``setup(name)``, if given, runs untimed before each call and its result is passed to the case (e.g. a fresh copy
    of the model a pass modifies in place). ``warmup`` untimed rounds come first. ``clock``: ``"wall"`` or ``"cpu"``.
    """
    if repeats < 1:
        raise SystemExit(f"--repeats {repeats}: expected at least 1")
    tick = CLOCKS[clock]
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            args = (setup(name),) if setup is not None else ()
            begin = tick()
            cases[name](*args)
            seconds = tick() - begin
            if round_ >= warmup:
                samples[name].append(seconds)
        if progress:
            label = "warm-up" if round_ < warmup else f"round {round_ - warmup + 1}/{repeats}"
            print(f"  {label} done", file=sys.stderr, flush=True)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def write(out: Path, lines: list[str]) -> None:
    """Write the page (parents created) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
