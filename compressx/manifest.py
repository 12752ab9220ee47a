"""The manifest of an export, ``compressx.json``: its shape, its file hashes, and reading it back safely.

``validate_manifest`` checks a parsed manifest's version and shape (``MANIFEST_SCHEMA``) and its file entries;
``read_manifest`` reads and validates one (optionally against the SHA-256 the user was given);
``verify`` checks every listed file's hash, every path checked before any file is read.
``write_module_entry`` writes the manifest's ``model`` entry of a plain module (how to rebuild it).
docs/export.md states the guarantees and the trust model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch.nn as nn

from compressx.atomic import sha256_file
from compressx.errors import ExportError

FORMAT_VERSION = 1
MANIFEST = "compressx.json"

_sha256 = sha256_file

log = logging.getLogger(__name__)


def write_module_entry(
    model: nn.Module, directory: Path, source: dict[str, Any] | None, **fields: Any
) -> dict[str, Any]:
    """How to rebuild a plain module (not a transformers model): a timm architecture, a zoo member or the user's
    own class, plus ``fields``; written as ``config.json`` and returned as the manifest's ``model`` entry."""
    entry: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}", **fields}
    if source and source.get("source") == "timm":
        entry.update(format="timm", architecture=source["id"], kwargs=source.get("kwargs", {}))
    elif source and source.get("source") == "zoo":
        entry.update(format="zoo", member=source["id"])
    else:
        entry.update(format="torch")
    if entry["format"] == "timm" and _write_timm_config(model, directory, entry):
        return entry
    (directory / "config.json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def _write_timm_config(model: nn.Module, directory: Path, entry: dict[str, Any]) -> bool:
    """timm's own ``config.json`` (``save_config_for_hf``: architecture, num_classes, model_args, pretrained_cfg),
    so that ``timm.create_model("local-dir:<export>" / "hf-hub:<repo>", pretrained=True)`` rebuilds the model
    without compressx; compressx's entry lives in the manifest only. False when timm cannot describe the model."""
    from timm.models._hub import save_config_for_hf

    try:
        save_config_for_hf(model, str(directory / "config.json"), model_args=dict(entry.get("kwargs") or {}))
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # e.g. a model built without timm's factory
        log.warning("timm cannot write its config for %s (%s): config.json holds compressx's entry", entry, err)
        return False
    return True


# The manifest's shape. A dict schema lists required keys ("?key": optional); {str: X} maps any key to X;
# [X] is a list of X; a tuple is a union; NUMBER is an int or float (never a bool, nor a bool an int).
NUMBER = "number"
_STEP = {"pass": str, "kind": str, "config": dict, "?config_version": int, "targets": [str], "report": dict}
_REAPPLY = {"pass": str, "config": dict, "?config_version": int, "?targets": (type(None), [str])}
MANIFEST_SCHEMA: dict[Any, Any] = {
    "format_version": int,
    "versions": {str: str},
    "?created": str,
    "model": {
        "format": str,
        "class": str,
        "?tokenizer": str,
        "?dtype": str,
        "?architecture": str,
        "?kwargs": dict,
        "?member": str,
    },
    "?source": (type(None), dict),
    "steps": [_STEP],
    "?reapply": [_REAPPLY],
    "?eval": {str: {str: NUMBER}},
    "?sparsity": {str: {"sparsity": NUMBER, "pattern": str}},
    "?sparse_format": {
        "format": str,
        "file": str,
        "bytes": int,
        "dense_bytes": int,
        "?ratio": (type(None), NUMBER),
        "?tensors": int,
    },
    "files": {str: str},
}
# The files an export may hold: safetensors weights, JSON, text (tokenizers, card, recipe); never a pickle.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".yaml", ".model", ".jinja", ".tiktoken")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _schema_problems(value: Any, schema: Any, where: str) -> list[str]:
    if isinstance(schema, tuple):
        tried = [_schema_problems(value, option, where) for option in schema]
        return [] if any(not t for t in tried) else tried[-1]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where} must be a list, not {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in _schema_problems(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where} must be an object, not {type(value).__name__}"]
        if str in schema:
            return [p for k, v in value.items() for p in _schema_problems(v, schema[str], f"{where}.{k}")]
        problems = []
        for key, sub in schema.items():
            name = key.removeprefix("?")
            if name in value:
                problems += _schema_problems(value[name], sub, f"{where}.{name}" if where else name)
            elif not key.startswith("?"):
                problems.append(f"{where + '.' if where else ''}{name} is missing")
        return problems
    if schema == NUMBER:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where} must be a number, not {type(value).__name__}"]
    ok = isinstance(value, schema) and (schema is bool or not isinstance(value, bool))
    return (
        []
        if ok
        else [f"{where} must be {'null' if schema is type(None) else schema.__name__}, not {type(value).__name__}"]
    )


