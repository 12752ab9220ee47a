"""``compressx report``: the HTML + Markdown report of an export, its figures, where it may be written, and how it
renders in headless Chromium (skipped, with the reason, where Chromium is absent).

The report of the real quickstart export is checked in tests/test_quickstart.py, on the export that test makes.
"""

import base64
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import IMAGE_TOKEN, TinyCNN, make_tiny_llama, make_tiny_llava, save_tiny_hf_llama, tiny_timm_vit
from headless_chromium import assert_rendered_cleanly

import compressx
from compressx.api import ApplyResult
from compressx.cli import main
from compressx.errors import ExportError
from compressx.report import ReportError, default_report_dir, write_report

pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'compressx[report]'")

EVAL = {"before": {"perplexity (stdlib_text/test, 8x32)": 5.25}, "after": {"perplexity (stdlib_text/test, 8x32)": 6.5}}


@pytest.fixture
def pruned_export(tmp_path, one_thread):
    model = make_tiny_llama()
    result = compressx.apply(model, [{"pass": "magnitude", "config": {"pattern": "2:4"}}], progress=False)
    out = compressx.save(model, tmp_path / "pruned", result, eval_results=EVAL)
    return Path(out), model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def figures_in_html(page: Path) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())]


def test_report_of_a_pruned_export_holds_the_eval_sizes_and_sparsity_bars(pruned_export):
    export, model = pruned_export
    page = write_report(export)
    target = export.parent / "pruned.report"
    assert page == target / "report.html" and default_report_dir(export) == target
    assert default_report_dir(export / ".") == target.resolve() and default_report_dir(f"{export}/") == target
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "figures",
        "figures/sparsity.png",
        "report.html",
        "report.json",
        "report.md",
    ]
    html = page.read_text()
    # Self-contained: the only images are data: URIs, nothing is fetched, nothing runs.
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:)', html)
    assert "img-src data:" in html  # the CSP forbids loading anything else
    embedded = figures_in_html(page)
    assert embedded == [(target / "figures" / "sparsity.png").read_bytes()]
    assert embedded[0].startswith(b"\x89PNG")
    markdown = (target / "report.md").read_text()
    assert "![" in markdown and "(figures/sparsity.png)" in markdown
    for text in (html, markdown):
        assert "5.2500" in text and "6.5000" in text and "+23.81%" in text  # the eval, before / after / change
        assert "2:4 ×14" in text  # 2 layers x 7 Linears, all 2:4
    # The non-zero count is the model's own, counted here independently of the manifest.
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    nonzero = sum(int((p != 0).sum()) for p in params.values())
    assert nonzero < total
    assert f"| non-zero floating-point weights | {total:,} | {nonzero:,} |" in markdown
    marker = json.loads((target / "report.json").read_text())
    assert marker["export_manifest_sha256"] == compressx.manifest.manifest_digest(export)
    assert set(marker["files"]) == {"figures/sparsity.png", "report.html", "report.md"}
    assert compressx.manifest.unlisted_files(export) == []  # nothing was written into the export


def test_report_reads_only_a_verified_export(pruned_export, tmp_path, capsys):
    export, _ = pruned_export
    (export / "README.md").write_text("edited")
    with pytest.raises(ExportError, match="README.md' is corrupt"):
        write_report(export)
    assert not default_report_dir(export).exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a compressx export" in capsys.readouterr().err


def test_report_never_replaces_or_writes_into_what_compressx_did_not_write(pruned_export, tmp_path, capsys):
    export, _ = pruned_export
    target = default_report_dir(export)
    write_report(export)
    first = (target / "report.md").read_bytes()
    write_report(export)  # an unchanged report compressx wrote is replaced whole
    assert (target / "report.md").read_bytes() == first
    assert not list(tmp_path.glob(".pruned.report.*"))  # no temporary directory or lock left
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match=r"holds files compressx did not write \(notes.txt\)"):
        write_report(export)
    (target / "notes.txt").unlink()
    (target / "report.md").write_text("edited by hand")
    with pytest.raises(ReportError, match="report.md was changed or removed"):
        write_report(export)
    assert (target / "report.md").read_text() == "edited by hand"
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("keep")
    assert main(["report", str(export), "--out", str(thesis)]) == 2
    assert "not a report compressx wrote" in capsys.readouterr().err
    assert [p.name for p in thesis.iterdir()] == ["chapter1.tex"]
    for inside in (export / "report", export):
        with pytest.raises(ReportError, match="overlaps the export"):
            write_report(export, inside)
    assert compressx.manifest.unlisted_files(export) == []
    assert main(["report", str(export), "--out", str(tmp_path / "elsewhere")]) == 0
    assert f"written to {tmp_path / 'elsewhere' / 'report.html'}" in capsys.readouterr().out


