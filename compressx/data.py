"""Data every machine has, and the data blocks of recipes.

Text sources give ``[samples, seq_len]`` token tensors, used as calibration data and by the perplexity metric:

* ``stdlib_text`` — the Python standard library's own ``.py`` files (without its test suites and
  site-packages), split **by file** into train / val / test with a hash of each file's relative path, so the
  split is fixed for a given Python version and needs no list shipped;
* ``text_file`` — a local UTF-8 text file (``path:``);
* ``text_files`` — several local text files (``paths:``, a list of paths or globs), joined in order;
* ``hf_dataset`` — a Hugging Face dataset the user has locally (``path:``, ``split:``, ``text_field:``,
  ``data_files:``); needs the optional ``datasets`` package.

Multimodal sources give prompts with images as model-input mappings (``load_calibration``), for passes and
metrics on multimodal LLMs:

* ``digits_vqa`` — visual questions about scikit-learn's digit images, in the word vocabulary of the zoo's
  ``llava_digits`` (``split:`` train / val / test; ``samples`` prompts, the four question kinds in turn); for
  ``llava_smollm2_digits`` (recognised by its tokenizer) ``Which digit is this?`` in SmolLM2's chat format;
* ``image_prompts`` — a local JSON-lines file (``path:``), one ``{"image": <file>, "prompt": <text with the
  model's image placeholder>}`` per line, run through the model's processor; the first ``samples`` lines.

A data block is ``{source, <source keys>, samples, seq_len, seed}``; ``samples`` windows of ``seq_len`` tokens
are drawn at random positions with ``seed``, so the same block always gives the same tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compressx.config import check_seed
from compressx.errors import CompressxError, ConfigError, DataError, unknown_key_message, unknown_name_message

SPLITS = ("train", "val", "test")
# Bounds that keep a data block's token tensor (samples × seq_len int64 ids) within memory: 2**28 ids are 2 GiB.
MAX_SAMPLES = 1_000_000
MAX_SEQ_LEN = 1 << 20
MAX_TOKENS = 1 << 28
_STDLIB_SPLIT_BYTES_AT_LEAST = 1 << 16  # every split of the stdlib corpus holds more (test, the smallest: ~650 KB)
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


def pydoc_split_of(topic: str) -> str:
    """The split a ``pydoc_data.topics`` topic belongs to: 10% test, 10% val, 80% train, by a hash of its name."""
    bucket = int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def pydoc_topics(split: str) -> list[str]:
    """The names of the ``pydoc_data.topics`` topics in ``split``, sorted."""
    from pydoc_data.topics import topics

    return sorted(name for name in topics if pydoc_split_of(name) == split)


def pydoc_text(split: str) -> str:
    """The prose of a split: its topics' texts joined in name order, separated by a blank line."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in pydoc_topics(split))


def pydoc_fingerprint() -> str:
    """SHA-256 over every topic's name, split and text: changes when ``pydoc_data.topics`` changes."""
    from pydoc_data.topics import topics

    digest = hashlib.sha256()
    for name in sorted(topics):
        digest.update(f"{pydoc_split_of(name)}:{name}:{hashlib.sha256(topics[name].encode()).hexdigest()}\n".encode())
    return digest.hexdigest()


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
        raise DataError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}: lower seq_len or add text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A recipe's data block (calibration data, or the data of an eval metric)."""

    source: str
    split: str | None = None
    path: str | None = None
    paths: tuple[str, ...] | None = None
    text_field: str | None = None
    data_files: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None
        }


