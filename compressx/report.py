"""A visual report of an export: ``compressx report DIR`` (and ``export: {report: true}`` in a recipe).

The report is written beside the export, never inside it (an export is hashed and whole), by default to
``<DIR>.report/``:

* ``report.html`` — self-contained: its figures are embedded as ``data:`` URIs, its style is inline, it has no
  script and a Content-Security-Policy that forbids loading anything else;
* ``report.md`` — the same content as Markdown, its figures beside it in ``figures/*.png``;
* ``report.json`` — which export it describes (the SHA-256 of its ``compressx.json``) and the SHA-256 of every
  file of the report: what marks the directory as one compressx wrote, and may replace.

It reads only a verified export (``compressx.export.verify``: the manifest, then every file's hash) and shows
what the manifest records: the steps and their reports, the eval before and after, sizes (non-zero weights, the
packed sparse file, quantized weights, files on disk), FLOPs before and after where a pass reports them (vtw,
fastv), per-tensor sparsity bars (the manifest's ``sparsity`` record), per-layer weight bit-widths (quantized
exports), and each pass's own figure where its report holds one: the KL divergence per candidate layer of a
``layer: auto`` search (vtw, arXiv:2405.05803), the training schedule and loss of a training pass (lbc's
candidate-removal schedule, arXiv:2206.06662). A pipeline export (cutdiffusion, multidiffusion) holds no
samples; ``sample_prompts`` has the report generate a grid with the loaded pipeline (``compressx report DIR
--samples PROMPT ...``).

Figures are drawn with matplotlib's Agg canvas (no pyplot, no global backend change), the extra
``compressx[report]``. The directory is written to a temporary directory beside the target and renamed into place
(swapped with an old report in one step where the OS can), under the target's lock, as exports are.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressx.atomic import LockBusy, exchange, fsync_dir, fsync_tree, rename_noreplace, sha256_file, target_lock
from compressx.errors import CompressxError
from compressx.manifest import MANIFEST, manifest_digest, verify
from compressx.registry import summarize_report

log = logging.getLogger(__name__)

REPORT_MARKER = "report.json"
REPORT_VERSION = 1
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
FIGURES = "figures"
# Beyond this many tensors the sparsity bars are drawn as columns grouped by block, not as labelled rows.
MAX_LABELLED_BARS = 48
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_PATTERN_COLOURS = {"unstructured": "#8c8c8c"}
_NM_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


class ReportError(CompressxError):
    """The report cannot be written where asked (a directory compressx did not write, inside the export, ...)."""


# ---- content: a few block kinds, rendered to HTML and to Markdown ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # file stem under figures/
    caption: str
    png: bytes


Block = Heading | Paragraph | Table | Figure


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError as err:
        raise ReportError(
            "the report draws its figures with matplotlib, which is not installed: pip install 'compressx[report]'"
        ) from err
    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: the same input, the same bytes
    return buf.getvalue()


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}×" if before else "-"


def _count(n: float) -> str:
    return f"{n:,.0f}"


# ---- what the export holds -------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), without reading the tensors."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _weight_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) of the floating-point tensors of the model's weight files (not the packed
    ``sparse.safetensors``, whose tensors duplicate dense ones)."""
    packed = (manifest.get("sparse_format") or {}).get("file")
    tensors: dict[str, tuple[int, int]] = {}
    for name in manifest["files"]:
        if not name.endswith(".safetensors") or name == packed:
            continue
        for tensor, info in _safetensors_header(directory / name).items():
            if tensor == "__metadata__" or info.get("dtype") not in _FLOAT_DTYPES:
                continue
            numel = math.prod(info["shape"])
            tensors.setdefault(tensor, (numel, numel * _DTYPE_BYTES[info["dtype"]]))
    return tensors


