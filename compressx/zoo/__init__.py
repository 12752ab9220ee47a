"""The offline proxy zoo: small models compressx trains itself, deterministically, from data every machine has.

No pretrained weights can be downloaded in many settings (CI, air-gapped clusters), so ``model: {source: zoo,
id: NAME}`` builds the member on first use (with a progress bar) and caches it under
``$COMPRESSX_CACHE/zoo/<name>/<key>/``, where the key holds the builder version, the Python version (the stdlib
corpus differs between them) and the corpus fingerprint. Later uses load it from there.

The cache directory is ``$COMPRESSX_CACHE``, else ``$XDG_CACHE_HOME/compressx``, else ``~/.cache/compressx``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from compressx.data import ByteTokenizer
from compressx.errors import CompressxError, unknown_name_message
from compressx.zoo import llama_byte, llama_byte_outlier, llava_digits, resnet_digits, sd_digits, vit_digits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooMember:
    name: str
    family: str
    description: str
    builder_version: int
    build_empty: Callable[[], Any]  # an nn.Module on the meta device; a pipeline member returns its config dict
    train: Callable[..., tuple[nn.Module, dict[str, Any]]]
    load: Callable[[str], nn.Module]
    tokenizer: Callable[[], Any]
    cache_salt: Callable[[], str]
    save: Callable[[nn.Module, Path], None] = lambda model, directory: model.save_pretrained(directory)


def _member(module: Any, family: str, tokenizer: Callable[[], Any] = lambda: None) -> ZooMember:
    """A zoo member from its builder module: NAME, BUILDER_VERSION, build_empty, train, load, cache_salt, and
    ``save`` when its model has no ``save_pretrained``."""
    return ZooMember(
        name=module.NAME,
        family=family,
        description=module.__doc__.strip().splitlines()[0],
        builder_version=module.BUILDER_VERSION,
        build_empty=module.build_empty,
        train=module.train,
        load=module.load,
        tokenizer=tokenizer,
        cache_salt=module.cache_salt,
        **({"save": module.save} if hasattr(module, "save") else {}),
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
    )
}


def get_member(name: str) -> ZooMember:
    if name not in MEMBERS:
        raise CompressxError(unknown_name_message("zoo model", name, MEMBERS))
    return MEMBERS[name]


def cache_root() -> Path:
    if os.environ.get("COMPRESSX_CACHE"):
        return Path(os.environ["COMPRESSX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressx"


def cache_dir(member: ZooMember) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / "zoo" / member.name / f"v{member.builder_version}-{py}-{member.cache_salt()}"


def load_zoo_model(name: str, progress: bool = True) -> tuple[Any, Any]:
    """The zoo member ``name`` (built and cached on first use) and its tokenizer."""
    member = get_member(name)
    target = cache_dir(member)
    if not (target / "build.json").is_file():
        log.info("zoo model %s is not cached; building it into %s", name, target)
        model, info = member.train(progress=progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            member.save(model, tmp)
            (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():  # a half-finished earlier build (no build.json): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        quality = {k: v for k, v in info.items() if k.startswith(("val_", "test_"))}
        log.info("built %s in %.0f s: %s", name, info["build_seconds"], quality)
    return member.load(str(target)), member.tokenizer()