def test_vtw_report_has_the_kl_curve_and_flops_before_after(tmp_path, one_thread):
    model = make_tiny_llava(layers=4)
    with torch.no_grad():  # layers 2 and 3 become identities: KL 0 from candidate 2 on, so K = 2
        for layer in model.model.language_model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    ids = torch.tensor([[1, 5, 6, 7] + [IMAGE_TOKEN] * 16 + [8, 9, 10]])  # 16 vision tokens: one 8x8 image
    data = [{"input_ids": ids, "pixel_values": torch.randn(1, 3, 8, 8, generator=gen(s))} for s in range(2)]
    steps = [{"pass": "vtw", "config": {"layer": "auto", "threshold": 1e-9, "search_start": 1}}]
    result = compressx.apply(model, steps, data, progress=False)
    flops = result.steps[0].report["flops"]
    export = compressx.save(model, tmp_path / "vtw", result)
    page = write_report(export)
    markdown = (page.parent / "report.md").read_text()
    assert (page.parent / "figures" / "step0_kl.png").is_file()
    assert "(K = 2)" in markdown and "on 2 calibration prompts" in markdown
    ratio = flops["prefill_flops"] / flops["prefill_flops_full"]
    assert f"| {flops['prefill_flops_full']:.4g} | {flops['prefill_flops']:.4g} | {ratio:.3f}× |" in markdown
    # The KL curve, and sparsity bars: the projections zeroed above are in the manifest's sparsity record
    assert sorted(p.name for p in (page.parent / "figures").iterdir()) == ["sparsity.png", "step0_kl.png"]
    assert len(figures_in_html(page)) == 2


def test_training_pass_report_has_its_schedule(tmp_path, one_thread):
    model = TinyCNN()
    result = compressx.apply(model, [{"pass": "lbc", "config": {"pattern": "2:4", "end_epoch": 3}}], progress=False)
    step = result.steps[0]
    for epoch in range(4):  # the schedule alone, as the trainer drives it (no training needed to see it)
        step.handle.on_epoch_start(epoch)
    step.handle.finalize()
    step.report = {**step.report, **step.handle.final_report, "schedule": step.handle.history}
    kept = [e["candidates_kept"] for e in step.handle.history]
    assert kept[-1] == 1 and kept == sorted(kept, reverse=True)
    page = write_report(compressx.save(model, tmp_path / "lbc", ApplyResult([step])))
    markdown = (page.parent / "report.md").read_text()
    assert (page.parent / "figures" / "step0_schedule.png").is_file() and "candidates_kept" in markdown


def test_quantized_report_has_the_bit_widths_and_sizes(tmp_path, one_thread):
    vit = tiny_timm_vit()
    images = torch.randn(32, 1, 16, 16, generator=gen(1))
    result = compressx.apply(vit, [{"pass": "repq_vit", "config": {"w_bits": 4}}], data=images, progress=False)
    page = write_report(compressx.save(vit, tmp_path / "w4", result))
    markdown = (page.parent / "report.md").read_text()
    layers = json.loads((tmp_path / "w4" / "compressx.json").read_text())["model"]["quantized_weights"]
    assert f"4-bit ×{layers}" in markdown and (page.parent / "figures" / "bits.png").is_file()
    assert "quantized weights (codes, scales, zero points) vs fp16" in markdown


@pytest.mark.slow  # builds sd_digits with a few training steps and samples 6 images: 15-45 s
def test_pipeline_report_samples_a_grid_with_the_loaded_pipeline(tmp_path, one_thread, capsys):
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (a dev extra)")
    from compressx.zoo import sd_digits

    build, _ = sd_digits.train(progress=False, vae_steps=2, unet_steps=2, classifier_steps=1)  # untrained is fine
    result = compressx.apply(build.pipe, [{"pass": "cutdiffusion", "config": {}}], progress=False)
    export = compressx.save(build.pipe, tmp_path / "sd", result)
    args = ["report", str(export), "--samples", "digit 3", "digit 7", "--sample-steps", "2"]
    assert main(args) == 0, capsys.readouterr().err
    report = tmp_path / "sd.report"
    assert (report / "figures" / "samples.png").is_file()
    markdown = (report / "report.md").read_text()
    assert "Samples of the loaded pipeline (re-applied: `cutdiffusion`)" in markdown and "2 steps, seed 0" in markdown
    assert main(["report", str(tmp_path / "sd.report"), "--out", str(tmp_path / "x")]) == 2  # a report: no export
    capsys.readouterr()


def test_samples_are_refused_for_an_export_that_is_not_a_pipeline(pruned_export, capsys):
    export, _ = pruned_export
    assert main(["report", str(export), "--samples", "digit 3"]) == 2
    assert "--samples needs a diffusers pipeline export" in capsys.readouterr().err


def test_recipe_export_report_true_writes_it_and_apply_prints_where(tmp_path, bpe_tokenizer, capsys, one_thread):
    model_dir = save_tiny_hf_llama(tmp_path / "tiny-llama", bpe_tokenizer)
    recipe = {
        "model": {"source": "hf", "id": str(model_dir)},
        "steps": [{"pass": "magnitude", "config": {"pattern": "2:4"}}],
        "export": {"dir": str(tmp_path / "out"), "report": True},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["apply", str(path), "--no-progress"]) == 0
    page = tmp_path / "out.report" / "report.html"
    assert f"report: {page}" in capsys.readouterr().out and page.is_file()
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["export"]["report"] is True
    # validate finds, before any work, a report directory it may not replace and a report that is not a bool
    (page.parent / "notes.txt").write_text("mine")
    assert main(["validate", str(path), "--overwrite"]) == 2
    assert "export.report: " in capsys.readouterr().err
    assert main(["validate", str(path), "export.report=3", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "export.report:" in err and "expected true or false" in err


def test_report_renders_in_headless_chromium(pruned_export, tmp_path):
    export, _ = pruned_export
    page = write_report(export)
    assert_rendered_cleanly(page, tmp_path / "chromium", min_images=1)