def _quantized_layout(directory: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """layer -> {shape, bits} of a quantized export (the metadata of its ``quantized.safetensors``)."""
    entry = manifest["model"]
    if entry.get("format") != "quantized" or entry.get("file") not in manifest["files"]:
        return {}
    metadata = _safetensors_header(directory / entry["file"]).get("__metadata__") or {}
    try:
        return dict(json.loads(metadata["compressx_quantization"])["weights"])
    except (KeyError, TypeError, ValueError):
        return {}


# ---- sections --------------------------------------------------------------------------------------------------


def _overview(directory: Path, manifest: dict[str, Any]) -> list[Block]:
    model = manifest["model"]
    source = manifest.get("source") or {}
    origin = f" from `{source.get('source')}:{source.get('id')}`" if source else ""
    blocks: list[Block] = [
        Heading(f"compressx report: {model['class']}{origin}", 1),
        Paragraph(
            f"Export `{directory}` ({model['format']}), created {manifest.get('created', 'at an unrecorded time')}; "
            f"`{MANIFEST}` SHA-256 `{manifest_digest(directory)}`; every file's hash verified when this report "
            "was written."
        ),
        Paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + "."),
    ]
    if model.get("note"):
        blocks.append(Paragraph(f"Note: {model['note']}."))
    rows = []
    for i, step in enumerate(manifest["steps"]):
        rows.append(
            [
                str(i),
                f"`{step['pass']}`",
                step["kind"],
                str(len(step["targets"])),
                f"`{json.dumps(step['config'])}`",
                summarize_report(step["report"]) or "-",
            ]
        )
    blocks += [Heading("Steps"), Table(["step", "pass", "kind", "modules", "config", "report"], rows)]
    if manifest.get("reapply"):
        names = ", ".join(f"`{e['pass']}`" for e in manifest["reapply"])
        blocks.append(Paragraph(f"Re-applied when the export is loaded with `compressx.load`: {names}."))
    return blocks


def _eval_section(manifest: dict[str, Any]) -> list[Block]:
    ev = manifest.get("eval") or {}
    before, after = ev.get("before") or {}, ev.get("after") or {}
    if not after:
        return [
            Heading("Evaluation"),
            Paragraph("The export records no evaluation (no `eval` in its recipe, or saved without `eval_results`)."),
        ]
    rows = []
    for label, a in after.items():
        b = before.get(label)
        change = f"{(a - b) / b * 100:+.2f}%" if b else "-"
        rows.append([label, f"{b:.4f}" if b is not None else "-", f"{a:.4f}", change])
    return [Heading("Evaluation"), Table(["metric", "before", "after", "change"], rows)]


def _size_section(directory: Path, manifest: dict[str, Any], tensors: dict[str, tuple[int, int]]) -> list[Block]:
    rows = []
    record = manifest.get("sparsity") or {}
    pruned = False  # a noticeable share of zeros (not the odd exact zero of a dense model)
    if record and tensors:
        total = sum(numel for numel, _ in tensors.values())
        zeros = sum(round(entry["sparsity"] * tensors[name][0]) for name, entry in record.items() if name in tensors)
        rows.append(
            ["non-zero floating-point weights", _count(total), _count(total - zeros), _ratio(total, total - zeros)]
        )
        pruned = zeros >= 0.01 * total
    packed = manifest.get("sparse_format")
    if packed:
        label = f"sparse weights packed ({packed['format']}, `{packed['file']}`) vs dense"
        rows.append(
            [
                label,
                _bytes(packed["dense_bytes"]),
                _bytes(packed["bytes"]),
                _ratio(packed["dense_bytes"], packed["bytes"]),
            ]
        )
    sizes = manifest["model"].get("sizes")
    if isinstance(sizes, dict) and sizes.get("fp16_bytes"):
        quant = sizes["quantized_weight_bytes"]
        rows.append(
            [
                "quantized weights (codes, scales, zero points) vs fp16",
                _bytes(sizes["fp16_bytes"]),
                _bytes(quant),
                _ratio(sizes["fp16_bytes"], quant),
            ]
        )
        rows.append(
            [
                "quantized weights vs fp32",
                _bytes(sizes["fp32_bytes"]),
                _bytes(quant),
                _ratio(sizes["fp32_bytes"], quant),
            ]
        )
    on_disk = sum((directory / name).stat().st_size for name in manifest["files"])
    on_disk += (directory / MANIFEST).stat().st_size
    rows.append([f"export on disk ({len(manifest['files']) + 1} files)", "-", _bytes(on_disk), "-"])
    blocks: list[Block] = [Heading("Size"), Table(["what", "before", "after", "after / before"], rows)]
    if pruned and not packed:
        blocks.append(
            Paragraph(
                "The pruned weights are stored dense (zeros included), so the weight files keep their size; "
                "`export: {sparse_format: nm}` or `bitmask` also writes them packed."
            )
        )
    return blocks


