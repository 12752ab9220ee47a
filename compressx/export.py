"""Export and reload: ``save(model, dir, result)`` and ``load(dir)``.

An export directory holds:

* the weights in safetensors — ``save_pretrained`` layout for transformers models (``config.json``,
  ``model.safetensors``), and ``model.safetensors`` + ``config.json`` (how to rebuild the module) for timm and
  plain torch modules; a diffusers pipeline's ``save_pretrained`` layout (one folder per component) for pipelines;
* ``recipe.yaml`` — the resolved recipe, when the export came from one;
* ``compressx.json`` — the manifest: format version; compressx / torch / transformers versions; every step's pass,
  config (with its version) and report; the eval results before and after; the runtime/pipeline passes to
  re-apply on load; and the SHA-256 of every other file of the export (written last);
* ``README.md`` — a model card generated from the manifest;
* ``sparse.safetensors`` — beside the unchanged dense weights, with ``sparse_format="bitmask"``: the sparse
  weight tensors packed as non-zero values plus a 1-bit-per-element mask; with ``sparse_format="nm"``: every N:M
  weight packed as its kept values plus their in-block indices (both in ``compressx.ops.packing``).

The manifest always records, under ``sparsity``, the fraction of exact zeros and the pattern (``"2:4"``, …, or
``"unstructured"``) of every floating-point ``*weight`` tensor of dimension >= 2 that has zeros.

The export is written to a temporary directory beside the target and renamed into place at the end (swapped
with the old export in one step where the OS can), so the target holds a complete export or none, never a
part; ``overwrite=True`` replaces only a compressx export holding nothing but the files its manifest lists.
``load`` validates the manifest, verifies the hashes and reads only the files it verified, safetensors and JSON;
``load_sparse_state_dict`` does the same and returns the dense tensors unpacked from ``sparse.safetensors``.
docs/export.md states the guarantees and the trust model.

This module writes and reads the weights and moves the export into place; the manifest's shape, hashes and
verification are ``compressx.manifest``; the sparsity census and the packed formats ``compressx.sparse_export``.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError

from compressx._version import __version__
from compressx.atomic import LockBusy, exchange, fsync_dir, fsync_tree, rename_noreplace, sha256_file, target_lock
from compressx.engine import ApplyResult, StepResult, apply
from compressx.errors import CompressxError, ExportError
from compressx.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    file_entry_problem,
    inside_export,
    read_manifest,
    unlisted_files,
    verify,
    write_module_entry,
)
from compressx.pipelines import original_class
from compressx.registry import get_pass
from compressx.sparse_export import SPARSE_FORMATS, read_packed, write_sparse

if TYPE_CHECKING:  # the recipe format sits above export (it brings the model builders): for annotations only
    from compressx.recipe import Recipe

log = logging.getLogger(__name__)

REAPPLIED_KINDS = ("runtime", "pipeline")

_sha256 = sha256_file


def _versions() -> dict[str, str]:
    import transformers

    return {"compressx": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _write_weights(model: Any, directory: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """Serialise the model into ``directory``; return the manifest's ``model`` entry."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        model.save_pretrained(directory, safe_serialization=True)
        return {"format": "transformers", "class": type(model).__name__}
    if _is_diffusers_pipeline(model):
        # Pipeline passes leave the weights alone; load() re-applies them to the pipeline saved here.
        base = original_class(model)
        model.save_pretrained(directory, safe_serialization=True)
        return {"format": "diffusers", "class": base.__name__, "dtype": str(model.dtype).removeprefix("torch.")}
    if not isinstance(model, nn.Module):
        raise ExportError(f"cannot export a {type(model).__name__}: expected a torch module or transformers model")
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    # rebuilt architectures start in float32: reload casts them back
    dtype = {"dtype": str(dtypes.pop()).removeprefix("torch.")} if len(dtypes) == 1 else {}
    return write_module_entry(model, directory, source, **dtype)


