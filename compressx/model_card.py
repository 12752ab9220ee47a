"""The model card (``README.md``) of an export, built with ``huggingface_hub.ModelCard``.

The front matter is ``ModelCardData``: ``base_model`` (the hub id when the model came from one), ``library_name``
(the library that loads the export without compressx: transformers, timm, diffusers), ``pipeline_tag``,
``license`` (the base model's, when it is known locally), ``tags`` (``compressx``, every pass, ``sparsity`` and
the N:M patterns found, ``quantization``) and ``model-index``: the recipe's metrics after compression (this model)
and before (the base model), as ``EvalResult``. The text says what was done, the resolved recipe, the eval table,
the size before and after, how to load the export with compressx and with the plain library, and the versions.

The card is built from what the export writes anyway: its manifest, the resolved recipe and the files' sizes; it
reads nothing from the network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from compressx.registry import summarize_report

log = logging.getLogger(__name__)

# Zoo members that are a published model (the rest are trained by compressx itself): (hub id, license).
ZOO_ORIGINS = {"smollm2_135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
# The pipeline tag of a model class, by the end of its name (transformers' naming convention).
_CLASS_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "image-text-to-text"),  # LLaVA, Qwen2-VL: the VLMs compressx supports
    ("ForImageTextToText", "image-text-to-text"),
)
_PIPELINE_TASKS = {"StableDiffusionPipeline": "text-to-image", "StableDiffusionXLPipeline": "text-to-image"}
_ZOO_TASKS = {"resnet_digits": "image-classification", "vit_digits": "image-classification"}
_METRIC_TASKS = {
    "perplexity": "text-generation",
    "top1": "image-classification",
    "vqa_accuracy": "visual-question-answering",
}


def library_name(model: dict[str, Any]) -> str:
    """The library that loads the export without compressx (``compressx`` when none does)."""
    fmt = model.get("format")
    if fmt == "quantized":
        return library_name(model.get("base") or {})
    return fmt if fmt in ("transformers", "timm", "diffusers") else "compressx"


def pipeline_tag(model: dict[str, Any], source: dict[str, Any]) -> str | None:
    fmt = model.get("format")
    if fmt == "quantized":
        return pipeline_tag(model.get("base") or {}, source)
    cls = str(model.get("class", ""))
    if fmt == "transformers":
        return next((task for suffix, task in _CLASS_TASKS if cls.endswith(suffix)), None)
    if fmt == "diffusers":
        return _PIPELINE_TASKS.get(cls, "text-to-image" if "Diffusion" in cls else None)
    if fmt == "timm":
        return "image-classification"
    if source.get("source") == "zoo":
        return _ZOO_TASKS.get(str(source.get("id")))
    return None


def _is_hub_id(value: str) -> bool:
    """``owner/name`` (or a bare name) that is not a local path."""
    parts = value.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not value.startswith((".", "~")) and not Path(value).exists()


def _local_license(path: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 (any unreadable card: the license is simply unknown)
        return None


def base_model_and_license(source: dict[str, Any]) -> tuple[str | None, str | None]:
    """The base model's hub id (None for a local directory or a model compressx trained) and its license, read
    from its model card when one is on this machine (the local directory, or the hub cache)."""
    kind, ident = source.get("source"), str(source.get("id", ""))
    if kind == "zoo":
        return ZOO_ORIGINS.get(ident, (None, None))
    if kind == "timm":
        if not source.get("pretrained", True):
            return None, None
        try:
            import timm

            hub_id = timm.models.get_pretrained_cfg(ident).hf_hub_id  # e.g. timm/resnet18.a1_in1k
        except Exception:  # noqa: BLE001 (an architecture without a pretrained config)
            hub_id = None
        return hub_id or None, _cached_license(hub_id) if hub_id else None
    if kind in ("hf", "diffusers"):
        if (Path(ident) / "README.md").is_file():
            return None, _local_license(Path(ident) / "README.md")
        if _is_hub_id(ident):
            return ident, _cached_license(ident)
    return None, None


def _cached_license(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "README.md")
    except Exception:  # noqa: BLE001 (a malformed id: no cached card)
        return None
    return _local_license(Path(path)) if isinstance(path, str) else None


def tags(manifest: dict[str, Any]) -> list[str]:
    out = ["compressx"]
    out += [step["pass"] for step in manifest.get("steps", [])]
    record = manifest.get("sparsity") or {}
    if any(entry["sparsity"] > 0 for entry in record.values()):
        out.append("sparsity")
        out += sorted({entry["pattern"] for entry in record.values() if entry["pattern"] != "unstructured"})
    if manifest["model"].get("format") == "quantized":
        out.append("quantization")
    if manifest.get("reapply"):
        out.append("runtime-pass")
    return list(dict.fromkeys(out))


def _metric_and_data(label: str) -> tuple[str, str]:
    """``"perplexity (stdlib_text/test, 64x256)"`` → ``("perplexity", "stdlib_text/test, 64x256")``."""
    metric, _, rest = label.partition(" (")
    return metric, rest.removesuffix(")") or "unknown"


def eval_results(manifest: dict[str, Any], task: str | None) -> list[Any]:
    """The recipe's metrics as ``EvalResult``: after compression (this model), then before (the base model)."""
    from huggingface_hub import EvalResult

    ev = manifest.get("eval") or {}
    results = []
    for when, suffix in (("after", ""), ("before", " (before compression)")):
        for label, value in (ev.get(when) or {}).items():
            metric, data = _metric_and_data(label)
            results.append(
                EvalResult(
                    task_type=task or _METRIC_TASKS.get(metric, "other"),
                    dataset_type=data.split("/")[0].split(",")[0],
                    dataset_name=data,
                    metric_type=metric,
                    metric_name=f"{label}{suffix}",
                    metric_value=value,
                )
            )
    return results


