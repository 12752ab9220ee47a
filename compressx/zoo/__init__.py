"""The offline proxy zoo: small models compressx trains itself, deterministically, from data every machine has.

No pretrained weights can be downloaded in many settings (CI, air-gapped clusters), so ``model: {source: zoo,
id: NAME}`` builds the member on first use (with a progress bar) and caches it under
``$COMPRESSX_CACHE/zoo/<name>/<key>/``, where the key holds the builder version, the Python version (the stdlib
corpus differs between them) and the corpus fingerprint. Later uses load it from there.

A build is written into a temporary directory beside the key directory and renamed into place, with
``sha256.json`` (the SHA-256 of every other cached file) written last. Every use checks those hashes first: a
cache without ``sha256.json`` (an interrupted build, or one by a compressx before the hashes) or with a missing or
changed file is rebuilt, and the log says why. One build per member at a time: a second process waits for the
first (a lock file beside the key directory) and then uses its build.

The cache directory is ``$COMPRESSX_CACHE``, else ``$XDG_CACHE_HOME/compressx``, else ``~/.cache/compressx``.
"""

from __future__ import annotations

from typing import Any

from compressx.data import ByteTokenizer
from compressx.errors import CompressxError, unknown_name_message
from compressx.zoo import (
    llama_byte,
    llama_byte_outlier,
    llava_digits,
    llava_smollm2_digits,
    resnet_digits,
    sd_digits,
    smollm2,
    vit_digits,
)
from compressx.zoo.cache import (  # noqa: F401 (cache_dir, cache_root: as compressx.zoo has always offered them)
    ZooMember,
    _member,
    cache_dir,
    cache_root,
    load_member,
)

MEMBERS: dict[str, ZooMember] = {
    member.name: member
    for member in (
        _member(llama_byte, "llm", ByteTokenizer),
        _member(llama_byte_outlier, "llm", ByteTokenizer),
        _member(resnet_digits, "cnn"),
        _member(llava_digits, "mllm", llava_digits.WordTokenizer),
        _member(sd_digits, "diffusion"),
        _member(vit_digits, "vit"),
        _member(smollm2, "llm", smollm2.tokenizer),
        _member(llava_smollm2_digits, "mllm", llava_smollm2_digits.tokenizer),
    )
}


def get_member(name: str) -> ZooMember:
    if name not in MEMBERS:
        raise CompressxError(unknown_name_message("zoo model", name, MEMBERS))
    return MEMBERS[name]


def load_zoo_model(name: str, progress: bool = True) -> tuple[Any, Any]:
    """The zoo member ``name`` (built and cached on first use, rebuilt when the cache fails its hashes) and its
    tokenizer."""
    return load_member(get_member(name), progress)
