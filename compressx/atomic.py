"""Filesystem primitives for writing directories whole or not at all: hashing, renames that never replace what
they should not, and one lock per target.

Used by ``compressx.export`` (exports) and ``compressx.zoo`` (the model cache). On Linux the renames use
``renameat2`` (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``) through libc; elsewhere, or on a filesystem without it,
they fall back as each function says.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking, see target_lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# renameat2 failed because the OS or the filesystem lacks it, not because of the paths: fall back.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class LockBusy(OSError):
    """Another process holds the lock (``target_lock(..., wait=False)``)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _libc_renameat2():  # noqa: ANN202 (a ctypes function or None)
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # no libc, or a glibc older than 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when this OS or filesystem does not support it (nothing happened)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (a plain rename would replace an empty
    directory or a file silently). Without ``RENAME_NOREPLACE`` the check and the rename are two steps."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (``RENAME_EXCHANGE``); False when unsupported (nothing happened)."""
    return _rename2(a, b, _RENAME_EXCHANGE)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` (and itself) to disk, so a rename of it that survives a
    power loss points at complete contents (on filesystems that honour fsync)."""
    for path in [*sorted(directory.rglob("*")), directory]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as err:  # some filesystems refuse fsync on directories
            if path.is_file():
                raise
            log.debug("fsync of %s: %s", path, err)
        finally:
            os.close(fd)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def target_lock(target: Path, *, wait: bool) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` (an exclusive ``flock``, released when the process dies, even by
    SIGKILL). ``wait=False`` raises LockBusy when another process holds it. The lock file is removed on release;
    a lock file left by a killed process is simply taken over. Without ``fcntl`` (not POSIX) nothing is locked.
    """
    if fcntl is None:
        yield
        return
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as err:
            os.close(fd)
            raise LockBusy(errno.EWOULDBLOCK, f"{path} is held by another process") from err
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file after we opened it: then lock the new one.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
