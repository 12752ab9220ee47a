import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_check_registry():
    spec = importlib.util.spec_from_file_location("check_registry", ROOT / "tools" / "check_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repository_is_consistent():
    assert _load_check_registry().problems() == []


def test_check_registry_reports_missing_pieces(tmp_path, monkeypatch):
    from compressx.registry import list_passes

    tool = _load_check_registry()
    names = [spec.name for spec in list_passes() if spec.origin.startswith("compressx.passes.")]
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for folder, pattern in (("tests/passes", "test_{}.py"), ("docs/passes", "{}.md")):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / folder / pattern.format(name)).write_text("")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.problems() == []
    (tmp_path / "docs" / "passes" / "magnitude.md").unlink()
    assert tool.problems() == ["pass 'magnitude': docs/passes/magnitude.md is missing"]
    for recipe in (tmp_path / "recipes").rglob("*.yaml"):
        if "pass: wanda" in recipe.read_text():
            recipe.unlink()
    assert tool.problems() == [
        "pass 'magnitude': docs/passes/magnitude.md is missing",
        "pass 'wanda': no recipe under recipes/ uses it",
    ]


@pytest.mark.slow
def test_nm_training_benchmark_runs_small_and_resumes(tmp_path):
    out = tmp_path / "nm"
    args = [sys.executable, str(ROOT / "tools" / "bench_nm_training.py"), "--seeds", "1", "--patterns", "1:16"]
    args += ["--epochs", "2", "--rounds", "1", "--steps", "1", "--out", str(out)]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("top1") == 5  # dense + four passes at 1:16, one seed
    text = (tmp_path / "nm.md").read_text()
    assert "| lbc | " in text and "## The issue's expectations" in text
    assert "LBC beats magnitude + fine-tune on at least 4 of 5 seeds at 1:16: " in text
    assert "(does not hold)" in text  # one seed cannot show 4 of 5
    second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0 and "top1" not in second.stdout  # every run was already recorded


def test_vtw_proxy_recipes_text_prompts_write_each_image_as_its_digit():
    spec = importlib.util.spec_from_file_location("vtw_proxy_recipes", ROOT / "tools" / "vtw_proxy_recipes.py")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from compressx.zoo.llava_digits import WordTokenizer

    labels = torch.tensor([3, 5, 8])
    rows = module.text_prompts("larger", labels, torch.tensor([[0, 1], [2, 1]]))
    assert [WordTokenizer().decode(r.tolist()) for r in rows] == [
        "<bos> user : 3 and 5 is the first larger ? assistant : no",
        "<bos> user : 8 and 5 is the first larger ? assistant : yes",
    ]
    rows = module.text_prompts("even", labels, torch.tensor([2]))
    assert WordTokenizer().decode(rows[0].tolist()) == "<bos> user : 8 is it even ? assistant : yes"


@pytest.mark.slow
def test_vtw_proxy_recipes_runs_small(tmp_path):
    args = [sys.executable, str(ROOT / "tools" / "vtw_proxy_recipes.py"), "--layers", "2", "--seeds", "0"]
    args += ["--text-steps", "2", "--align-steps", "2", "--tune-steps", "2", "--vision-steps", "2"]
    args += ["--questions", "8", "--calibration", "2", "--json", str(tmp_path / "r.json")]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "| scratch | 2 | 0 |" in run.stdout and "| llava | 2 | 0 |" in run.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["recipe"] for r in results] == ["scratch", "llava"]
    for r in results:
        assert set(r["accuracy_per_layer"]) == {"0", "1", "2"} and set(r["kl_per_layer"]) == {"1"}
        assert r["chosen"]["0.003"]["k"] in (1, 2) and 0 < r["chosen"]["0.003"]["prefill_ratio"] <= 1


