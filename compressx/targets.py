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

When a step gives no targets, a causal language model's default is its decoder layers (``model.layers``,
``transformer.h``...): never ``lm_head``, which is often tied to the token embedding. Other models default to
the pass's ``default_targets``, else the whole model.

Weight modules beyond ``nn.Linear`` that the sparsity passes handle as Linear layers (``weight_matrices``):

* ``TransposedLinear`` — transformers' ``Conv1D`` (GPT-2 and kin), a Linear whose weight is stored ``[in, out]``;
* ``FusedExperts`` — a mixture-of-experts module that holds every expert's weights in 3-D parameters
  (``experts.gate_up_proj`` / ``experts.down_proj`` of Mixtral, Qwen-MoE... in transformers 5): each expert's
  ``[out, in]`` slice is a Linear weight of its own.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence

import regex
import torch
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


class _ModuleKind(type):
    """Metaclass of the module kinds below: ``isinstance(module, Kind)`` asks ``Kind.matches(module)``, so a kind
    can stand in a pass's ``target_types`` next to real classes without importing (or listing) every class."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, nn.Module) and cls.matches(obj)


class TransposedLinear(metaclass=_ModuleKind):
    """transformers' ``Conv1D`` (GPT-2, GPT-J...): ``y = x @ W + b`` with ``W`` stored ``[in, out]``."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


class FusedExperts(metaclass=_ModuleKind):
    """A module holding the weights of its ``num_experts`` experts in 3-D parameters ``[experts, out, in]``
    (``[experts, in, out]`` when it declares ``is_transposed``, as transformers' ``@use_experts_implementation``
    modules do)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        # An experts module says how many experts it holds; other 3-D parameters (a ViT's pos_embed) are not weights.
        experts = getattr(module, "num_experts", None)
        return isinstance(experts, int) and any(
            p.dim() == 3 and p.shape[0] == experts for p in module.parameters(recurse=False)
        )


def weight_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The weight parameters a sparsity pass changes in ``module``, by the name a report gives them: the module's
    name for a Linear / Conv / ``Conv1D`` (its ``weight``), ``name.param`` for each 3-D parameter of fused experts."""
    if isinstance(module, FusedExperts):
        return {
            f"{name}.{p}": w
            for p, w in module.named_parameters(recurse=False)
            if w.dim() == 3 and w.shape[0] == module.num_experts
        }
    return {name: module.weight}