def _is_diffusers_pipeline(model: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(model, DiffusionPipeline)


def _model_card(manifest: dict[str, Any]) -> str:
    """The model card (``compressx.model_card``); ``manifest`` also carries ``recipe`` and ``file_sizes``."""
    from compressx.model_card import model_card_text

    return model_card_text(manifest)


def save(
    model: Any,
    directory: str | os.PathLike,
    result: ApplyResult | None = None,
    *,
    recipe: Recipe | None = None,
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
        overwrite: replace an existing export: only a compressx export holding nothing but the files its
            manifest lists (or an empty directory) is replaced, anything else is refused (``overwrite_problem``).
        sparse_format: ``"none"`` (default), ``"bitmask"`` or ``"nm"``: also write ``sparse.safetensors``, the
            sparse weight tensors as non-zero values plus a bitmask, or the N:M ones as kept values plus in-block
            indices (see ``docs/export.md``; reload with ``load_sparse_state_dict``). The dense weights are
            written either way.
    """
    if sparse_format not in SPARSE_FORMATS:
        raise ExportError(f"sparse_format {sparse_format!r} is unknown; allowed: {', '.join(SPARSE_FORMATS)}")
    target = Path(directory)
    from compressx.training import InTrainingModule  # imported here: `import compressx` needs no training code

    modules = model.modules() if isinstance(model, nn.Module) else ()
    in_training = sorted({type(m).__name__ for m in modules if isinstance(m, InTrainingModule)})
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
        with target_lock(target, wait=False):
            digest, written = _save_locked(
                target,
                overwrite,
                lambda tmp: _write_export(model, tmp, steps, recipe, eval_results, tokenizer, sparse_format),
            )
    except LockBusy as err:
        raise ExportError(
            f"another compressx run is writing {target} right now; wait for it to finish, or choose another "
            "export directory"
        ) from err
    except OSError as err:  # creating the parent, the lock, or cleaning up after a killed run
        raise ExportError(f"cannot write the export under {target.parent}: {err}") from err
    log.info(
        "exported to %s (%d file(s)); %s SHA-256 %s (check a copy with: compressx verify DIR --expect <it>)",
        target,
        written,
        MANIFEST,
        digest,
    )
    return str(target)


def _save_locked(target: Path, overwrite: bool, write: Callable[[Path], int]) -> tuple[str, int]:
    """With the target's lock held: clean up after killed runs, check the target, write into a temporary
    directory with ``write`` and move it into place. Returns the manifest's SHA-256 and the number of files."""
    _recover(target)
    replace = os.path.lexists(target)
    if replace:
        if not overwrite:
            raise ExportError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        problem = overwrite_problem(target)
        if problem:
            raise ExportError(problem)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        written = write(tmp)
        digest = _sha256(tmp / MANIFEST)
        _set_permissions(tmp)
        fsync_tree(tmp)
        _commit(tmp, target, replace)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, SafetensorError)):  # full disk, file size limit, permissions, ...
            raise ExportError(f"writing the export to {target} failed, nothing was changed there: {err}") from err
        raise
    return digest, written


