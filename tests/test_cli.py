"""The CLI end to end, in subprocesses, on a magnitude recipe for the byte-level zoo LM (built once per session).

The real quickstart (recipes/quickstart.yaml, SmolLM2-135M) runs end to end in tests/test_quickstart.py.
"""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressx

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "llm" / "magnitude_llama_byte.yaml")


def cli(*args, cache):
    env = dict(os.environ, COMPRESSX_CACHE=cache)
    return subprocess.run(
        [sys.executable, "-m", "compressx.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.fixture(scope="session")
def magnitude_export(zoo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "magnitude_llama_byte"
    run = cli("apply", RECIPE, f"export.dir={out}", "--no-progress", cache=zoo_cache)
    assert run.returncode == 0, run.stderr
    return out, run


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_apply_prints_table_and_writes_export(magnitude_export):
    out, run = magnitude_export
    assert "step 0: magnitude (weights) on 28 module(s): sparsity=0.5" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("perplexity (stdlib_text/test, 64x256)")]
    assert len(table) == 1
    before, after = (float(v) for v in table[0].split()[-3:-1])
    assert 1.0 < before < after  # pruning half the weights costs perplexity
    assert "magnitude on 28 module(s)" in run.stderr  # the decision is logged
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "compressx.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "recipe.yaml",
        "tokenizer.json",  # the zoo's byte tokenizer, for AutoTokenizer
        "tokenizer_config.json",
    ]
    manifest = compressx.read_manifest(out)
    assert manifest["eval"]["after"]["perplexity (stdlib_text/test, 64x256)"] == pytest.approx(after, abs=1e-4)
    assert manifest["source"] == {"source": "zoo", "id": "llama_byte_1m", "dtype": "float32"}


@pytest.mark.slow
def test_load_reproduces_in_memory_logits_exactly(magnitude_export, zoo_cache, tmp_path, monkeypatch):
    out, _ = magnitude_export
    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    recipe = compressx.load_recipe(RECIPE, [f"export.dir={tmp_path / 'again'}"])
    run = compressx.run_recipe(recipe, progress=False)
    # the same recipe in another process wrote the same bytes
    assert sha(out / "model.safetensors") == sha(tmp_path / "again" / "model.safetensors")
    loaded = compressx.load(out)
    tokens = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=tokens).logits, loaded(input_ids=tokens).logits)


@pytest.mark.slow
def test_cli_load_eval_and_show(magnitude_export, zoo_cache):
    out, _ = magnitude_export
    run = cli("load", str(out), "--eval", "--no-progress", cache=zoo_cache)
    assert run.returncode == 0, run.stderr
    assert "all file hashes match" in run.stdout and "reproduces the recorded metrics exactly" in run.stdout
    run = cli("show", str(out), cache=zoo_cache)
    assert run.returncode == 0
    assert "model: LlamaForCausalLM (transformers) from zoo:llama_byte_1m" in run.stdout
    assert "model.layers.0.self_attn.q_proj" in run.stdout and "model.safetensors  sha256" in run.stdout


@pytest.mark.slow
def test_apply_refuses_existing_export_before_building(magnitude_export, zoo_cache):
    out, _ = magnitude_export
    run = cli("apply", RECIPE, f"export.dir={out}", cache=zoo_cache)
    assert run.returncode == 2 and "exists; pass --overwrite" in run.stderr


def test_cli_list_and_errors(tmp_path):
    run = cli("list", cache=str(tmp_path))
    assert run.returncode == 0
    assert re.search(r"^magnitude +weights ", run.stdout, re.MULTILINE)  # column widths follow the longest name
    assert re.search(r"^cutdiffusion +pipeline +diffusion ", run.stdout, re.MULTILINE)
    run = cli("show", str(tmp_path), cache=str(tmp_path))
    assert run.returncode == 2 and "not a compressx export" in run.stderr and "Traceback" not in run.stderr