def _size_lines(manifest: dict[str, Any], file_sizes: dict[str, int]) -> list[str]:
    weights = sum(size for name, size in file_sizes.items() if name.endswith(".safetensors"))
    lines = [f"- weight files in this export: {_mib(weights)} ({len(file_sizes)} files in all)"]
    sizes = manifest["model"].get("sizes")
    if sizes:  # quantized
        lines.append(
            f"- quantized weights: {_mib(sizes['quantized_weight_bytes'])} against {_mib(sizes['fp32_bytes'])} in "
            f"float32 and {_mib(sizes['fp16_bytes'])} in float16 (ratio to float16 {sizes['ratio_to_fp16']})"
        )
    packed = manifest.get("sparse_format")
    if packed:
        lines.append(
            f"- sparse weights packed ({packed['format']}, `{packed['file']}`): {_mib(packed['bytes'])} against "
            f"{_mib(packed['dense_bytes'])} dense (ratio {packed.get('ratio')})"
        )
    elif manifest.get("sparsity"):
        lines.append(
            "- the pruned weights are stored dense (zeros included), so the files are as large as the base model's; "
            "export with `sparse_format: bitmask` or `nm` for a packed copy"
        )
    return lines


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def _plain_loading(manifest: dict[str, Any], file_sizes: dict[str, int]) -> list[str]:
    """How to load the export with its own library, without compressx."""
    model, fmt = manifest["model"], manifest["model"].get("format")
    if fmt == "quantized":
        model = model.get("base") or {}
        fmt = model.get("format")
    repo = 'repo = "USER/NAME"  # the hub repo, or the local export directory'
    if fmt == "transformers":
        extra = []
        if "processor_config.json" in file_sizes or "preprocessor_config.json" in file_sizes:
            extra = ["from transformers import AutoProcessor", "processor = AutoProcessor.from_pretrained(repo)"]
        elif "tokenizer.json" in file_sizes or "tokenizer_config.json" in file_sizes:
            extra = ["from transformers import AutoTokenizer", "tokenizer = AutoTokenizer.from_pretrained(repo)"]
        code = [repo, f"from transformers import {model['class']}", f"model = {model['class']}.from_pretrained(repo)"]
        return ["With transformers alone:", "", "```python", *code, *extra, "```"]
    if fmt == "timm":
        code = [
            "import timm",
            'model = timm.create_model("hf-hub:USER/NAME", pretrained=True)',
            '# a local export: timm.create_model("local-dir:path/to/export", pretrained=True)',
        ]
        return ["With timm alone:", "", "```python", *code, "```"]
    if fmt == "diffusers":
        code = [repo, "from diffusers import DiffusionPipeline", "pipe = DiffusionPipeline.from_pretrained(repo)"]
        return ["With diffusers alone:", "", "```python", *code, "```"]
    return ["This model is a plain torch module that only compressx rebuilds (its architecture is not in a library)."]