def _write_export(
    model: Any,
    tmp: Path,
    steps: list[StepResult],
    recipe: Recipe | None,
    eval_results: dict[str, dict[str, float]] | None,
    tokenizer: Any,
    sparse_format: str,
) -> int:
    """Write the whole export into ``tmp``, the manifest last; return the number of hashed files."""
    source = recipe.model.to_dict() if recipe is not None and recipe.model is not None else None
    from compressx.quant_export import has_quantizers, write_quantized

    write = write_quantized if has_quantizers(model) else _write_weights  # integer weights stored for real
    model_entry = write(model, tmp, source)
    # Relative paths: a diffusers pipeline saves one sub-directory per component.
    weight_files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    sparsity, packed_entry = write_sparse(tmp, weight_files, sparse_format)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    elif tokenizer is not None:
        model_entry["tokenizer"] = getattr(tokenizer, "name", type(tokenizer).__name__)
        if hasattr(tokenizer, "as_transformers"):  # zoo tokenizers: also as tokenizer.json, for AutoTokenizer
            tokenizer.as_transformers().save_pretrained(tmp)
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
    }
    if manifest["reapply"]:
        _name_runtime_passes(tmp, manifest["reapply"], model_entry)
    if recipe is not None:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
    card_inputs = {**manifest, "recipe": recipe.to_dict() if recipe is not None else None, "file_sizes": sizes}
    (tmp / "README.md").write_text(_model_card(card_inputs))
    # Every file but the manifest is hashed, so load can verify all it reads and overwrite knows what it wrote.
    files: dict[str, str] = {}
    for path in sorted(tmp.rglob("*")):
        name = path.relative_to(tmp).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ExportError(
                f"the serialiser wrote '{name}', which is not a plain file; compressx exports only files"
            )
        if path.is_file():
            problem = file_entry_problem(name)
            if problem:
                raise ExportError(f"the serialiser wrote {problem}")
            files[name] = _sha256(path)
    manifest["files"] = files
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return len(files)


