"""Choosing the modules a step changes: ``targets`` and ``ignore`` patterns.

A pattern is one of:

* ``re:<regex>`` — the regex must match the whole module name (``re:.*mlp.*``);
* a glob with ``*``, ``?`` or ``[`` — matched against the whole module name (``model.layers.*.mlp.*``);
* a module class name (``Linear``, ``LlamaDecoderLayer``) — every module of that class;
* otherwise an exact module name (``lm_head``, ``model.layers.0.self_attn.q_proj``).

A ``re:`` regex is matched with the ``regex`` package (already required by transformers; ``re``-compatible
syntax) under a time budget of ``REGEX_SECONDS`` per pattern over all module names. Python's ``re`` backtracks
without bound and cannot be interrupted, so a pattern such as ``(.*.*)*(x+x+)+y`` would hang; refusing nested
quantifiers instead would also refuse harmless patterns, and running the match in a subprocess costs a process
per pattern. A pattern that runs out of time is an error asking for a simpler one.

A selected module stands for itself and everything inside it; the pass then keeps the modules of the types it
supports (e.g. ``Linear``/``Conv``). A module is ignored when it, or a module containing it, matches an
``ignore`` pattern. Every pattern must match at least one module, and the final selection must not be empty:
a typo never turns into a silent no-op.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence

import regex
import torch.nn as nn

from compressx.errors import TargetError, closest

_GLOB_CHARS = set("*?[")


REGEX_SECONDS = 1.0  # legitimate patterns take microseconds per module name


def _regex_matcher(expression: str, where: str):
    try:
        compiled = regex.compile(expression)
    except (regex.error, OverflowError, RecursionError) as err:
        raise TargetError(f"{where}: bad regex {expression!r}: {err}") from err
    deadline = time.monotonic() + REGEX_SECONDS

    def match(name: str, module: nn.Module) -> bool:
        try:
            return compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
        except TimeoutError as err:
            raise TargetError(
                f"{where}: regex {expression!r} took over {REGEX_SECONDS:g} s to match the module names: it backtracks"
                " without bound (nested quantifiers such as (a+)+ or (.*)*); write a simpler one"
            ) from err

    return match


def _matcher(pattern: str, where: str):
    if not isinstance(pattern, str) or not pattern:
        raise TargetError(f"{where}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        return _regex_matcher(pattern[3:], where)
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
