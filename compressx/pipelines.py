"""The class of a diffusers pipeline that a pipeline pass patched, and the link back to its original class.

A pipeline pass (``cutdiffusion``, ``multidiffusion``) changes how a pipeline samples by swapping the pipeline
object's class for a subclass of its original class whose ``__call__`` is the pass's (``patched_class``). The
original class is what the export records and what ``save_pretrained`` writes into ``model_index.json``, and what
a second pass patches again instead of stacking subclasses: ``original_class`` is the one place that reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ORIGINAL_CLASS = "_compressx_base"  # class attribute of a patched class: the class it replaced


def original_class(pipe: Any) -> type:
    """The class ``pipe`` had before a pipeline pass patched it (its own class when none did)."""
    return getattr(type(pipe), _ORIGINAL_CLASS, type(pipe))


def patched_class(base: type, call: Callable[..., Any]) -> type:
    """A subclass of the pipeline class ``base`` whose ``__call__`` is ``call``, linked back to ``base``."""
    # Same name and module as the base, so that save_pretrained writes the base class into model_index.json.
    return type(base.__name__, (base,), {"__call__": call, _ORIGINAL_CLASS: base, "__module__": base.__module__})