def _name_runtime_passes(directory: Path, reapply: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """Runtime passes change the forward, not the weights, so a plain ``from_pretrained`` gives the model without
    them: the saved config (transformers, timm) names them under ``compressx``, with how to load them applied."""
    config = directory / "config.json"
    if entry.get("format") not in ("transformers", "timm") or not config.is_file():
        return
    data = json.loads(config.read_text())
    data["compressx"] = {
        "runtime_passes": [{"pass": e["pass"], "config": e["config"]} for e in reapply],
        "load_with": "compressx.load(<this directory>)",
        "note": "these passes change how the model runs and are not applied by a plain from_pretrained / "
        "create_model, which gives the model without them; compressx.load applies them",
    }
    config.write_text(json.dumps(data, indent=2) + "\n")


def _commit(tmp: Path, target: Path, replace: bool) -> None:
    """Move the finished export ``tmp`` to ``target``: the target holds the old export or the new one, whole.

    ``replace`` says whether ``target`` held an export (checked, and allowed to be replaced) when the run began.
    No target: a rename that fails, rather than replaces, when something appeared there meanwhile. An old export:
    swapped with the new in one step (``RENAME_EXCHANGE``); without that, the old one is moved aside to
    ``.<name>.old-*`` first and put back on failure, and a run killed between the two renames has it put back by
    the next run on this target (``_recover``).
    """
    if not replace:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError as err:
            raise ExportError(
                f"{target} appeared while the export was being written (another process?); it was left alone and "
                "the new export discarded"
            ) from err
        fsync_dir(target.parent)
        return
    if exchange(tmp, target):  # tmp now holds the old export
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        rename_noreplace(tmp, target)
    except BaseException:
        os.rename(old / target.name, target)
        old.rmdir()
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _leftovers(target: Path, kind: str) -> list[Path]:
    pattern = f".{glob.escape(target.name)}.{kind}-*"
    return sorted(p for p in target.parent.glob(pattern) if p.is_dir() and not p.is_symlink())


def _recover(target: Path) -> list[str]:
    """Clean up after runs on ``target`` that were killed (the caller holds the target's lock, so no live run
    owns them): put back an old export moved aside whose replacement never arrived, remove the rest. Logged;
    returns what was done."""
    done = []
    for old in _leftovers(target, "old"):
        kept = old / target.name
        if not os.path.lexists(target) and kept.is_dir() and _is_export(kept):
            os.rename(kept, target)
            done.append(f"restored the export {target} that an interrupted run had moved aside to {old}")
        shutil.rmtree(old)
        done.append(f"removed {old}, left by an interrupted run")
    for partial in _leftovers(target, "partial"):
        shutil.rmtree(partial)
        done.append(f"removed {partial}, left by an interrupted run")
    for line in done:
        log.warning("%s", line)
    return done


def recover_leftovers(target: str | os.PathLike) -> list[str]:
    """Clean up what killed runs left beside ``target`` (see ``_recover``), unless a run is writing it now."""
    target = Path(target)
    if not target.parent.is_dir() or not (_leftovers(target, "old") or _leftovers(target, "partial")):
        return []
    try:
        with target_lock(target, wait=False):
            return _recover(target)
    except LockBusy:
        log.info("another run is writing %s: its temporary directories are left alone", target)
    except OSError as err:
        log.warning("could not clean up beside %s: %s", target, err)
    return []


def _is_export(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except ExportError:
        return False
    return True


def overwrite_problem(target: str | os.PathLike) -> str | None:
    """Why ``target`` may not be replaced by a new export; None when it is absent, an empty directory, or a
    compressx export holding only the files its manifest lists. Used by ``save`` and by the recipe checks."""
    target = Path(target)
    refuse = "--overwrite (overwrite=True) replaces only a compressx export, and"
    keep = "nothing was changed; move or delete it yourself, or choose another export directory"
    if target.is_symlink():
        return f"{refuse} {target} is a symbolic link; {keep}"
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{refuse} {target} is a file; {keep}"
    if not any(target.iterdir()):  # an empty directory (made ready for the export) holds nothing to lose
        return None
    try:
        manifest = read_manifest(target)
    except ExportError as err:
        return f"{refuse} {err}; {keep}"
    try:
        unlisted = unlisted_files(target, manifest)
    except OSError as err:
        return f"{refuse} {target} cannot be listed ({err}); {keep}"
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        return (
            f"{refuse} {target} holds {len(unlisted)} file(s) its {MANIFEST} does not list ({shown}): compressx did "
            f"not write them and replacing the export would delete them; {keep}"
        )
    return None


def _set_permissions(directory: Path) -> None:
    """Give the export the usual modes (mkdtemp and some serialisers create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _verified_view(directory: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """A temporary directory holding links to the files the manifest lists, and nothing else: what the libraries'
    ``from_pretrained`` are pointed at, so they cannot read (or fall back to) a file that was not verified."""
    with tempfile.TemporaryDirectory(prefix="compressx-verified-") as view:
        for name in manifest["files"]:
            link = Path(view) / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(inside_export(directory, name), link)
        yield Path(view)


def _read_weights(view: Path, entry: dict[str, Any], model: nn.Module | None) -> Any:
    """Rebuild the model from ``view`` (a ``_verified_view``): safetensors only, never a fallback."""
    from safetensors.torch import load_model

    fmt = entry["format"]
    if fmt == "quantized":
        from compressx.quant_export import read_quantized

        return read_quantized(view, entry, model)
    if fmt == "transformers":
        import transformers

        cls = getattr(transformers, entry["class"], None)
        if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
            raise ExportError(f"this transformers has no model class {entry['class']!r} to rebuild the model with")
        return cls.from_pretrained(view, use_safetensors=True).eval()
    if fmt == "diffusers":
        import diffusers

        if not (view / "model_index.json").is_file():
            raise ExportError(f"{MANIFEST} lists no model_index.json, which a diffusers pipeline needs")
        # Components saved as absent (e.g. no safety checker) are passed as None, or from_pretrained refuses.
        index = json.loads((view / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
        dtype = getattr(torch, entry.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise ExportError(f"unknown dtype {entry.get('dtype')!r} in the model entry")
        return diffusers.DiffusionPipeline.from_pretrained(view, dtype=dtype, use_safetensors=True, **absent)
    if fmt == "timm":
        import timm

        if not isinstance(entry.get("architecture"), str):
            raise ExportError(
                f"the model entry of a timm export needs an architecture name, not {entry.get('architecture')!r}"
            )
        with torch.random.fork_rng():  # the init is overwritten by the weights: leave the caller's RNG alone
            model = timm.create_model(entry["architecture"], pretrained=False, **entry.get("kwargs", {}))
    elif fmt == "zoo":
        from compressx import zoo

        try:
            with torch.random.fork_rng():
                model = zoo.get_member(str(entry.get("member"))).build_empty()
        except CompressxError as err:
            raise ExportError(str(err)) from err
    elif fmt == "torch":
        if model is None:
            raise ExportError(
                f"it holds a plain torch module ({entry.get('class')}); pass model=<an instance of it> "
                "to load the weights into"
            )
    else:
        known = "transformers, diffusers, timm, zoo, torch"
        raise ExportError(f"unknown model format {fmt!r}; known: {known}")
    if fmt != "torch" and isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype):
        model = model.to(getattr(torch, entry["dtype"]))
    if not (view / "model.safetensors").is_file():
        raise ExportError(f"{MANIFEST} lists no model.safetensors to load the weights from")
    load_model(model, str(view / "model.safetensors"))
    return model.eval()


def load(
    directory: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    progress: bool = False,
    expect: str | None = None,
) -> Any:
    """Rebuild a compressed model from an export: verify hashes, load weights, re-apply runtime passes.

    Only the files the manifest lists, each verified against its SHA-256, are read, and weights only from
    safetensors: a file the manifest does not list is invisible to the loaders, never a fallback.

    Args:
        directory: an export written by ``compressx.save`` / ``compressx apply``.
        model: for exports of plain torch modules, an instance to load the weights into.
        progress: show progress bars while re-applying passes.
        expect: the SHA-256 of ``compressx.json`` you obtained separately (printed at export time): the export is
            refused unless its manifest has exactly that digest.
    """
    directory = Path(directory)
    manifest = verify(directory, read_manifest(directory, expect=expect))
    for entry in manifest.get("reapply", []):
        try:
            spec = get_pass(entry["pass"])
        except CompressxError as err:
            raise ExportError(f"{directory}: the export re-applies a pass this compressx lacks: {err}") from err
        if entry.get("config_version") != spec.config.version:
            raise ExportError(
                f"pass '{entry['pass']}' config version {entry.get('config_version')} in the export, but the "
                f"installed pass reads version {spec.config.version}"
            )
    try:
        with _verified_view(directory, manifest) as view:
            rebuilt = _read_weights(view, manifest["model"], model)
    except ExportError as err:
        raise ExportError(f"{directory}: cannot rebuild the model: {err}") from err
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, SafetensorError) as err:
        raise ExportError(f"{directory}: cannot rebuild the model: {err}") from err
    if manifest.get("reapply"):
        steps = [{"pass": e["pass"], "config": e["config"], "targets": e.get("targets")} for e in manifest["reapply"]]
        try:
            apply(rebuilt, steps, progress=progress)
        except CompressxError as err:
            raise ExportError(f"{directory}: re-applying the recorded passes failed: {err}") from err
    return rebuilt


def load_sparse_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights packed in an export's ``sparse.safetensors``, unpacked (bit-identical to the dense ones).

    The export must have been saved with ``sparse_format="bitmask"`` or ``"nm"`` (the packed form is validated:
    sizes, index range, distinct positions). Every file's hash is verified first.
    Returns only the tensors listed in the manifest's ``sparsity`` record, keyed by their state-dict names.
    """
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
    verify(directory, manifest)
    path = inside_export(directory, entry["file"])
    try:
        return read_packed(path, entry["format"])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{path} is not a readable {entry['format']}-packed file: {err!r}") from err


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved with an export (a transformers tokenizer, or the zoo's byte tokenizer), or None.

    Like ``load``, it reads only the files the manifest lists, verified against their SHA-256.
    """
    directory = Path(directory)
    manifest = verify(directory)
    if manifest["model"].get("tokenizer") == "bytes":
        from compressx.data import ByteTokenizer

        return ByteTokenizer()
    try:
        import transformers

        with _verified_view(directory, manifest) as view:
            return transformers.AutoTokenizer.from_pretrained(view)
    except (OSError, ValueError, KeyError, TypeError):
        return None