def file_entry_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file entry of an export: only relative paths inside it, no pickle formats."""
    parts = name.split("/")
    if not name or "\\" in name or "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return (
            f"'{name}', which is not a plain relative path inside the export (no '..', '.', '//', '\\' or leading '/')"
        )
    if name == MANIFEST:
        return f"'{name}', which is the manifest itself"
    if not name.endswith(ALLOWED_SUFFIXES):
        return f"'{name}', which is not a safetensors, JSON or text file (allowed: {', '.join(ALLOWED_SUFFIXES)})"
    return None


def validate_manifest(manifest: Any, source: str) -> dict[str, Any]:
    """Check a parsed manifest's version and shape (``MANIFEST_SCHEMA``) and its file entries; one ExportError
    naming the problems. ``load``, ``show`` and ``verify`` all read manifests through this."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is not int or version != FORMAT_VERSION:  # True == 1 and 1.0 == 1 in Python: not here
        raise ExportError(
            f"{source}: unknown format_version {version!r}; this compressx reads version {FORMAT_VERSION}"
        )
    problems = _schema_problems(manifest, MANIFEST_SCHEMA, "")
    if not problems:
        for name, digest in manifest["files"].items():
            problem = file_entry_problem(name)
            if problem:
                problems.append(f"files lists {problem}")
            elif not _SHA256.fullmatch(digest):
                problems.append(f"files.{name} is not a SHA-256 (64 lowercase hex digits)")
        packed = manifest.get("sparse_format")
        if packed and packed["file"] not in manifest["files"]:
            problems.append(f"the packed file {packed['file']!r} has no hash in files")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{source} is malformed: {shown}")
    return manifest


def manifest_digest(directory: str | os.PathLike) -> str:
    """The SHA-256 of an export's ``compressx.json``: what ``compressx verify DIR --expect`` compares."""
    return _sha256(Path(directory) / MANIFEST)


def read_manifest(directory: str | os.PathLike, *, expect: str | None = None) -> dict[str, Any]:
    """The manifest of an export, validated (``validate_manifest``). With ``expect``, its SHA-256 must be that."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not a compressx export: {MANIFEST} is missing")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"{path} is unreadable: {err}") from err
    if expect is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expect.strip().lower():
            raise ExportError(
                f"{path} has SHA-256 {actual}, not the expected {expect.strip()}: this is not the export you were "
                "given (or it was changed since)"
            )
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        kind = "too deeply nested" if isinstance(err, RecursionError) else str(err)
        raise ExportError(f"{path} is unreadable: not a UTF-8 JSON document ({kind})") from None
    return validate_manifest(manifest, str(path))


def inside_export(directory: Path, name: str) -> Path:
    """``directory / name``, refused when it resolves (through links) outside ``directory``."""
    root = directory.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(root):
        raise ExportError(f"{directory}: file '{name}' listed in {MANIFEST} leads outside the export (to {path})")
    return path


def verify(
    directory: str | os.PathLike, manifest: dict[str, Any] | None = None, *, expect: str | None = None
) -> dict[str, Any]:
    """Check that every file the manifest lists lies inside the export, exists and has its recorded SHA-256;
    return the manifest. Every path is checked before any file is read."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory, expect=expect)
    paths = {name: inside_export(directory, name) for name in manifest["files"]}
    for name, path in paths.items():
        if not path.is_file():
            raise ExportError(f"{directory}: file '{name}' listed in {MANIFEST} is missing")
    for name, path in paths.items():
        actual = _sha256(path)
        expected = manifest["files"][name]
        if actual != expected:
            raise ExportError(
                f"{directory}: file '{name}' is corrupt (SHA-256 {actual[:12]}…, expected {expected[:12]}…)"
            )
    return manifest


def unlisted_files(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    """The files under an export that its manifest (read from it unless given) does not list (``load`` never
    reads them)."""
    return _unlisted_files(Path(directory), manifest or read_manifest(directory))


def _unlisted_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Files (and links) under ``directory`` that its manifest does not list, the manifest itself aside."""
    listed = set(manifest["files"]) | {MANIFEST}
    found = []
    for root, dirs, names in os.walk(directory):
        rel = Path(root).relative_to(directory)
        found += [(rel / n).as_posix() for n in names]
        found += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(name for name in found if name not in listed)
