"""Resumable long work: atomic checkpoints of safetensors plus JSON, in a directory compressx owns.

Used by the built-in trainer (``train.checkpoint``: one checkpoint every N epochs, the last complete one kept)
and by layer-by-layer calibration (a recipe's top-level ``checkpoint``: one entry per pruned decoder layer).

A checkpoint directory holds a marker, ``compressx-checkpoint.json`` (format, version, the fingerprint of the
run that writes there), and entries: one folder each (``epoch-0003``, ``step-00-layer-0012``) with
``tensors.safetensors`` and ``state.json`` (the JSON state, the SHA-256 of the tensors file, and the digest of
the model/data the entry was computed from). An entry is written into ``.tmp-<name>-<pid>`` beside it, every
file and the folder are fsynced, then it is renamed into place: an entry is complete or absent, never half
written. Nothing is ever pickled; loading verifies the tensors file's hash before reading it.

Rules: compressx writes only into a directory that is new, empty, or already marked as a checkpoint directory,
and deletes only its own entries and temp folders there. A directory holding entries is refused unless the
run resumes (``--resume``), and resuming is refused when the fingerprint differs (another recipe, model or
config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from compressx.config import Block, option
from compressx.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "compressx-checkpoint.json"
FORMAT = "compressx-checkpoint"
FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
_ENTRY = re.compile(r"^(epoch-\d{4,}|step-\d{2,}-layer-\d{4,})$")
_TEMP = re.compile(r"^\.tmp-(epoch-\d{4,}|step-\d{2,}-layer-\d{4,})-\d+$")
_MARKER_TEMP = re.compile(rf"^\.{re.escape(MARKER)}\.tmp-\d+$")


@dataclasses.dataclass(frozen=True)
class LayerCheckpointSpec(Block):
    """A recipe's top-level ``checkpoint:`` block: where layer-by-layer steps save each pruned layer."""

    shape: ClassVar[str] = "{dir: ckpt/run}"

    dir: str = option(nonempty=True, expected="a directory path (a non-empty string)")


@dataclasses.dataclass(frozen=True)
class CheckpointSpec(LayerCheckpointSpec):
    """A ``train.checkpoint:`` block: where checkpoints go, and every how many epochs they are written."""

    every: int = option(1, ge=1, expected="an integer >= 1 (epochs between checkpoints)")


parse_checkpoint_spec = CheckpointSpec.from_dict  # the name callers know


def json_digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes. A tensor on the meta device (offloaded weights) counts by
    name, dtype and shape only."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type != "meta":
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """The digest of a model's ``state_dict``: what a checkpoint was computed from."""
    return tensor_digest(model.state_dict().items())