def _read(path: str, key: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read text file {path!r}: {err}", path=key) from err


def _expand(patterns: tuple[str, ...]) -> list[str]:
    """Every file the paths / globs name, sorted within each pattern; a pattern matching nothing is an error."""
    files = []
    for i, pattern in enumerate(patterns):
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise ConfigError(f"{pattern!r} matches no file", path=f"paths[{i}]")
        files += found
    return files


def _hf_dataset_text(spec: DataSpec) -> str:
    """Documents of a local (or locally cached) Hugging Face dataset, shuffled with the seed, joined.

    Enough documents are taken to hold about 8 bytes per needed token, as the reference loaders draw random
    documents from one C4 shard. ``path`` may be a ``save_to_disk`` directory or anything ``load_dataset``
    takes (a local dataset directory, data files, or a hub name already in the local cache).
    """
    try:
        import datasets
    except ImportError as err:
        raise CompressxError("data source 'hf_dataset' needs the 'datasets' package: pip install datasets") from err
    try:
        if os.path.isfile(os.path.join(spec.path, "dataset_info.json")) or os.path.isfile(
            os.path.join(spec.path, "dataset_dict.json")
        ):
            data = datasets.load_from_disk(spec.path)
            data = data[spec.split or "train"] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(spec.path, data_files=spec.data_files, split=spec.split or "train")
    except Exception as err:  # datasets raises many types; the user needs the path and the cause
        raise CompressxError(f"cannot load dataset {spec.path!r}: {type(err).__name__}: {err}") from err
    field = spec.text_field or "text"
    if field not in data.column_names:
        raise ConfigError(f"dataset has no column {field!r}; columns: {', '.join(data.column_names)}", "text_field")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    needed, texts = spec.samples * spec.seq_len * 8, []
    for index in order:
        texts.append(data[index][field])
        needed -= len(texts[-1])
        if needed <= 0:
            break
    return "\n\n".join(texts)


# source name -> (keys allowed besides source/samples/seq_len/seed, required keys, text loader)
TEXT_SOURCES: dict[str, tuple[set[str], set[str], Callable[[DataSpec], str]]] = {
    "stdlib_text": ({"split"}, set(), lambda spec: stdlib_text(spec.split or "test")),
    "pydoc_text": ({"split"}, set(), lambda spec: pydoc_text(spec.split or "test")),
    "text_file": ({"path"}, {"path"}, lambda spec: _read(spec.path, "path")),
    "text_files": ({"paths"}, {"paths"}, lambda spec: "\n\n".join(_read(f, "paths") for f in _expand(spec.paths))),
    "hf_dataset": ({"path", "split", "text_field", "data_files"}, {"path"}, _hf_dataset_text),
}
_COMMON_KEYS = {"source", "samples", "seq_len", "seed"}
# multimodal source name -> (keys allowed besides source/samples/seq_len/seed, required keys); seq_len is unused
MULTIMODAL_SOURCES: dict[str, tuple[set[str], set[str]]] = {
    "digits_vqa": ({"split"}, set()),
    "image_prompts": ({"path"}, {"path"}),
}


def parse_data_spec(block: Any) -> DataSpec:
    """Validate a data block; errors carry the key path inside the block."""
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping with a 'source' key, got {block!r}")
    source = block.get("source")
    if not isinstance(source, str) or (source not in TEXT_SOURCES and source not in MULTIMODAL_SOURCES):
        allowed = [*TEXT_SOURCES, *MULTIMODAL_SOURCES]
        raise ConfigError(unknown_name_message("data source", str(source), allowed), path="source")
    extra, required = TEXT_SOURCES[source][:2] if source in TEXT_SOURCES else MULTIMODAL_SOURCES[source]
    for key in block:
        if key not in _COMMON_KEYS | extra:
            raise ConfigError(unknown_key_message(str(key), _COMMON_KEYS | extra), path=str(key))
    for key in required - set(block):
        raise ConfigError(f"data source '{source}' needs '{key}'", path=key)
    for key, most in (("samples", MAX_SAMPLES), ("seq_len", MAX_SEQ_LEN)):
        value = block.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ConfigError(f"got {value!r}; expected a positive integer <= {most:,}", path=key)
    tokens = block.get("samples", DataSpec.samples) * block.get("seq_len", DataSpec.seq_len)
    if source in TEXT_SOURCES and tokens > MAX_TOKENS:
        raise ConfigError(f"samples × seq_len = {tokens:,} tokens; at most {MAX_TOKENS:,} are allowed", path="samples")
    check_seed(block.get("seed", 0))
    for key in ("path", "split", "text_field", "data_files"):
        if key in block and not isinstance(block[key], str):
            raise ConfigError(f"got {block[key]!r}; expected a string", path=key)
    if source in ("stdlib_text", "pydoc_text", "digits_vqa") and block.get("split", "test") not in SPLITS:
        raise ConfigError(f"got {block['split']!r}; allowed: {', '.join(SPLITS)}", path="split")
    if source == "text_file" and not os.path.isfile(block["path"]):
        raise ConfigError(f"no such file {block['path']!r}", path="path")
    if source == "text_files":
        paths = block["paths"]
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list | tuple) or not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"got {paths!r}; expected a list of file paths or globs", path="paths")
        block = dict(block, paths=tuple(paths))
    spec = DataSpec(**block)
    _check_text_length(spec)
    return spec


