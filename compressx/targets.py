"""Choosing the modules a step changes: ``targets`` and ``ignore`` patterns.

A pattern is one of:

* ``re:<regex>`` — the regex must match the whole module name (``re:.*mlp.*``);
* a glob with ``*``, ``?`` or ``[`` — matched against the whole module name (``model.layers.*.mlp.*``);
* a module class name (``Linear``, ``LlamaDecoderLayer``) — every module of that class;
* otherwise an exact module name (``lm_head``, ``model.layers.0.self_attn.q_proj``).

A selected module stands for itself and everything inside it; the pass then keeps the modules of the types it
supports (e.g. ``Linear``/``Conv``). A module is ignored when it, or a module containing it, matches an
``ignore`` pattern. Every pattern must match at least one module, and the final selection must not be empty:
a typo never turns into a silent no-op.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch.nn as nn

from compressx.errors import TargetError, closest

_GLOB_CHARS = set("*?[")


def _matcher(pattern: str, where: str):
    if not isinstance(pattern, str) or not pattern:
        raise TargetError(f"{where}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise TargetError(f"{where}: bad regex {pattern[3:]!r}: {err}") from err
        return lambda name, module: regex.fullmatch(name) is not None
    if _GLOB_CHARS & set(pattern):
        return lambda name, module: fnmatch.fnmatchcase(name, pattern)
    return lambda name, module: name == pattern or type(module).__name__ == pattern


def _no_match(pattern: str, where: str, model: nn.Module) -> TargetError:
    names = [n for n, _ in model.named_modules() if n]
    classes = {type(m).__name__ for m in model.modules()}
    hint = closest(pattern.removeprefix("re:"), [*names, *classes])
    return TargetError(
        f"{where}: pattern {pattern!r} matches no module of {type(model).__name__}"
        + (f"; did you mean '{hint}'?" if hint else "; patterns are exact names, globs, 're:' regexes or class names")
    )


def match_modules(model: nn.Module, patterns: Sequence[str], where: str = "targets") -> list[str]:
    """Names of the modules matched by any pattern (in model order). Raises if a pattern matches nothing."""
    matched: set[str] = set()
    modules = list(model.named_modules())
    for i, pattern in enumerate(patterns):
        label = f"{where}[{i}]"
        match = _matcher(pattern, label)
        hits = {name for name, module in modules if match(name, module)}
        if not hits:
            raise _no_match(pattern, label, model)
        matched |= hits
    return [name for name, _ in modules if name in matched]


def _inside(name: str, roots: set[str]) -> bool:
    if "" in roots or name in roots:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in roots for i in range(1, len(parts)))


def select_targets(
    model: nn.Module,
    targets: Sequence[str] | None,
    ignore: Sequence[str] | None,
    target_types: tuple[type[nn.Module], ...],
    where: str = "",
) -> dict[str, nn.Module]:
    """The modules of ``target_types`` inside the ``targets`` selection (whole model when None), minus ``ignore``."""
    prefix = f"{where}." if where else ""
    roots = set(match_modules(model, targets, f"{prefix}targets")) if targets is not None else {""}
    ignored = set(match_modules(model, ignore or [], f"{prefix}ignore"))
    chosen = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, target_types) and _inside(name, roots) and not _inside(name, ignored)
    }
    if not chosen:
        kinds = ", ".join(t.__name__ for t in target_types)
        raise TargetError(
            f"{prefix}targets: the selection holds no module of a supported type ({kinds})"
            + (" once 'ignore' is applied" if ignored else "")
        )
    return chosen
