"""The zoo's cache: where a member's build lives, checking it against its hashes, building it whole, loading it.

Apart from the member list (``compressx.zoo``) so that a member built on another member (``llava_smollm2_digits``
on ``smollm2_135m``) can load that one without importing the list it is part of.
"""

from __future__ import annotations

import dataclasses
import glob
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

from compressx.atomic import exchange, fsync_tree, rename_noreplace, sha256_file, target_lock

log = logging.getLogger(__name__)

HASHES = "sha256.json"


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
    # the tokenizer cached beside the weights (members whose tokenizer is data, not code); else ``tokenizer()``
    load_tokenizer: Callable[[str], Any] | None = None


def _member(module: Any, family: str, tokenizer: Callable[[], Any] = lambda: None) -> ZooMember:
    """A zoo member from its builder module: NAME, BUILDER_VERSION, build_empty, train, load, cache_salt, and
    ``save`` when its model has no ``save_pretrained`` (or it saves more), ``load_tokenizer`` when it caches one."""
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
        **({"load_tokenizer": module.load_tokenizer} if hasattr(module, "load_tokenizer") else {}),
    )


def cache_root() -> Path:
    if os.environ.get("COMPRESSX_CACHE"):
        return Path(os.environ["COMPRESSX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressx"


def cache_dir(member: ZooMember) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / "zoo" / member.name / f"v{member.builder_version}-{py}-{member.cache_salt()}"


def _cache_problem(target: Path) -> str | None:
    """Why the cached build in ``target`` cannot be used; None when every file has its recorded SHA-256."""
    if not target.is_dir():
        return "it is not cached"
    try:
        files = json.loads((target / HASHES).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {HASHES} (an interrupted build, or one by an older compressx)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        return f"its {HASHES} is unreadable ({err!r})"
    if not isinstance(files, dict) or not files:
        return f"its {HASHES} lists no files"
    for name, digest in files.items():
        path = target / str(name)
        if not path.is_file():
            return f"'{name}' is missing"
        if sha256_file(path) != digest:
            return f"'{name}' is corrupt (its SHA-256 differs from the recorded one)"
    return None


def _build(member: ZooMember, target: Path, progress: bool) -> None:
    """Train ``member`` and cache it at ``target`` (the caller holds the target's lock)."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if leftover.is_dir() and not leftover.is_symlink():  # a build killed earlier (the lock file is a file)
            log.warning("removing %s, left by an interrupted build", leftover)
            shutil.rmtree(leftover)
    model, info = member.train(progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        member.save(model, tmp)
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / HASHES).write_text(json.dumps({"files": files}, indent=2) + "\n")  # last: the build is complete
        fsync_tree(tmp)
        if not target.exists():
            rename_noreplace(tmp, target)
        elif exchange(tmp, target):  # tmp now holds the unusable build
            shutil.rmtree(tmp)
        else:  # no atomic swap here: a run killed in between finds no cache and builds again
            shutil.rmtree(target)
            rename_noreplace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quality = {k: v for k, v in info.items() if k.startswith(("val_", "test_"))}
    log.info("built %s in %.0f s: %s", member.name, info["build_seconds"], quality)


def load_member(member: ZooMember, progress: bool = True) -> tuple[Any, Any]:
    """The zoo member ``name`` (built and cached on first use, rebuilt when the cache fails its hashes) and its
    tokenizer."""
    name = member.name
    target = cache_dir(member)
    if _cache_problem(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with target_lock(target, wait=True):  # another process building it: wait, then use its build
            problem = _cache_problem(target)
            if problem == "it is not cached":
                log.info("zoo model %s is not cached; building it into %s", name, target)
            elif problem:
                log.warning("the cached zoo model %s in %s is unusable: %s; rebuilding it", name, target, problem)
            if problem:
                _build(member, target, progress)
    tokenizer = member.load_tokenizer(str(target)) if member.load_tokenizer else member.tokenizer()
    return member.load(str(target)), tokenizer
