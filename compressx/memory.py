"""Handing freed CPU memory back to the OS, and counting what CPU tensors are alive (a diagnostic).

Layer-by-layer calibration (``compressx.layerwise``) calls ``release_freed_memory`` after each phase of a layer;
``live_cpu_tensor_bytes`` is what the offload tests and ``tools/trace_layerwise_memory.py`` measure with. Measured
in docs/results/offload_memory.md.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
import warnings
from collections.abc import Callable

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return memory that torch has freed to the OS, where glibc kept it in its heap (Linux only; a no-op elsewhere).

    glibc serves CPU tensors under its mmap threshold from its heap, and it raises that threshold (up to 32 MiB)
    each time a larger block is freed, so after a few layers the weight-sized temporaries of calibration and
    pruning all come from the heap. Freed heap pages stay resident unless trimmed, so the process can hold far
    more than its live tensors, more so as layers go by (measured in docs/results/offload_memory.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def live_cpu_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage still referenced from Python, each storage counted once: what streaming
    keeps alive, as opposed to what the allocator holds (``release_freed_memory``). A diagnostic; it walks every
    object the garbage collector tracks."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
