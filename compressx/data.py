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
from typing import Any, ClassVar, NamedTuple

import torch

from compressx.config import Block, option, pick_block, seed_option
from compressx.errors import CompressxError, ConfigError, DataError
from compressx.images import ImageDataSpec

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

    def as_transformers(self) -> Any:
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (what an export saves as
        ``tokenizer.json``, so ``AutoTokenizer`` loads it): byte-level, one token per byte, id = byte value."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # The byte-level pre-tokenizer turns every byte into one printable character: the vocabulary is keyed by it.
        byte_char = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the byte-level pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


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


class Source(NamedTuple):
    """A data source: what it is, the splits it has (None: any the dataset has), and, for text, its text."""

    doc: str
    splits: tuple[str, ...] | None
    load_text: Callable[[DataSpec], str] | None = None


TEXT_SOURCES: dict[str, Source] = {
    "stdlib_text": Source("the Python standard library's .py files", SPLITS, lambda s: stdlib_text(s.split or "test")),
    "pydoc_text": Source("English prose of pydoc_data.topics", SPLITS, lambda s: pydoc_text(s.split or "test")),
    "text_file": Source("a local UTF-8 text file (path)", None, lambda s: _read(s.path, "path")),
    "text_files": Source(
        "local text files (paths: files or globs), joined in order",
        None,
        lambda s: "\n\n".join(_read(f, "paths") for f in _expand(s.paths)),
    ),
    "hf_dataset": Source("a local Hugging Face dataset (needs the datasets package)", None, _hf_dataset_text),
}
# multimodal sources give model-input mappings (load_calibration); seq_len is unused
MULTIMODAL_SOURCES: dict[str, Source] = {
    "digits_vqa": Source("visual questions about scikit-learn's digits (zoo llava_digits)", SPLITS),
    "image_prompts": Source("a local JSON-lines file of {image, prompt} (path)", None),
}
_PATH_SOURCES = ("text_file", "hf_dataset", "image_prompts")


@dataclasses.dataclass(frozen=True)
class DataSpec(Block):
    """A recipe's data block of text or multimodal prompts (calibration data, or the data of an eval metric)."""

    tag: ClassVar[str] = "source"
    shape: ClassVar[str] = "{source: stdlib_text, split: train}"

    source: str = option(choices=(*TEXT_SOURCES, *MULTIMODAL_SOURCES), what="data source")
    split: str | None = option(None, only=("stdlib_text", "pydoc_text", "hf_dataset", "digits_vqa"))
    path: str | None = option(None, only=_PATH_SOURCES, needs=_PATH_SOURCES, expected="a path (a string)")
    paths: tuple[str, ...] | None = option(
        None, only=("text_files",), needs=("text_files",), nonempty=True, one_or_many=True,
        expected="a list of file paths or globs",
    )  # fmt: skip
    text_field: str | None = option(None, only=("hf_dataset",), doc="the column holding the text (default text)")
    data_files: str | None = option(None, only=("hf_dataset",))
    samples: int = option(128, ge=1, le=MAX_SAMPLES, expected=f"a positive integer <= {MAX_SAMPLES:,}")
    seq_len: int = option(512, ge=1, le=MAX_SEQ_LEN, expected=f"a positive integer <= {MAX_SEQ_LEN:,}")
    seed: int = seed_option()

    @classmethod
    def describe(cls, tag_value: str) -> str | None:
        return {**TEXT_SOURCES, **MULTIMODAL_SOURCES}[tag_value].doc

    def __post_init__(self) -> None:
        splits = {**TEXT_SOURCES, **MULTIMODAL_SOURCES}[self.source].splits
        if splits and (self.split or "test") not in splits:
            raise ConfigError(f"got {self.split!r}; allowed: {', '.join(splits)}", path="split")
        tokens = self.samples * self.seq_len
        if self.source in TEXT_SOURCES and tokens > MAX_TOKENS:
            raise ConfigError(f"samples × seq_len = {tokens:,} tokens; at most {MAX_TOKENS:,} are allowed", "samples")
        if self.source == "text_file" and not os.path.isfile(self.path):
            raise ConfigError(f"no such file {self.path!r}", path="path")
        _check_text_length(self)


parse_data_spec = DataSpec.from_dict  # the name callers know


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
    text = TEXT_SOURCES[spec.source].load_text(spec)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return sample_windows(ids, spec.samples, spec.seq_len, spec.seed)


CalibrationSpec = DataSpec | ImageDataSpec  # a calibration block: text, multimodal prompts or images, by source


def parse_calibration_spec(block: Any) -> DataSpec | ImageDataSpec:
    """A calibration block: a text / multimodal ``DataSpec``, or an ``ImageDataSpec`` for an image source
    (``digits``, ``image_folder``: calibration images for post-training quantization of vision models)."""
    return pick_block(block, (DataSpec, ImageDataSpec)).from_dict(block)


def load_calibration(spec: Any, tokenizer: Any) -> Any:
    """Calibration data of a block: a token tensor (text sources), a list of model inputs (multimodal ones) or an
    ``(image, label)`` dataset (image sources)."""
    from compressx.images import image_dataset

    if isinstance(spec, ImageDataSpec):
        return image_dataset(spec)
    if spec.source == "digits_vqa":
        from compressx.zoo import llava_digits, llava_smollm2_prompts

        if llava_smollm2_prompts.is_its_tokenizer(tokenizer):  # its chat-format prompts, not llava_digits' words
            return llava_smollm2_prompts.calibration_prompts(tokenizer, spec.split or "val", spec.samples, spec.seed)
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