def _flops_section(manifest: dict[str, Any]) -> list[Block]:
    rows = []
    for i, step in enumerate(manifest["steps"]):
        flops = step["report"].get("flops")
        if not isinstance(flops, dict):
            continue
        for key, after in flops.items():
            before = flops.get(f"{key}_full")
            if key.endswith("_full") or not isinstance(before, int | float) or not isinstance(after, int | float):
                continue
            rows.append(
                [
                    f"step {i} `{step['pass']}`: {key.replace('_', ' ')}",
                    f"{before:.4g}",
                    f"{after:.4g}",
                    _ratio(before, after),
                ]
            )
    if not rows:
        return []
    return [
        Heading("FLOPs"),
        Table(["what (as the pass counts it)", "before", "after", "after / before"], rows),
        Paragraph("Analytic counts reported by the pass (see its documentation for what they include)."),
    ]


def _bars(
    names: list[str], values: list[float], colours: list[str], ylabel: str, title: str, limit: float | None
) -> Any:
    """Bars per tensor: labelled rows when few, grouped columns (one tick per numbered block) when many."""
    short = [n.removesuffix(".weight") for n in names]
    if len(names) <= MAX_LABELLED_BARS:
        fig = _figure(9, 1.0 + 0.22 * len(names))
        ax = fig.add_subplot()
        y = range(len(names))
        ax.barh(y, values, color=colours)
        ax.set_yticks(list(y), short, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
        if limit is not None:
            ax.set_xlim(0, limit)
    else:
        fig = _figure(10, 3.6)
        ax = fig.add_subplot()
        x = range(len(names))
        ax.bar(x, values, width=1.0, color=colours, linewidth=0)
        # One tick per numbered block (model.layers.N -> "N"), placed at the middle of its tensors; the
        # tensors outside numbered blocks (embeddings, head) get no tick.
        blocks: dict[str, list[int]] = {}
        for i, name in enumerate(short):
            match = re.match(r"(.*?)\.(\d+)(\.|$)", name)
            if match:
                blocks.setdefault(f"{match.group(1)}.{match.group(2)}", []).append(i)
        labels = list(blocks)
        step = max(1, -(-len(labels) // 40))
        ticks = [(sum(blocks[b]) / len(blocks[b]), b.rsplit(".", 1)[-1]) for b in labels[::step]]
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
        prefixes = sorted({b.rsplit(".", 1)[0] for b in labels})
        ax.set_xlabel(f"{len(names)} tensors, in order; ticks: {', '.join(p + '.N' for p in prefixes[:3])}")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(ylabel)
        if limit is not None:
            ax.set_ylim(0, limit)
    ax.set_title(title, fontsize=10)
    return fig


def _sparsity_section(manifest: dict[str, Any]) -> list[Block]:
    record = manifest.get("sparsity")
    if not record:
        return []
    names = sorted(record, key=_natural_key)
    patterns = sorted({record[n]["pattern"] for n in names}, key=lambda p: (p == "unstructured", p))
    palette = dict(_PATTERN_COLOURS)
    for i, pattern in enumerate(p for p in patterns if p not in palette):
        palette[pattern] = _NM_COLOURS[i % len(_NM_COLOURS)]
    fig = _bars(
        names,
        [record[n]["sparsity"] for n in names],
        [palette[record[n]["pattern"]] for n in names],
        "fraction of zeros",
        f"Sparsity of the {len(names)} weight tensors with zeros",
        1.0,
    )
    from matplotlib.patches import Patch

    fig.axes[0].legend(handles=[Patch(color=palette[p], label=p) for p in patterns], fontsize=8, loc="lower right")
    counts = ", ".join(f"{p} ×{sum(record[n]['pattern'] == p for n in names)}" for p in patterns)
    values = [record[n]["sparsity"] for n in names]
    caption = (
        f"Per-tensor sparsity (the manifest's sparsity record: {counts}; zero fraction {min(values)}–{max(values)}). "
        "Tensors without zeros are not shown."
        + (
            " The record names a pattern N:M only when the zero fraction is exactly 1 − N/M: an N:M tensor that "
            "held zeros of its own before pruning reads unstructured."
            if "unstructured" in patterns and len(patterns) > 1
            else ""
        )
    )
    return [Heading("Sparsity per layer"), Figure("sparsity", caption, _png(fig))]


def _bits_section(layout: dict[str, dict[str, Any]]) -> list[Block]:
    if not layout:
        return []
    names = sorted(layout, key=_natural_key)
    bits = [int(layout[n]["bits"]) for n in names]
    colours = [_NM_COLOURS[b % len(_NM_COLOURS)] for b in bits]
    fig = _bars(names, bits, colours, "weight bits", f"Weight bit-width of the {len(names)} quantized layers", None)
    fig.axes[0].set_xlim(0, max(bits) + 1) if len(names) <= MAX_LABELLED_BARS else fig.axes[0].set_ylim(
        0, max(bits) + 1
    )
    caption = (
        f"Weight bit-width per quantized layer ({', '.join(f'{b}-bit ×{bits.count(b)}' for b in sorted(set(bits)))})."
    )
    return [Heading("Bit-width per layer"), Figure("bits", caption, _png(fig))]


def _kl_figure(index: int, step: dict[str, Any]) -> list[Block]:
    report = step["report"]
    kl = {int(d): float(v) for d, v in report["kl_per_layer"].items()}
    layers = sorted(kl)
    threshold = report.get("threshold")
    chosen = report.get("layer")
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    ax.plot(layers, [kl[d] for d in layers], marker="o", label="mean KL(withdrawn at d ‖ full)")
    positive = [v for v in kl.values() if v > 0]
    linthresh = min([*positive, threshold or 1.0]) / 10 if positive or threshold else 1e-12
    ax.set_yscale("symlog", linthresh=linthresh)
    if threshold is not None:
        ax.axhline(threshold, color="#d62728", linestyle="--", label=f"threshold η = {threshold:g}")
    if isinstance(chosen, int) and chosen in kl:
        ax.axvline(chosen, color="#2ca02c", linestyle=":", label=f"chosen K = {chosen}")
    ax.set_xlabel("candidate layer d (vision tokens withdrawn from layer d on)")
    ax.set_ylabel("mean KL divergence")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    ax.set_title(f"step {index}: {step['pass']} — KL divergence per candidate layer", fontsize=10)
    prompts = report.get("calibration_prompts")
    off = isinstance(chosen, int) and chosen not in kl
    caption = (
        f"The layer search of step {index} (`{step['pass']}`)"
        + (f" on {prompts} calibration prompts" if prompts else "")
        + ": K is the first candidate whose mean KL is at most η"
        + (f"; none is, so withdrawal is off (K = {chosen})." if off else f" (K = {chosen}).")
    )
    return [Heading(f"Step {index}: {step['pass']} layer search", 3), Figure(f"step{index}_kl", caption, _png(fig))]


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _schedule_figure(index: int, step: dict[str, Any]) -> list[Block]:
    report = step["report"]
    schedule = [e for e in report.get("schedule") or [] if isinstance(e, dict) and _numeric(e.get("epoch"))]
    training = report.get("training") if isinstance(report.get("training"), dict) else {}
    history = [e for e in training.get("history") or [] if isinstance(e, dict) and _numeric(e.get("loss"))]
    keys = sorted({k for e in schedule for k, v in e.items() if k != "epoch" and _numeric(v)})
    if not keys and not history:
        return []
    panels = (1 if keys else 0) + (1 if history else 0)
    fig = _figure(5 * panels, 3.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    epochs = int(training.get("epochs") or 0) or (max((e["epoch"] for e in schedule), default=0) + 1)
    if keys:
        ax = axes[0]
        for key in keys:
            points = [(e["epoch"], e[key]) for e in schedule if _numeric(e.get(key))]
            if key == "candidates_kept" and _numeric(report.get("candidates_per_block")) and points[0][0] > 0:
                points.insert(0, (0, report["candidates_per_block"]))  # before the first removal: all of them
            xs, ys = [p[0] for p in points] + [epochs], [p[1] for p in points] + [points[-1][1]]
            ax.step(xs, ys, where="post", marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_title(f"step {index}: {step['pass']} schedule", fontsize=10)
        ax.legend(fontsize=8)
    if history:
        ax = axes[-1]
        ax.plot([e.get("epoch", i) for i, e in enumerate(history)], [e["loss"] for e in history], marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss")
        ax.set_title(f"step {index}: training loss", fontsize=10)
    parts = []
    if keys:
        parts.append(f"what the schedule decided at each epoch where it changed something ({', '.join(keys)})")
    if history:
        parts.append(f"the mean training loss per epoch ({len(history)} epochs)")
    caption = f"Step {index} (`{step['pass']}`): " + " and ".join(parts) + "."
    return [Heading(f"Step {index}: {step['pass']} training", 3), Figure(f"step{index}_schedule", caption, _png(fig))]


def _pass_sections(manifest: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = []
    for i, step in enumerate(manifest["steps"]):
        report = step["report"]
        if isinstance(report.get("kl_per_layer"), dict) and report["kl_per_layer"]:
            blocks += _kl_figure(i, step)
        if report.get("schedule") or isinstance(report.get("training"), dict):
            blocks += _schedule_figure(i, step)
    return [Heading("Pass figures"), *blocks] if blocks else []


def _samples_section(
    directory: Path, manifest: dict[str, Any], prompts: list[str], steps: int, seed: int
) -> list[Block]:
    """A grid generated by the loaded pipeline (its pipeline passes re-applied): one row per size (native, 2×
    wide, 2× both ways), one column per prompt, one seed."""
    import numpy as np
    import torch

    from compressx.export import load

    pipe = load(directory)
    if not hasattr(pipe, "unet"):
        raise ReportError(
            f"--samples needs a diffusers pipeline export; {directory} holds a {manifest['model']['class']}"
        )
    native = pipe.unet.config.sample_size
    native = (native if isinstance(native, int) else native[0]) * pipe.vae_scale_factor
    sizes = [(native, native), (native, 2 * native), (2 * native, 2 * native)]
    fig = _figure(1.6 * len(prompts) + 1.2, 1.1 * sum(h for h, _ in sizes) / native + 0.8)
    grid = fig.subplots(len(sizes), len(prompts), squeeze=False, gridspec_kw={"height_ratios": [h for h, _ in sizes]})
    for r, (height, width) in enumerate(sizes):
        for c, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed)
            image = pipe(prompt, height=height, width=width, num_inference_steps=steps, generator=generator).images[0]
            ax = grid[r][c]
            pixels = np.asarray(image)
            ax.imshow(pixels, interpolation="nearest", cmap="gray" if pixels.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompt, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{height}×{width}", fontsize=8)
    passes = ", ".join(f"`{e['pass']}`" for e in manifest.get("reapply", [])) or "none"
    caption = (
        f"Samples of the loaded pipeline (re-applied: {passes}); rows: native size and 2×, 4× its area; "
        f"{steps} steps, seed {seed}."
    )
    return [Heading("Samples"), Figure("samples", caption, _png(fig))]


def build_report(
    directory: str | os.PathLike, *, sample_prompts: list[str] | None = None, sample_steps: int = 30, seed: int = 0
) -> list[Block]:
    """The report's content for a verified export (every file's hash checked first)."""
    directory = Path(directory)
    manifest = verify(directory)
    tensors = _weight_tensors(directory, manifest)
    blocks = [
        *_overview(directory, manifest),
        *_eval_section(manifest),
        *_size_section(directory, manifest, tensors),
        *_flops_section(manifest),
        *_sparsity_section(manifest),
        *_bits_section(_quantized_layout(directory, manifest)),
        *_pass_sections(manifest),
    ]
    if sample_prompts:
        blocks += _samples_section(directory, manifest, sample_prompts, sample_steps, seed)
    return blocks


# ---- rendering -------------------------------------------------------------------------------------------------


def _inline_html(text: str) -> str:
    """Markdown-ish inline code (`x`) to <code>, everything escaped."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td code { overflow-wrap: break-word; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def render_html(blocks: list[Block]) -> str:
    """One self-contained page: figures as data: URIs, inline style, no script, a CSP that loads nothing else."""
    title = next((b.text for b in blocks if isinstance(b, Heading)), "compressx report")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title.replace('`', ''))}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode("ascii")
            alt = html.escape(block.caption.replace("`", ""), quote=True)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """The same content as Markdown; figures referenced as ``figures/<name>.png`` beside it."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Table):
            out.append("| " + " | ".join(_cell(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        else:
            out += [f"![{block.caption.replace('`', '')}]({FIGURES}/{block.name}.png)", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ---- writing ---------------------------------------------------------------------------------------------------


def default_report_dir(export_dir: str | os.PathLike) -> Path:
    """``<export>.report`` beside the export (never inside it: an export holds only the files it hashes)."""
    export = Path(export_dir)
    if export.name in ("", ".", ".."):  # `compressx report .`: beside the directory, not inside it
        export = export.resolve()
    return export.parent / f"{export.name}.report"


def _report_problem(target: Path) -> str | None:
    """Why ``target`` may not be replaced by a new report; None when absent or a report compressx wrote, unchanged
    (its ``report.json`` lists every file it holds, each with its recorded SHA-256)."""
    keep = "nothing was changed; move it away or choose another --out"
    if target.is_symlink():
        return f"{target} is a symbolic link, not a report compressx wrote; {keep}"
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target} is a file, not a report compressx wrote; {keep}"
    try:
        marker = json.loads((target / REPORT_MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        if marker.get("compressx_report") != REPORT_VERSION or not isinstance(files, dict):
            raise ValueError("not a report marker")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{target} exists and is not a report compressx wrote (no valid {REPORT_MARKER}); {keep}"
    found = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir() or p.is_symlink())
    unlisted = [name for name in found if name not in files and name != REPORT_MARKER]
    if unlisted:
        return f"{target} holds files compressx did not write ({', '.join(unlisted[:5])}); {keep}"
    for name, digest in files.items():
        path = target / name
        if path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
            return f"{target}/{name} was changed or removed since compressx wrote it; {keep}"
    return None


def _check_target(export: Path, target: Path) -> None:
    e, t = export.resolve(), target.resolve()
    if t == e or e in t.parents or t in e.parents:
        raise ReportError(
            f"the report directory {target} overlaps the export {export}: an export holds only the files its "
            f"{MANIFEST} lists, so the report goes beside it (default: {default_report_dir(export)})"
        )
    problem = _report_problem(target)
    if problem:
        raise ReportError(problem)


def report_target_problem(export_dir: str | os.PathLike) -> str | None:
    """What would stop the report of ``export_dir`` being written to its default place, found before any work
    (``export: {report: true}``): matplotlib missing, or ``<export>.report`` not a report compressx wrote."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "the report's figures need matplotlib, which is not installed: pip install 'compressx[report]'"
    try:
        _check_target(Path(export_dir), default_report_dir(export_dir))
    except ReportError as err:
        return str(err)
    return None


def _set_permissions(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _leftovers(target: Path) -> Iterator[Path]:
    for kind in ("partial", "old"):
        yield from (p for p in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*") if p.is_dir())


def write_report(
    export_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    sample_prompts: list[str] | None = None,
    sample_steps: int = 30,
    seed: int = 0,
) -> Path:
    """Write the report of a verified export to ``out`` (default ``<export>.report``); returns ``report.html``.

    ``out`` may be absent, or a report compressx wrote and nobody changed since (replaced whole); anything else is
    refused with a ``ReportError`` before any work, as is a directory inside (or holding) the export.
    """
    export = Path(export_dir)
    target = Path(out) if out is not None else default_report_dir(export)
    _check_target(export, target)
    blocks = build_report(export, sample_prompts=sample_prompts, sample_steps=sample_steps, seed=seed)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target_lock(target, wait=False):
            for leftover in _leftovers(target):  # a killed run's; the lock says no live run owns it
                log.warning("removing %s, left by an interrupted report run", leftover)
                shutil.rmtree(leftover)
            _check_target(export, target)  # again, under the lock
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            try:
                _write_files(tmp, blocks, export)
                _set_permissions(tmp)
                fsync_tree(tmp)
                _commit(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except LockBusy as err:
        raise ReportError(f"another compressx run is writing {target} right now; wait for it") from err
    except OSError as err:
        raise ReportError(f"writing the report to {target} failed, nothing was changed there: {err}") from err
    log.info("report of %s written to %s", export, target / HTML_FILE)
    return target / HTML_FILE


def _write_files(tmp: Path, blocks: list[Block], export: Path) -> None:
    figures = [b for b in blocks if isinstance(b, Figure)]
    if figures:
        (tmp / FIGURES).mkdir()
    for fig in figures:
        (tmp / FIGURES / f"{fig.name}.png").write_bytes(fig.png)
    (tmp / HTML_FILE).write_text(render_html(blocks), encoding="utf-8")
    (tmp / MARKDOWN_FILE).write_text(render_markdown(blocks), encoding="utf-8")
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = {
        "compressx_report": REPORT_VERSION,
        "export": str(export),
        "export_manifest_sha256": hashlib.sha256((export / MANIFEST).read_bytes()).hexdigest(),
        "files": files,
    }
    (tmp / REPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _commit(tmp: Path, target: Path) -> None:
    """Move the finished report into place: a rename that replaces nothing, or a swap with the old report."""
    if not os.path.lexists(target):
        try:
            rename_noreplace(tmp, target)
        except FileExistsError as err:
            raise ReportError(f"{target} appeared while the report was being written; it was left alone") from err
    elif exchange(tmp, target):  # tmp now holds the old report (checked unchanged under the lock)
        shutil.rmtree(tmp)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        try:
            rename_noreplace(tmp, target)
        except BaseException:
            os.rename(old / target.name, target)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)