def render(manifest: dict[str, Any], recipe: dict[str, Any] | None = None, file_sizes: dict[str, int] | None = None):
    """The ``ModelCard`` of an export, from its manifest (``compressx.json``, ``files`` not needed), its resolved
    recipe and its files' sizes."""
    from huggingface_hub import ModelCard, ModelCardData

    file_sizes = file_sizes or {}
    model, source = manifest["model"], manifest.get("source") or {}
    base_model, license_ = base_model_and_license(source)
    task = pipeline_tag(model, source)
    name = f"{(source.get('id') or model['class']).split('/')[-1]}-compressx"
    results = eval_results(manifest, task)
    data = ModelCardData(
        base_model=base_model,
        library_name=library_name(model),
        pipeline_tag=task,
        license=license_,
        tags=tags(manifest),
        model_name=name if results else None,
        eval_results=results or None,
    )
    described = f"`{source.get('source')}:{source.get('id')}`" if source else f"A `{model['class']}`"
    lines = [
        f"# {name}",
        "",
        f"{described} compressed with [compressx](https://github.com/compressx/compressx).",
        "",
    ]
    if source.get("gguf_file"):
        lines += [f"The weights were read from the GGUF file `{source['gguf_file']}` and dequantized.", ""]
    if model.get("note"):
        lines += [f"Note: {model['note']}.", ""]
    lines += ["## What was done", ""]
    for i, step in enumerate(manifest.get("steps", [])):
        brief = summarize_report(step["report"])
        lines.append(f"{i + 1}. `{step['pass']}` ({step['kind']}) with `{json.dumps(step['config'])}`: {brief}")
    if not manifest.get("steps"):
        lines.append("No compression step (the model as given).")
    reapply = manifest.get("reapply") or []
    if reapply:
        names = ", ".join(f"`{e['pass']}`" for e in reapply)
        lines += [
            "",
            f"**Runtime pass(es) {names}**: they change how the model runs, not its weights. "
            "`compressx.load` applies them; a plain library loader gives the model without them (the saved "
            "`config.json` names them under `compressx`).",
        ]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    ev = manifest.get("eval") or {}
    if ev.get("after") or ev.get("before"):
        lines += ["", "## Evaluation", "", "| metric | before | after |", "|---|---|---|"]
        for label in dict.fromkeys([*ev.get("after", {}), *ev.get("before", {})]):
            before, after = ev.get("before", {}).get(label), ev.get("after", {}).get(label)
            show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {label} | {show(before)} | {show(after)} |")
    lines += ["", "## Size", "", *_size_lines(manifest, file_sizes)]
    lines += [
        "",
        "## How to load",
        "",
        "With compressx (verifies every file's SHA-256 and applies any runtime pass):",
        "",
        "```python",
        "import compressx",
        'model = compressx.load("path/to/export")  # a hub repo: huggingface_hub.snapshot_download("USER/NAME")',
        "```",
        "",
        *_plain_loading(manifest, file_sizes),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    lines += ["", "## Versions", "", versions, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def model_card_text(manifest: dict[str, Any]) -> str:
    """The card's text. ``manifest`` may carry the card's two other inputs under ``recipe`` (the resolved
    recipe) and ``file_sizes`` ({relative path: bytes})."""
    return str(render(manifest, manifest.get("recipe"), manifest.get("file_sizes")))
