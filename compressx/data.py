"""Data every machine has, and the data blocks of recipes.

Text sources give ``[samples, seq_len]`` token tensors, used as calibration data and by the perplexity metric:

* ``stdlib_text`` — the Python standard library's own ``.py`` files (without its test suites and
  site-packages), split **by file** into train / val / test with a hash of each file's relative path, so the
  split is fixed for a given Python version and needs no list shipped;
* ``text_file`` — a local UTF-8 text file (``path:``).

A data block is ``{source, split?, path?, samples, seq_len, seed}``; ``samples`` windows of ``seq_len`` tokens
are drawn at random positions with ``seed``, so the same block always gives the same tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compressx.errors import ConfigError, unknown_key_message, unknown_name_message

SPLITS = ("train", "val", "test")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the tokenizer of the zoo's byte-level language models."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split a stdlib file belongs to: 5% test, 5% val, 90% train, by a hash of its relative path."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def stdlib_files(split: str) -> list[Path]:
    """The stdlib source files of ``split``, sorted by relative path."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and split_of(rel.as_posix()) == split:
            files.append(path)
    return files


def stdlib_text(split: str) -> str:
    """The text of a split: its files joined in path order (undecodable bytes replaced)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    return "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_files(split))


def corpus_fingerprint() -> str:
    """SHA-256 over every file's relative path, split and size: changes when the stdlib corpus changes."""
    digest = hashlib.sha256()
    root = stdlib_root()
    for split in SPLITS:
        for path in stdlib_files(split):
            digest.update(f"{split}:{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from ``ids`` at random (seeded) start positions."""
    if ids.numel() < seq_len:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A recipe's data block (calibration data, or the data of an eval metric)."""

    source: str
    split: str | None = None
    path: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _read_text_file(spec: DataSpec) -> str:
    try:
        return Path(spec.path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read text file {spec.path!r}: {err}", path="path") from err


# source name -> (keys allowed besides source/samples/seq_len/seed, required keys, text loader)
TEXT_SOURCES: dict[str, tuple[set[str], set[str], Callable[[DataSpec], str]]] = {
    "stdlib_text": ({"split"}, set(), lambda spec: stdlib_text(spec.split or "test")),
    "text_file": ({"path"}, {"path"}, _read_text_file),
}
_COMMON_KEYS = {"source", "samples", "seq_len", "seed"}


def parse_data_spec(block: Any) -> DataSpec:
    """Validate a data block; errors carry the key path inside the block."""
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping with a 'source' key, got {block!r}")
    source = block.get("source")
    if source not in TEXT_SOURCES:
        raise ConfigError(unknown_name_message("data source", str(source), TEXT_SOURCES), path="source")
    extra, required, _ = TEXT_SOURCES[source]
    for key in block:
        if key not in _COMMON_KEYS | extra:
            raise ConfigError(unknown_key_message(str(key), _COMMON_KEYS | extra), path=str(key))
    for key in required - set(block):
        raise ConfigError(f"data source '{source}' needs '{key}'", path=key)
    for key in ("samples", "seq_len"):
        value = block.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"got {value!r}; expected a positive integer", path=key)
    seed = block.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"got {seed!r}; expected an integer", path="seed")
    if "split" in block and block["split"] not in SPLITS:
        raise ConfigError(f"got {block['split']!r}; allowed: {', '.join(SPLITS)}", path="split")
    if "path" in block and not os.path.isfile(str(block["path"])):
        raise ConfigError(f"no such file {block['path']!r}", path="path")
    return DataSpec(**block)


def load_tokens(spec: DataSpec, tokenizer: Any) -> torch.Tensor:
    """The ``[samples, seq_len]`` token tensor a data block describes, tokenised with ``tokenizer.encode``."""
    text = TEXT_SOURCES[spec.source][2](spec)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return sample_windows(ids, spec.samples, spec.seq_len, spec.seed)