@pytest.mark.slow
def test_isvit_benchmark_runs_small_and_resumes(tmp_path, zoo_cache):
    """Builds vit_digits into the shared test cache on first use (a few minutes of one thread)."""
    import os

    out = tmp_path / "isvit.json"
    args = [sys.executable, str(ROOT / "tools" / "bench_isvit.py"), "--bits", "8", "--seeds", "0"]
    args += ["--methods", "ptq_minmax", "isvit", "--iterations", "2", "--json", str(out)]
    env = dict(os.environ, COMPRESSX_CACHE=zoo_cache, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["ptq_minmax", "isvit"]
    assert set(runs[1]["stage_top1"]) == {"stage1", "stage2"} and runs[1]["export_sizes"]["ratio_to_fp16"] > 0.5
    assert "| `isvit` after stage1 |" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert second.returncode == 0 and '"method"' not in second.stdout  # every run was already recorded


def test_bench_llm_compressor_method_names_map_to_valid_compressx_steps():
    spec = importlib.util.spec_from_file_location("bench_llm_compressor", ROOT / "tools" / "bench_llm_compressor.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from compressx.registry import get_pass

    assert tool.compressx_step("dense", 0.5, None, 8) is None
    assert tool.compressx_step("dsnot0-sparsegpt", 0.6, None, 8) == {
        "pass": "dsnot", "config": {"sparsity": 0.6, "init": "sparsegpt", "batch_size": 8, "max_cycles": 0},
    }  # fmt: skip
    assert tool.compressx_step("magnitude", 0.5, (2, 4), 8)["config"] == {"pattern": "2:4"}
    for method in ("magnitude", "wanda", "sparsegpt", "dsnot-wanda", "dsnot-sparsegpt", "dsnot0-sparsegpt"):
        for sparsity, nm in tool.PATTERNS.values():
            step = tool.compressx_step(method, sparsity, nm, 8)
            get_pass(step["pass"]).config(**step["config"])  # a valid config, else ConfigError


def _bench_llm_table():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec = importlib.util.spec_from_file_location("bench_llm_table", ROOT / "tools" / "bench_llm_table.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return tool


def test_bench_llm_table_plans_seed_free_methods_once_and_resumes_from_its_results(tmp_path):
    tool = _bench_llm_table()
    tasks = tool.plan([0, 1], ["50%", "2:4"], ["dense", "magnitude", "wanda", "dsnot0-sparsegpt"])
    assert sorted(tasks) == sorted([
        (0, "dense", "50%"), (0, "magnitude", "50%"), (0, "magnitude", "2:4"),
        (0, "wanda", "50%"), (0, "wanda", "2:4"), (1, "wanda", "50%"), (1, "wanda", "2:4"),
        (0, "dsnot0-sparsegpt", "50%"), (1, "dsnot0-sparsegpt", "50%"),
    ])  # fmt: skip
    results = tmp_path / "runs.jsonl"
    other = {"seed": 2, "method": "wanda", "pattern": "50%"}  # not a task of this table: ignored
    results.write_text(json.dumps({"seed": 1, "method": "wanda", "pattern": "2:4"}) + "\n" + json.dumps(other) + "\n")
    done, todo = tool.split_done(tasks, results)
    assert done == [{"seed": 1, "method": "wanda", "pattern": "2:4"}]
    assert len(todo) == len(tasks) - 1 and (1, "wanda", "2:4") not in todo


def test_bench_llm_table_compares_dsnot_with_its_own_start_seed_by_seed():
    tool = _bench_llm_table()

    def run(seed, method, pattern, prose, cpu=10.0):
        r = {"seed": seed, "method": method, "pattern": pattern, "cpu_s": cpu, "peak_rss_mib": 1.0}
        r["ppl"] = {"prose": prose, "source": prose}
        return r | ({"refined_lower": 1, "refined": 2, "expected_error_reduction": 0.5} if "dsnot-" in method else {})

    results = [
        run(0, "magnitude", "50%", 900.0, cpu=5.0),
        run(0, "wanda", "50%", 40.0, cpu=10.0), run(1, "wanda", "50%", 44.0, cpu=30.0),
        run(0, "dsnot0-sparsegpt", "50%", 30.0), run(1, "dsnot0-sparsegpt", "50%", 31.0),
        run(0, "sparsegpt", "50%", 20.0), run(1, "sparsegpt", "50%", 21.0),  # not DSnoT's unstructured start
        run(0, "dsnot-sparsegpt", "50%", 27.0), run(1, "dsnot-sparsegpt", "50%", 34.1),
        run(0, "sparsegpt", "2:4", 50.0), run(0, "wanda", "2:4", 60.0), run(0, "dsnot-sparsegpt", "2:4", 45.0),
    ]  # fmt: skip
    lines = tool.table_lines(results, [0, 1], ["50%", "2:4"], ["magnitude", "wanda", "sparsegpt", "dsnot-sparsegpt"])
    magnitude = next(line for line in lines if line.startswith("| magnitude"))
    assert "900.00 / 900.00 / 0.25x" in magnitude  # its one run against Wanda's mean CPU time (20 s)
    paired = [line for line in lines if line.startswith("| dsnot (sparsegpt start) | ") and "| prose |" in line]
    # 50%: against the 0-cycle start (27/30 - 1 = -10%, 34.1/31 - 1 = +10%); 2:4: against SparseGPT (-10%)
    assert paired == [
        "| dsnot (sparsegpt start) | 50% | prose | DSnoT's SparseGPT start, 0 cycles (per-row counts) | +0.0% | 1/2 |",
        "| dsnot (sparsegpt start) | 2:4 | prose | sparsegpt | -10.0% | 1/1 |",
    ]