def weight_matrices(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``[out, in]`` views of the Linear weights in ``module`` (in-place changes reach the parameters): the weight of
    a Linear (a Conv's as it is), the transpose of a ``Conv1D``'s, one slice per expert of fused experts
    (``name.param[e]``)."""
    if isinstance(module, FusedExperts):
        return expert_matrices(weight_tensors(name, module), bool(getattr(module, "is_transposed", False)))
    if isinstance(module, TransposedLinear):
        return {name: module.weight.t()}
    return {name: module.weight}


def expert_key(tensor_key: str, expert: int) -> str:
    """The name of expert ``expert``'s slice of the 3-D expert parameter named ``tensor_key`` (``name.param[e]``)."""
    return f"{tensor_key}[{expert}]"


def expert_matrices(tensors: dict[str, torch.Tensor], transposed: bool) -> dict[str, torch.Tensor]:
    """``[out, in]`` views of every expert's slice of 3-D expert parameters ``{name.param: tensor}`` (stored
    ``[experts, out, in]``, or ``[experts, in, out]`` when ``transposed``), by ``expert_key``."""
    return {
        expert_key(key, e): tensor[e].t() if transposed else tensor[e]
        for key, tensor in tensors.items()
        for e in range(tensor.shape[0])
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear or ``Conv1D`` (a view: in-place changes reach the parameter)."""
    return module.weight.t() if isinstance(module, TransposedLinear) else module.weight


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal language model (``*ForCausalLM``, ``GPT2LMHeadModel``...)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return True
    if name.endswith("ForConditionalGeneration"):
        return False  # multimodal (some are in the causal-LM mapping, e.g. Gemma 3): compressx's mllm family
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        return False  # not a transformers model
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def decoder_layers_path(model: nn.Module) -> str | None:
    """The dotted path of a causal LM's decoder-layer ``ModuleList``; None when there is none.

    Found from the model itself: a ``ModuleList`` of blocks of a class transformers keeps whole when it splits a
    model across devices (``_no_split_modules``: the decoder layers, e.g. ``LlamaDecoderLayer``, ``GPT2Block``;
    a multimodal model also lists its vision blocks, so of several such lists the one holding the most
    parameters); for a model without that list, the list of identical blocks holding the most parameters. A model
    this gets wrong: the layer-wise passes' ``layers`` option names the list.
    """
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    best, best_key = None, (0, 0)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or len({type(m) for m in module}) != 1:
            continue
        # lists of the declared blocks first, then the one holding the most parameters
        key = (int(type(module[0]).__name__ in blocks), sum(p.numel() for p in module.parameters()))
        if key > best_key:
            best, best_key = name, key
    return best


def default_targets(model: nn.Module, pass_default: Sequence[str] | None) -> tuple[str, ...] | None:
    """The targets of a step that gives none: a causal LM's decoder layers, else the pass's default (None: all)."""
    if is_causal_lm(model):
        path = decoder_layers_path(model)
        if path is None:
            raise TargetError(
                f"targets: none given, and the decoder layers of {type(model).__name__} (the default for a causal "
                "LM) could not be found; give targets (e.g. ['re:.*layers\\..*'])"
            )
        return (path,)
    return None if pass_default is None else tuple(pass_default)


def select_targets(
    model: nn.Module,
    targets: Sequence[str] | None,
    ignore: Sequence[str] | None,
    target_types: tuple[type[nn.Module], ...],
    where: str = "",
    *,
    defaulted: bool = False,
) -> dict[str, nn.Module]:
    """The modules of ``target_types`` inside the ``targets`` selection (whole model when None), minus ``ignore``.

    ``defaulted``: the patterns are a pass's defaults, not the user's; errors then say so instead of naming a
    pattern as if the user had written it.
    """
    prefix = f"{where}." if where else ""
    if targets is None:
        roots = {""}
    else:
        try:
            roots = set(match_modules(model, targets, f"{prefix}targets"))
        except TargetError as err:
            if not defaulted:
                raise
            raise TargetError(
                f"{prefix}targets: none given, and this pass's default targets {list(targets)} match no module of "
                f"{type(model).__name__}; give targets"
            ) from err
    ignored = set(match_modules(model, ignore or [], f"{prefix}ignore"))
    chosen = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, target_types) and _inside(name, roots) and not _inside(name, ignored)
    }
    if not chosen:
        kinds = ", ".join(t.__name__ for t in target_types)
        where_from = f"the default targets ({', '.join(targets)})" if defaulted and targets else "the selection"
        # weight modules this pass cannot change, so that the error says why a GPT-2 or MoE selection is "empty"
        others = sorted(
            {
                type(m).__name__
                for name, m in model.named_modules()
                if isinstance(m, SPECIAL_WEIGHT_KINDS) and not isinstance(m, target_types) and _inside(name, roots)
            }
        )
        raise TargetError(
            f"{prefix}targets: {where_from} holds no module of a supported type ({kinds})"
            + (" once 'ignore' is applied" if ignored else "")
            + (f"; it holds {', '.join(others)} modules, which this pass cannot change" if others else "")
        )
    return chosen


def select_step_targets(
    model: nn.Module,
    targets: Sequence[str] | None,
    ignore: Sequence[str] | None,
    target_types: tuple[type[nn.Module], ...],
    where: str = "",
    pass_default: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """``select_targets`` for a step: with no ``targets`` given, ``default_targets(model, pass_default)``."""
    if targets:
        return select_targets(model, targets, ignore, target_types, where)
    defaults = default_targets(model, pass_default)
    return select_targets(model, defaults, ignore, target_types, where, defaulted=defaults is not None)


# Weight modules some passes cannot change; a selection that holds one they do not support is an error, not a skip.
SPECIAL_WEIGHT_KINDS: tuple[type, ...] = (TransposedLinear, FusedExperts)


def unsupported_problems(
    model: nn.Module,
    chosen: dict[str, nn.Module],
    targets: Sequence[str] | None,
    ignore: Sequence[str] | None,
    target_types: tuple[type[nn.Module], ...],
    pass_name: str,
    default: Sequence[str] | None = None,
) -> list[str]:
    """Problems with a resolved selection (``chosen``) that would otherwise be silent:

    * weight modules inside the selection that the pass cannot change (a ``Conv1D`` or fused experts for a pass
      that does not list them in its ``target_types``) — they would stay dense while the report covers the rest;
    * targets whose weight is tied to another module's parameter (``lm_head`` and the token embedding): pruning
      one would prune both.
    """
    problems = []
    missing = tuple(kind for kind in SPECIAL_WEIGHT_KINDS if kind not in target_types)
    if missing:
        try:
            others = select_step_targets(model, targets, ignore, missing, pass_default=default)
        except TargetError:
            others = {}
        if others:
            names = list(others)
            kinds = sorted({"fused expert parameters" if isinstance(m, FusedExperts) else type(m).__name__
                            for m in others.values()})  # fmt: skip
            params = [k for n, m in others.items() for k in weight_tensors(n, m)]
            problems.append(
                f"pass '{pass_name}' cannot change {' and '.join(kinds)}, and the selection holds {len(names)} such "
                f"module(s) ({', '.join(params[:4])}{', ...' if len(params) > 4 else ''}); add them to ignore "
                + (f"(e.g. 're:.*\\.{names[0].rsplit('.', 1)[-1]}') " if names else "")
                + "to leave them dense"
                + (
                    "; magnitude, wanda, sparsegpt and dsnot prune fused experts per expert"
                    if "fused expert parameters" in kinds
                    else ""
                )
            )
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for name, module in chosen.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(module, FusedExperts):
            continue
        aliases = [p for p in owners.get(id(weight), []) if p != (f"{name}.weight" if name else "weight")]
        if aliases:
            problems.append(
                f"module '{name}' shares its weight with {', '.join(aliases)} (tied weights): pruning it would prune "
                f"both; add '{name}' to ignore"
            )
    return problems
