"""Export and reload: ``save(model, dir, result)`` and ``load(dir)``.

An export directory holds:

* the weights in safetensors — ``save_pretrained`` layout for transformers models (``config.json``,
  ``model.safetensors``), and ``model.safetensors`` + ``config.json`` (how to rebuild the module) for timm and
  plain torch modules; a diffusers pipeline's ``save_pretrained`` layout (one folder per component) for pipelines;
* ``recipe.yaml`` — the resolved recipe, when the export came from one;
* ``compressx.json`` — the manifest: format version; compressx / torch / transformers versions; every step's pass,
  config (with its version) and report; the eval results before and after; the runtime/pipeline passes to
  re-apply on load; and the SHA-256 of every file the model serialiser wrote;
* ``README.md`` — a model card generated from the manifest;
* ``sparse.safetensors`` — beside the unchanged dense weights, with ``sparse_format="bitmask"``: the sparse
  weight tensors packed as non-zero values plus a 1-bit-per-element mask; with ``sparse_format="nm"``: every N:M
  weight packed as its kept values plus their in-block indices (both in ``compressx.ops.packing``).

The manifest always records, under ``sparsity``, the fraction of exact zeros and the pattern (``"2:4"``, …, or
``"unstructured"``) of every floating-point ``*weight`` tensor of dimension >= 2 that has zeros.

The export is written to a temporary directory beside the target and renamed into place at the end, so an
interrupted run leaves nothing at the target; an existing target is replaced only with ``overwrite=True``.
``load`` verifies the hashes and refuses a corrupt file, a missing file or an unknown format version;
``load_sparse_state_dict`` does the same and returns the dense tensors unpacked from ``sparse.safetensors``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

import compressx
from compressx.errors import CompressxError, ExportError
from compressx.ops.packing import pack_bitmask, pack_nm, pack_zero_signs, unpack_bitmask, unpack_nm
from compressx.ops.sparsity import is_nm_sparse
from compressx.registry import get_pass, summarize_report

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "compressx.json"
REAPPLIED_KINDS = ("runtime", "pipeline")
SPARSE_FORMATS = ("none", "bitmask", "nm")
SPARSE_FILE = "sparse.safetensors"
# The N:M patterns a sparsity record can name, tightest first (by N/M, then by M: 1:4 implies 2:8).
NM_PATTERNS = ((1, 16), (1, 8), (2, 16), (1, 4), (2, 8), (4, 16), (2, 4), (4, 8), (8, 16))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    return {"compressx": compressx.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _write_weights(model: Any, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """Serialise the model into ``directory``; return the manifest's ``model`` entry."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        model.save_pretrained(directory, safe_serialization=True)
        return {"format": "transformers", "class": type(model).__name__}
    if _is_diffusers_pipeline(model):
        # Pipeline passes leave the weights alone; load() re-applies them to the pipeline saved here.
        base = getattr(type(model), "_compressx_base", type(model))
        model.save_pretrained(directory, safe_serialization=True)
        return {"format": "diffusers", "class": base.__name__, "dtype": str(model.dtype).removeprefix("torch.")}
    if not isinstance(model, nn.Module):
        raise ExportError(f"cannot export a {type(model).__name__}: expected a torch module or transformers model")
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    entry: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:  # rebuilt architectures start in float32: reload casts them back
        entry["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    if source and source.get("source") == "timm":
        entry.update(format="timm", architecture=source["id"], kwargs=source.get("kwargs", {}))
    elif source and source.get("source") == "zoo":
        entry.update(format="zoo", member=source["id"])
    else:
        entry.update(format="torch")
    (directory / "config.json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def _is_diffusers_pipeline(model: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(model, DiffusionPipeline)


def sparsity_entry(weight: torch.Tensor) -> dict[str, Any]:
    """The manifest's sparsity record of one weight: ``{"sparsity": <zero fraction>, "pattern": <pattern>}``.

    The pattern is the tightest of ``NM_PATTERNS`` that ``weight`` satisfies along its input dimension (OHWI for
    convs, as the pruning passes use) *and* whose sparsity ``1 - N/M`` is exactly the measured one (within 1e-9);
    otherwise ``"unstructured"``. So a 2:4 weight with one extra zero reads as unstructured.
    """
    sparsity = int((weight == 0).sum()) / weight.numel()
    pattern = "unstructured"
    for n, m in NM_PATTERNS:
        if abs((1 - n / m) - sparsity) <= 1e-9 and is_nm_sparse(weight, n, m):
            pattern = f"{n}:{m}"
            break
    return {"sparsity": round(sparsity, 6), "pattern": pattern}


def _sparse_weights(directory: Path, files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The saved tensors a sparsity record covers: floating point, named ``*weight``, dim >= 2, some zero."""
    from safetensors import safe_open

    for file in files:
        if not file.endswith(".safetensors"):
            continue
        with safe_open(str(directory / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if not name.endswith("weight"):
                    continue
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and tensor.dim() >= 2 and bool((tensor == 0).any()):
                    yield name, tensor


def _save_packed(packed: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, dense: int) -> dict[str, Any]:
    """Write packed tensors to ``path``; return the manifest's ``sparse_format`` entry (size against dense)."""
    from safetensors.torch import save_file

    save_file(packed, str(path), metadata=metadata)
    size = path.stat().st_size
    if not packed:
        log.warning(
            "sparse_format %s: no weight tensor qualifies, so %s packs nothing", metadata["sparse_format"], path
        )
    return {
        "format": metadata["sparse_format"],
        "file": path.name,
        "bytes": size,
        "dense_bytes": dense,
        "ratio": round(size / dense, 6) if dense else None,
    }


def _dense_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_packed(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Write ``tensors`` bitmask-packed to ``path``; return the manifest's ``sparse_format`` entry."""
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in tensors.items():
        packed[f"{name}.values"], packed[f"{name}.bitmask"] = pack_bitmask(tensor)
        signs = pack_zero_signs(tensor)
        if signs is not None:
            packed[f"{name}.zero_signs"] = signs
        shapes[name] = list(tensor.shape)
    metadata = {"sparse_format": "bitmask", "shapes": json.dumps(shapes)}
    return _save_packed(packed, metadata, path, _dense_bytes(tensors))


def _write_nm_packed(tensors: dict[str, torch.Tensor], patterns: dict[str, str], path: Path) -> dict[str, Any]:
    """Write the N:M tensors packed (values + in-block indices, ``ops.packing.pack_nm``); the manifest entry."""
    packed: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        n, m = (int(x) for x in patterns[name].split(":"))
        packed[f"{name}.values"], packed[f"{name}.indices"] = pack_nm(tensor, n, m)
        layout[name] = {"shape": list(tensor.shape), "pattern": patterns[name]}
    metadata = {"sparse_format": "nm", "layout": json.dumps(layout)}
    return {**_save_packed(packed, metadata, path, _dense_bytes(tensors)), "tensors": len(tensors)}


def _model_card(manifest: dict[str, Any]) -> str:
    lines = ["---", "library_name: compressx", "tags: [compressx, compression]", "---", ""]
    source = manifest.get("source") or {}
    lines += [f"# Compressed {manifest['model']['class']}", ""]
    if source:
        lines += [f"Base model: `{source.get('source')}:{source.get('id')}`.", ""]
    if manifest["model"].get("note"):
        lines += [f"Note: {manifest['model']['note']}.", ""]
    lines += ["Compressed with [compressx](https://github.com/compressx/compressx) by these steps:", ""]
    for i, step in enumerate(manifest["steps"]):
        brief = summarize_report(step["report"])
        lines.append(f"{i + 1}. `{step['pass']}` ({step['kind']}) with `{json.dumps(step['config'])}` — {brief}")
    ev = manifest.get("eval") or {}
    if ev.get("before") or ev.get("after"):
        lines += ["", "| metric | before | after |", "|---|---|---|"]
        for label in ev.get("after", {}):
            lines.append(
                f"| {label} | {ev.get('before', {}).get(label, float('nan')):.4f} | {ev['after'][label]:.4f} |"
            )
    lines += ["", "Reload with `compressx.load(dir)`; `compressx show dir` prints the manifest.", ""]
    return "\n".join(lines)


def save(
    model: Any,
    directory: str | os.PathLike,
    result: Any = None,
    *,
    recipe: Any = None,
    eval_results: dict[str, dict[str, float]] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    sparse_format: str = "none",
) -> str:
    """Export ``model`` (after ``compressx.apply``) to ``directory``; returns the directory.

    Args:
        model: the compressed model.
        directory: the export directory (created; must not exist unless ``overwrite``).
        result: the ``ApplyResult`` of ``compressx.apply``: its steps and reports go into the manifest, and its
            runtime passes are re-applied by ``load``.
        recipe: the ``Recipe`` the run came from, written as ``recipe.yaml``.
        eval_results: ``{"before": {...}, "after": {...}}`` metric values.
        tokenizer: saved beside the weights when it has ``save_pretrained`` (transformers tokenizers).
        overwrite: replace an existing directory.
        sparse_format: ``"none"`` (default), ``"bitmask"`` or ``"nm"``: also write ``sparse.safetensors``, the
            sparse weight tensors as non-zero values plus a bitmask, or the N:M ones as kept values plus in-block
            indices (see ``docs/export.md``; reload with ``load_sparse_state_dict``). The dense weights are
            written either way.
    """
    if sparse_format not in SPARSE_FORMATS:
        raise ExportError(f"sparse_format {sparse_format!r} is unknown; allowed: {', '.join(SPARSE_FORMATS)}")
    target = Path(directory)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    from compressx.training import IN_TRAINING

    modules = model.modules() if isinstance(model, nn.Module) else ()
    in_training = sorted({type(m).__name__ for m in modules if getattr(m, IN_TRAINING, False)})
    if in_training:
        raise ExportError(
            f"the model still holds training-pass modules ({', '.join(in_training)}): call handle.finalize() "
            "first, which writes the N:M weights into plain modules"
        )
    steps = result.steps if result is not None else []
    for step in steps:
        if step.kind in REAPPLIED_KINDS:
            try:
                get_pass(step.pass_name)
            except CompressxError as err:
                raise ExportError(
                    f"runtime pass '{step.pass_name}' is not registered by name, so load() could not re-apply it: "
                    "register it through the compressx.passes entry-point group"
                ) from err
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as err:
        raise ExportError(f"cannot write the export under {target.parent}: {err}") from err
    try:
        source = recipe.model.to_dict() if recipe is not None and recipe.model is not None else None
        from compressx.quant_export import has_quantizers, write_quantized

        write = write_quantized if has_quantizers(model) else _write_weights  # integer weights stored for real
        model_entry = write(model, tmp, source)
        # Relative paths: a diffusers pipeline saves one sub-directory per component.
        weight_files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        sparsity: dict[str, dict[str, Any]] = {}
        to_pack: dict[str, torch.Tensor] = {}
        for name, tensor in _sparse_weights(tmp, weight_files):
            sparsity[name] = sparsity_entry(tensor)
            if sparse_format == "bitmask" or (sparse_format == "nm" and sparsity[name]["pattern"] != "unstructured"):
                to_pack[name] = tensor
        packed_entry = None
        if sparse_format == "bitmask":
            packed_entry = _write_packed(to_pack, tmp / SPARSE_FILE)
        elif sparse_format == "nm":
            patterns = {name: sparsity[name]["pattern"] for name in to_pack}
            packed_entry = _write_nm_packed(to_pack, patterns, tmp / SPARSE_FILE)
        hashed = sorted([*weight_files, SPARSE_FILE]) if packed_entry else weight_files
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        elif tokenizer is not None:
            model_entry["tokenizer"] = getattr(tokenizer, "name", type(tokenizer).__name__)
        manifest = {
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_entry,
            "source": source,
            "steps": [
                {
                    "pass": s.pass_name,
                    "kind": s.kind,
                    "config": s.config.to_dict(),
                    "config_version": type(s.config).version,
                    "targets": s.targets,
                    "report": s.report,
                }
                for s in steps
            ],
            "reapply": [
                {
                    "pass": s.pass_name,
                    "config": (s.reapply_config or s.config).to_dict(),
                    "config_version": type(s.config).version,
                    "targets": s.targets or None,
                }
                for s in steps
                if s.kind in REAPPLIED_KINDS
            ],
            "eval": eval_results or {},
            "sparsity": sparsity,
            **({"sparse_format": packed_entry} if packed_entry else {}),
            "files": {name: _sha256(tmp / name) for name in hashed},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / "README.md").write_text(_model_card(manifest))
        _set_permissions(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise ExportError(f"writing the export to {target} failed: {err}") from err
        raise
    log.info("exported to %s (%d weight file(s))", target, len(weight_files))
    return str(target)


def _set_permissions(directory: Path) -> None:
    """Give the export the usual modes (mkdtemp and some serialisers create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export, checked for a known format version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not a compressx export: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is unreadable: {err}") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: unknown format_version {version!r}; this compressx reads version {FORMAT_VERSION}")
    return manifest


def verify(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
    """Check every recorded file exists and has its recorded SHA-256."""
    manifest = manifest or read_manifest(directory)
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise ExportError(f"{directory}: file '{name}' listed in {MANIFEST} is missing")
        actual = _sha256(path)
        if actual != expected:
            raise ExportError(
                f"{directory}: file '{name}' is corrupt (SHA-256 {actual[:12]}…, expected {expected[:12]}…)"
            )


def _read_weights(directory: Path, entry: dict[str, Any], model: nn.Module | None) -> Any:
    from safetensors.torch import load_model

    fmt = entry.get("format")
    if fmt == "quantized":
        from compressx.quant_export import read_quantized

        return read_quantized(directory, entry, model)
    if fmt == "transformers":
        import transformers

        cls = getattr(transformers, entry["class"], None)
        if cls is None:
            raise ExportError(f"this transformers has no class {entry['class']!r} to rebuild the model with")
        return cls.from_pretrained(directory).eval()
    if fmt == "diffusers":
        import diffusers

        # Components saved as absent (e.g. no safety checker) are passed as None, or from_pretrained refuses.
        index = json.loads((directory / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        dtype = getattr(torch, entry.get("dtype", "float32"))
        return diffusers.DiffusionPipeline.from_pretrained(directory, dtype=dtype, **absent)
    if fmt == "timm":
        import timm

        with torch.random.fork_rng():  # the init is overwritten by the weights: leave the caller's RNG alone
            model = timm.create_model(entry["architecture"], pretrained=False, **entry.get("kwargs", {}))
    elif fmt == "zoo":
        from compressx import zoo

        try:
            with torch.random.fork_rng():
                model = zoo.get_member(entry["member"]).build_empty()
        except CompressxError as err:
            raise ExportError(f"{directory}: {err}") from err
    elif fmt == "torch":
        if model is None:
            raise ExportError(
                f"{directory} holds a plain torch module ({entry.get('class')}); pass model=<an instance of it> "
                "to load the weights into"
            )
    else:
        known = "transformers, diffusers, timm, zoo, torch"
        raise ExportError(f"{directory}: unknown model format {fmt!r}; known: {known}")
    if fmt != "torch" and isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype):
        model = model.to(getattr(torch, entry["dtype"]))
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()


def load(directory: str | os.PathLike, *, model: nn.Module | None = None, progress: bool = False) -> Any:
    """Rebuild a compressed model from an export: verify hashes, load weights, re-apply runtime passes.

    Args:
        directory: an export written by ``compressx.save`` / ``compressx apply``.
        model: for exports of plain torch modules, an instance to load the weights into.
        progress: show progress bars while re-applying passes.
    """
    from compressx.api import apply

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify(directory, manifest)
    for entry in manifest.get("reapply", []):
        spec = get_pass(entry["pass"])
        if entry.get("config_version") != spec.config.version:
            raise ExportError(
                f"pass '{entry['pass']}' config version {entry.get('config_version')} in the export, but the "
                f"installed pass reads version {spec.config.version}"
            )
    try:
        rebuilt = _read_weights(directory, manifest["model"], model)
    except (OSError, RuntimeError, ValueError) as err:
        raise ExportError(f"{directory}: cannot rebuild the model: {err}") from err
    if manifest.get("reapply"):
        steps = [{"pass": e["pass"], "config": e["config"], "targets": e["targets"]} for e in manifest["reapply"]]
        apply(rebuilt, steps, progress=progress)
    return rebuilt


def load_sparse_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights packed in an export's ``sparse.safetensors``, unpacked (bit-identical to the dense ones).

    The export must have been saved with ``sparse_format="bitmask"`` or ``"nm"`` (the packed form is validated:
    sizes, index range, distinct positions). Every file's hash is verified first.
    Returns only the tensors listed in the manifest's ``sparsity`` record, keyed by their state-dict names.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    entry = manifest.get("sparse_format")
    if not entry:
        raise ExportError(
            f"{directory} has no packed sparse weights (it was saved with sparse_format 'none'); save it with "
            "sparse_format='bitmask' or 'nm' (recipe: export.sparse_format) to write them"
        )
    if entry.get("format") not in ("bitmask", "nm"):
        raise ExportError(
            f"{directory}: unknown sparse_format {entry.get('format')!r}; this compressx reads bitmask and nm"
        )
    if entry.get("file") not in manifest["files"]:
        raise ExportError(f"{directory}: the packed file {entry.get('file')!r} has no hash in {MANIFEST}")
    verify(directory, manifest)
    path = directory / entry["file"]
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            packed = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        if entry["format"] == "nm":
            layout = json.loads(metadata["layout"])
            return {
                name: unpack_nm(
                    packed[f"{name}.values"],
                    packed[f"{name}.indices"],
                    tuple(item["shape"]),
                    *(int(x) for x in item["pattern"].split(":")),
                )
                for name, item in layout.items()
            }
        shapes = json.loads(metadata["shapes"])
        return {
            name: unpack_bitmask(
                packed[f"{name}.values"],
                packed[f"{name}.bitmask"],
                tuple(shape),
                packed[f"{name}.values"].dtype,
                packed.get(f"{name}.zero_signs"),
            )
            for name, shape in shapes.items()
        }
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{path} is not a readable {entry['format']}-packed file: {err!r}") from err


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved with an export (a transformers tokenizer, or the zoo's byte tokenizer), or None."""
    manifest = read_manifest(directory)
    if manifest["model"].get("tokenizer") == "bytes":
        from compressx.data import ByteTokenizer

        return ByteTokenizer()
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError):
        return None
