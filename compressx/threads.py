"""The torch thread count for tiny-model work: zoo builds and the small models' training and evaluation.

Torch defaults to one thread per core. The zoo's models are so small that a second thread saves little on an
idle machine, and on a shared one, where another process holds the other core, OpenMP threads wait on each other:
one ``llama_byte_1m`` training step took several times longer with 2 threads than with 1 (docs/results/
zoo_build.md). A fixed count also makes a zoo build bit-identical whatever the machine's core count, since the
order of float reductions depends on how many threads split them.

``COMPRESSX_NUM_THREADS``, else ``OMP_NUM_THREADS``, overrides the count (a build with another count may give other
last bits than the README's). The count is set only inside ``tiny_model_threads()``; the caller's setting is
restored on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from compressx.errors import CompressxError

TINY_MODEL_THREADS = 1
ENV_VARS = ("COMPRESSX_NUM_THREADS", "OMP_NUM_THREADS")


def tiny_model_thread_count() -> int:
    """``COMPRESSX_NUM_THREADS``, else ``OMP_NUM_THREADS``, else ``TINY_MODEL_THREADS``."""
    for name in ENV_VARS:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit() or int(value) < 1:
            raise CompressxError(f"{name}={value!r}: expected a whole number of threads >= 1")
        return int(value)
    return TINY_MODEL_THREADS


@contextlib.contextmanager
def tiny_model_threads() -> Iterator[int]:
    """Run the block with ``tiny_model_thread_count()`` torch threads, then restore the caller's count.

    Usable as a decorator too; the count is read from the environment each time the block is entered.
    """
    count = tiny_model_thread_count()
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
