import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchlib():
    spec = importlib.util.spec_from_file_location("benchlib", ROOT / "tools" / "benchlib.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchlib"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["benchlib"]


def test_interleaved_rotates_the_order_and_keeps_only_timed_rounds(benchlib):
    calls = []
    cases = {name: (lambda copy, name=name: calls.append((name, copy))) for name in "abc"}
    times = benchlib.interleaved(cases, repeats=3, setup=lambda name: name.upper(), warmup=1, progress=False)
    assert [name for name, _ in calls] == list("abcbcacababc")  # warm-up round, then 3 rotated rounds
    assert all(copy == name.upper() for name, copy in calls)  # each call got its own setup result
    assert {name: len(t.samples) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_timing_median_range_and_paired_ratio(benchlib):
    a = benchlib.Timing((1.0, 4.0, 2.0))
    b = benchlib.Timing((2.0, 2.0, 1.0))
    assert (a.median, a.low, a.high) == (2.0, 1.0, 4.0)
    assert a.format(1) == "2.0 (1.0–4.0)"
    assert benchlib.ratio(a, b).samples == (0.5, 2.0, 2.0)  # round by round, not median over median
    with pytest.raises(ValueError, match="same repeat count|different repeat counts"):
        benchlib.ratio(a, benchlib.Timing((1.0,)))


def test_out_is_relative_to_the_repository_root_and_header_names_the_machine(benchlib, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    benchlib.add_arguments(parser, out="docs/results/x.md", repeats=3)
    args = parser.parse_args(["--out", "docs/results/y.md", "--threads", "1"])
    assert args.out == ROOT / "docs" / "results" / "y.md" and args.repeats == 3
    assert parser.parse_args([]).out == ROOT / "docs" / "results" / "x.md"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / "bench_x.py"), "--out", str(args.out)])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # start() sets it; monkeypatch restores it
    threads = torch.get_num_threads()
    try:
        run = benchlib.start(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    text = "\n".join(run.header())
    assert "Command: `PYTHONPATH=. python tools/bench_x.py --out docs/results/y.md`" in text
    assert "1 torch thread(s) pinned" in text and "load average" in text and "torch " in text