def _check_text_length(spec: DataSpec) -> None:
    """Refuse a text source too short for one window of ``seq_len`` tokens, from file sizes alone.

    A token covers at least one byte (the zoo's byte-level tokenizer: exactly one), so a text of fewer bytes than
    ``seq_len`` can never fill a window. Subword tokenizers need more bytes; ``sample_windows`` checks exactly
    once the text is tokenised. ``hf_dataset`` sizes are known only after loading.
    """
    if spec.source == "text_file":
        files, key, joiner = [spec.path], "path", 0
    elif spec.source == "text_files":
        files, key, joiner = _expand(spec.paths), "paths", 2  # joined with a blank line
    elif spec.source == "stdlib_text" and spec.seq_len > _STDLIB_SPLIT_BYTES_AT_LEAST:
        files, key, joiner = stdlib_files(spec.split or "test"), "split", 1  # scanning the stdlib takes a second
    elif spec.source == "pydoc_text":
        text_bytes = len(pydoc_text(spec.split or "test").encode())
        if text_bytes < spec.seq_len:
            raise ConfigError(
                f"pydoc_text/{spec.split or 'test'} is {text_bytes:,} bytes, so at most {text_bytes:,} tokens: "
                f"fewer than seq_len={spec.seq_len:,}",
                path="seq_len",
            )
        return
    else:
        return
    text_bytes = sum(os.path.getsize(f) for f in files)
    if text_bytes == 0:
        raise ConfigError(f"{spec.path or list(spec.paths)!r}: empty, no text to draw windows from", path=key)
    text_bytes += joiner * (len(files) - 1)
    if text_bytes < spec.seq_len:
        raise ConfigError(
            f"the text is {text_bytes:,} bytes, so at most {text_bytes:,} tokens: fewer than seq_len={spec.seq_len:,}",
            path=key,
        )


def load_tokens(spec: DataSpec, tokenizer: Any) -> torch.Tensor:
    """The ``[samples, seq_len]`` token tensor a data block describes, tokenised with ``tokenizer.encode``."""
    text = TEXT_SOURCES[spec.source][2](spec)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return sample_windows(ids, spec.samples, spec.seq_len, spec.seed)


def parse_calibration_spec(block: Any) -> Any:
    """A calibration block: a text / multimodal ``DataSpec``, or an ``ImageDataSpec`` for an image source
    (``digits``, ``image_folder``: calibration images for post-training quantization of vision models)."""
    from compressx.images import IMAGE_SOURCES, parse_image_data_spec

    if isinstance(block, dict) and block.get("source") in IMAGE_SOURCES:
        return parse_image_data_spec(block)
    return parse_data_spec(block)


def load_calibration(spec: Any, tokenizer: Any) -> Any:
    """Calibration data of a block: a token tensor (text sources), a list of model inputs (multimodal ones) or an
    ``(image, label)`` dataset (image sources)."""
    from compressx.images import ImageDataSpec, image_dataset

    if isinstance(spec, ImageDataSpec):
        return image_dataset(spec)
    if spec.source == "digits_vqa":
        from compressx.zoo import llava_digits, llava_smollm2_digits

        if llava_smollm2_digits.is_its_tokenizer(tokenizer):  # its chat-format prompts, not llava_digits' words
            return llava_smollm2_digits.calibration_prompts(tokenizer, spec.split or "val", spec.samples, spec.seed)
        return llava_digits.calibration_prompts(spec.split or "val", spec.samples, spec.seed)
    if spec.source == "image_prompts":
        return image_prompts(spec, tokenizer)
    return load_tokens(spec, tokenizer)


def image_prompts(spec: DataSpec, processor: Any) -> list[dict[str, Any]]:
    """The first ``samples`` lines of a JSON-lines file of ``{image, prompt}``, each processed into model inputs."""
    import json

    from PIL import Image

    if processor is None or not callable(processor):
        raise CompressxError("data source image_prompts needs the model's processor (a transformers AutoProcessor)")
    base = Path(spec.path).parent
    lines = _read(spec.path, "path").splitlines()[: spec.samples]
    prompts = []
    for number, line in enumerate(lines):
        try:
            item = json.loads(line)
            image = Image.open(base / item["image"]).convert("RGB")
        except (json.JSONDecodeError, KeyError, OSError) as err:
            raise ConfigError(f"line {number + 1}: {type(err).__name__}: {err}", path="path") from err
        inputs = processor(images=image, text=item["prompt"], return_tensors="pt")
        prompts.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    return prompts