def split_tensors(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (under keys starting with ``prefix``).

    Dicts with non-string keys, tuples and numpy arrays are tagged so that ``join_tensors`` rebuilds them
    exactly (an optimizer's state is keyed by ints; Python's RNG state must be a tuple).
    """
    if isinstance(value, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: split_tensors(v, prefix, tensors) for k, v in value.items()}
        return {
            "__items__": [
                [split_tensors(k, prefix, tensors), split_tensors(v, prefix, tensors)] for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(v, prefix, tensors) for v in value]}
    if isinstance(value, list):
        return [split_tensors(v, prefix, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"cannot checkpoint a {type(value).__name__} (only tensors, arrays and JSON values)")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split_tensors``."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        if "__items__" in value:
            return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(join_tensors(v, tensors) for v in value["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a compressx checkpoint directory, or None when ``path`` has no valid one."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("format") != FORMAT
        or not isinstance(marker.get("fingerprint"), dict)
    ):
        return None
    return marker


def _is_ours(path: Path, pattern: re.Pattern) -> bool:
    """Whether ``path`` is something compressx wrote in a checkpoint directory: an entry or temp folder (named so,
    holding only checkpoint files) or a temp marker file. Anything else there is left alone."""
    if path.is_symlink() or not pattern.match(path.name):
        return False
    if pattern is _MARKER_TEMP:
        return path.is_file()
    return path.is_dir() and set(os.listdir(path)) <= {TENSORS, STATE}


def check_checkpoint_dir(directory: str | os.PathLike) -> str | None:
    """Why compressx may not write checkpoints into ``directory``, or None (new, empty, or a checkpoint dir)."""
    path = Path(directory)
    if not path.exists():
        parent = path.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            return f"cannot create {path}: {parent} is not a writable directory"
        return None
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    # A temp marker alone is what a kill during the very first open leaves: the directory is still compressx's.
    if any(not _is_ours(p, _MARKER_TEMP) for p in path.iterdir()) and _read_marker(path) is None:
        return (
            f"{path} is not empty and is not a compressx checkpoint directory (no valid {MARKER}); compressx writes "
            "checkpoints only into a new or empty directory or one it created: choose another"
        )
    return None


class CheckpointDir:
    """A checkpoint directory for one run, identified by ``fingerprint`` (part name -> digest).

    ``open(resume)`` creates or verifies it; ``write``/``read``/``remove`` handle entries.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str]) -> None:
        self.path = Path(directory)
        self.fingerprint = dict(fingerprint)

    def entries(self, prefix: str = "") -> list[str]:
        """Names of the complete entries starting with ``prefix``, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name.startswith(prefix) and _is_ours(p, _ENTRY))

    def open(self, resume: bool) -> None:
        """Create the directory (with its marker) or check it: refuse a foreign directory, entries without
        ``resume``, and, with ``resume``, entries of another run. Leftover temp folders of killed writes go."""
        problem = check_checkpoint_dir(self.path)
        if problem:
            raise CheckpointError(f"checkpoint dir: {problem}")
        marker = _read_marker(self.path) if self.path.exists() else None
        entries = self.entries() if marker else []
        if entries and not resume:
            raise CheckpointError(
                f"checkpoint dir {self.path} holds checkpoints of an earlier run ({entries[-1]}, …): pass --resume to "
                "continue it, or choose another checkpoint dir (delete this one yourself if you no longer need it)"
            )
        if entries:
            differs = sorted(k for k in set(self.fingerprint) | set(marker["fingerprint"])
                             if self.fingerprint.get(k) != marker["fingerprint"].get(k))  # fmt: skip
            if differs:
                raise CheckpointError(
                    f"--resume: the checkpoints in {self.path} belong to another run: recipe block(s) "
                    f"{', '.join(differs)} differ from that run's. Resume with the same recipe and overrides, or "
                    "choose another checkpoint dir"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.iterdir():
            if _is_ours(leftover, _TEMP) or _is_ours(leftover, _MARKER_TEMP):
                log.info("removing %s, which a killed run left half written", leftover)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if not entries:
            temp = self.path / f".{MARKER}.tmp-{os.getpid()}"
            _write_json(temp, {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint})
            os.replace(temp, self.path / MARKER)
            _fsync(self.path)

    def write(self, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write entry ``name`` atomically: temp folder, fsync, rename into place (replacing an older entry of
        the same name, which compressx wrote)."""
        from safetensors.torch import save_file

        if not _ENTRY.match(name):
            raise ValueError(f"bad checkpoint entry name {name!r}")
        temp = self.path / f".tmp-{name}-{os.getpid()}"
        if _is_ours(temp, _TEMP):
            shutil.rmtree(temp)
        temp.mkdir()
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(temp / TENSORS))
            _fsync(temp / TENSORS)
            _write_json(temp / STATE, {"state": state, "tensors_sha256": _sha256_file(temp / TENSORS)})
            _fsync(temp)
            final = self.path / name
            if _is_ours(final, _ENTRY):  # an entry of the same name (a resumed run redoing it): compressx's own
                shutil.rmtree(final)
            os.rename(temp, final)
            _fsync(self.path)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and JSON state of entry ``name``, read only after the tensors file's hash matched."""
        from safetensors.torch import load_file

        folder = self.path / name
        try:
            meta = json.loads((folder / STATE).read_text(encoding="utf-8"))
            expected = meta["tensors_sha256"]
            state = meta["state"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {folder} is unreadable ({err}); choose another checkpoint dir") from err
        if _sha256_file(folder / TENSORS) != expected:
            raise CheckpointError(f"checkpoint {folder}: {TENSORS} does not match its recorded SHA-256 (corrupted)")
        return load_file(str(folder / TENSORS)), state

    def remove(self, name: str) -> None:
        """Delete entry ``name`` if it is one compressx wrote (named so, holding only checkpoint files)."""
        if _is_ours(self.path / name, _ENTRY):
            shutil.rmtree(self.path / name)


@dataclasses.dataclass
class LayerCheckpoints:
    """Per-layer checkpoints of one layer-by-layer calibration step (``compressx.layerwise``).

    ``identity`` says what the step is (its index, pass, config, and the dense weights a refining pass starts
    from); ``begin`` adds the model's weights, the calibration data and the targets to form the step's digest,
    which every entry records and a resumed entry must match.
    """

    store: CheckpointDir
    step: int
    identity: dict[str, Any]
    resume: bool
    digest: str | None = None
    restoring: bool = True

    def begin(self, model: torch.nn.Module, tokens: torch.Tensor, targets: Iterable[str]) -> None:
        data = tensor_digest([("tokens", torch.as_tensor(tokens))])
        self.digest = json_digest([self.identity, model_digest(model), data, sorted(targets)])

    def _name(self, layer: int) -> str:
        return f"step-{self.step:02d}-layer-{layer:04d}"

    def load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]] | None:
        """The saved pruned weights (names relative to the layer), pass info and uncalibrated expert slices of
        ``layer``, or None when the run does not resume, the layer has no entry, or an earlier layer was computed
        afresh."""
        if not (self.resume and self.restoring):
            return None
        if self._name(layer) not in self.store.entries(self._name(layer)):
            self.restoring = False
            return None
        tensors, state = self.store.read(self._name(layer))
        if state.get("digest") != self.digest:
            raise CheckpointError(
                f"--resume: {self.store.path / self._name(layer)} was computed from another model, calibration data "
                "or step config than this run's step "
                f"{self.step}; resume with the same recipe, or choose another checkpoint dir"
            )
        return tensors, state.get("info") or {}, list(state.get("uncalibrated") or [])

    def save(
        self, layer: int, weights: dict[str, torch.Tensor], info: dict[str, Any] | None, uncalibrated: list[str] = ()
    ) -> None:
        state = {"kind": "layer", "step": self.step, "layer": layer, "digest": self.digest, "info": info or {}}
        if uncalibrated:  # expert slices no calibration token reached (``compressx.layerwise``), for the report
            state["uncalibrated"] = list(uncalibrated)
        self.store.write(self._name(layer), weights, state)
