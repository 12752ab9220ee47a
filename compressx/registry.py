"""The pass registry: every compression pass by its snake_case name.

A pass is a function ``apply_<name>(model, config, ctx) -> PassResult`` marked with ``@register_pass``. Marking
only attaches a ``PassSpec`` to the function; the registry itself is built once, on first use, from two places:

* the built-in modules listed in ``compressx.passes.BUILTIN_PASS_MODULES``;
* third-party plugins, found through the entry-point group ``compressx.passes``. An entry point is named after
  the pass and points at the decorated function (``my_pkg.passes:apply_my_pass``) or at a module that defines it.

Registration is loud: a duplicate name, a malformed name, a plugin that fails to import or that does not define
the pass it declares raises ``RegistryError`` naming the plugin. Nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import re
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch.nn as nn

from compressx.checkpoint import LayerCheckpoints
from compressx.config import PassConfig
from compressx.errors import RegistryError, unknown_name_message

PassKind = Literal["weights", "training", "runtime", "pipeline"]
PASS_KINDS: tuple[str, ...] = ("weights", "training", "runtime", "pipeline")
# What a pass may declare it needs (``register_pass(needs=...)``); the engine provides each in the PassContext.
NEEDS: tuple[str, ...] = ("calibration", "original_weights")
ENTRY_POINT_GROUP = "compressx.passes"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_SPEC_ATTR = "__compressx_pass__"


@dataclasses.dataclass
class PassContext:
    """What a pass receives besides the model and its config.

    ``targets`` are the modules the step selected (name → module, in model order), already filtered to the
    pass's ``target_types``; it is empty for passes that act on the whole model. ``calibration`` holds the
    step's calibration data (a ``[samples, seq_len]`` token tensor for text) when the pass ``needs`` it.
    ``original_weights`` maps each target's name to a CPU copy of its weight taken before the first step of the
    ``apply`` call ran — only for a step whose pass needs ``"original_weights"`` with its config (e.g. DSnoT
    refining the mask an earlier step left, which needs the dense values back).
    ``checkpoint``, when the run keeps checkpoints, is where a layer-by-layer pass saves each pruned layer and
    resumes from (``compressx.layerwise.calibrate_layers``).
    ``evaluate``, when the caller has an evaluation set (a recipe's ``eval:`` block), measures a model and returns
    label → value (``{"top1 (digits/test)": 91.2}``); a pass that works in stages may call it to report the metric
    after each stage. Passes must work without it.
    """

    targets: dict[str, nn.Module]
    calibration: Any = None
    progress: bool = True
    original_weights: dict[str, Any] | None = None
    checkpoint: LayerCheckpoints | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclasses.dataclass
class PassResult:
    """What a pass returns.

    ``report`` is JSON-ready (it goes into ``compressx.json``): what the pass decided and measured.
    ``handle`` is set by runtime passes (an object with ``remove()``) and training passes (a
    ``compressx.training.TrainingHandle``: ``on_epoch_start``, ``finalize``, ``remove``, ``state_dict``).
    ``reapply_config`` is the config a runtime or pipeline pass is re-applied with on load, when it differs from
    the one given (e.g. a layer chosen by calibration, now fixed).
    """

    report: dict[str, Any]
    handle: Any = None
    reapply_config: PassConfig | None = None


def summarize_report(report: dict[str, Any]) -> str:
    """The scalar entries of a report on one line (``sparsity=0.5, modules=28``), for logs and listings, and the
    name → reason mappings (``dense_modules={conv1: stem (skip_stem)}``), so that no module is left out unsaid."""
    parts = []
    for key, value in report.items():
        if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
            parts.append(f"{key}={{{', '.join(f'{name}: {reason}' for name, reason in value.items())}}}")
        elif not isinstance(value, dict | list):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Need:
    """A need that holds for some configs only: ``Need("original_weights", when=lambda config: ...)``."""

    name: str
    when: Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A registered pass: its function, config class and what it declares about itself."""

    name: str
    fn: Callable[[nn.Module, PassConfig, PassContext], PassResult]
    config: type[PassConfig]
    kind: str
    paper: str
    families: tuple[str, ...]
    target_types: tuple[type[nn.Module], ...] | None
    needs: tuple[str, ...] = ()
    default_targets: tuple[str, ...] | None = None
    check: Callable[[dict[str, nn.Module], PassConfig], list[str]] | None = None
    check_model: Callable[[Any, PassConfig], list[str]] | None = None
    origin: str = ""
    needs_when: tuple[tuple[str, Callable[[Any], bool]], ...] = ()  # the conditional ones among ``needs``

    @property
    def takes_targets(self) -> bool:
        return self.target_types is not None

    def needs_for(self, config: PassConfig) -> tuple[str, ...]:
        """What the pass needs with ``config``: its declared needs, a conditional one only where it holds."""
        conditions = dict(self.needs_when)
        return tuple(need for need in self.needs if need not in conditions or conditions[need](config))


def register_pass(
    name: str,
    *,
    config: type[PassConfig],
    kind: PassKind,
    paper: str,
    families: Iterable[str],
    target_types: Iterable[type[nn.Module]] | None = None,
    needs: Iterable[str | Need] = (),
    default_targets: Iterable[str] | None = None,
    check: Callable[[dict[str, nn.Module], PassConfig], list[str]] | None = None,
    check_model: Callable[[Any, PassConfig], list[str]] | None = None,
) -> Callable[[Callable], Callable]:
    """Mark ``fn(model, config, ctx) -> PassResult`` as the pass ``name``.

    Args:
        name: snake_case registry name; equals the module file name and the recipe's ``pass:`` value.
        config: the pass's frozen ``PassConfig`` dataclass.
        kind: ``weights`` | ``training`` | ``runtime`` | ``pipeline``.
        paper: the paper (title and arXiv id) or ``"baseline"``.
        families: model families the pass supports (e.g. ``("llm", "vit", "cnn")``), shown by ``compressx list``
            and checked by ``compressx validate`` against the model's family (``"any"``: models of no known family).
        target_types: module classes the pass changes; ``targets`` in a recipe select among them. ``None`` for a
            pass that acts on the whole model and takes no targets.
        needs: what the engine must give the pass, from ``NEEDS``: ``"calibration"`` (``ctx.calibration``; a step
            without data is refused) and ``"original_weights"`` (``ctx.original_weights``; a pass with targets
            only). ``Need(name, when=fn)`` declares one that holds only where ``fn(config)`` is true.
        default_targets: target patterns used when a step gives none (a causal LM's decoder layers take
            precedence; without either: the whole model). See ``compressx.targets.default_targets``.
        check: optional ``check(targets, config) -> [problem, ...]`` run by ``compressx validate`` on the meta
            model (shapes only, no weights), e.g. to reject an input dimension that N:M cannot divide.
        check_model: optional ``check_model(model, config) -> [problem, ...]`` run by ``compressx validate`` on the
            meta model (a pipeline's ``model_index.json`` mapping for pipeline passes) and by ``apply`` before any
            step runs: what the pass would refuse about the model itself (class, layers, scheduler).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(f"pass name {name!r} is not snake_case (lowercase letters, digits, single underscores)")
    if kind not in PASS_KINDS:
        raise RegistryError(f"pass '{name}': kind {kind!r} is not one of {', '.join(PASS_KINDS)}")
    if not (isinstance(config, type) and issubclass(config, PassConfig) and dataclasses.is_dataclass(config)):
        raise RegistryError(f"pass '{name}': config must be a PassConfig dataclass, got {config!r}")
    own_params = config.__dict__.get("__dataclass_params__")  # absent when the subclass was not decorated itself
    if own_params is None or not own_params.frozen:
        raise RegistryError(f"pass '{name}': decorate {config.__name__} with @dataclasses.dataclass(frozen=True)")
    need_names, needs_when = _check_needs(name, needs, target_types is not None)
    if hasattr(config, "needs_original_weights"):  # the attribute compressx once read: declared now, never guessed
        raise RegistryError(
            f"pass '{name}': {config.__name__}.needs_original_weights is not read; declare "
            "register_pass(needs=(..., Need('original_weights', when=...))) instead"
        )

    def mark(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 3 or len(params) != 3:
            raise RegistryError(
                f"pass '{name}': {fn.__module__}.{fn.__qualname__} must take exactly (model, config, ctx)"
            )
        spec = PassSpec(
            name=name,
            fn=fn,
            config=config,
            kind=kind,
            paper=paper,
            families=tuple(families),
            target_types=None if target_types is None else tuple(target_types),
            needs=need_names,
            needs_when=needs_when,
            default_targets=None if default_targets is None else tuple(default_targets),
            check=check,
            check_model=check_model,
            origin=f"{fn.__module__}.{fn.__qualname__}",
        )
        setattr(fn, _SPEC_ATTR, spec)
        return fn

    return mark


def _check_needs(
    name: str, needs: Iterable[str | Need], takes_targets: bool
) -> tuple[tuple[str, ...], tuple[tuple[str, Callable[[Any], bool]], ...]]:
    """``register_pass``'s ``needs``, validated: the names in order and the conditions of the conditional ones."""
    if isinstance(needs, str | Need):
        raise RegistryError(f"pass '{name}': needs is a tuple, e.g. needs=({needs!r},)")
    names, conditions = [], []
    for need in needs:
        need_name = need.name if isinstance(need, Need) else need
        if not isinstance(need_name, str) or need_name not in NEEDS:
            raise RegistryError(f"pass '{name}': unknown needs [{need_name!r}]; allowed: {', '.join(NEEDS)}")
        if need_name in names:
            raise RegistryError(f"pass '{name}': need {need_name!r} declared twice")
        if isinstance(need, Need):
            if not callable(need.when):
                raise RegistryError(f"pass '{name}': Need({need_name!r}, when=...) takes a function of the config")
            conditions.append((need_name, need.when))
        names.append(need_name)
    if "original_weights" in names and not takes_targets:
        raise RegistryError(
            f"pass '{name}': original_weights are the weights of the step's targets; a pass without target_types "
            "has none"
        )
    return tuple(names), tuple(conditions)


def spec_of(obj: Any) -> PassSpec | None:
    """The ``PassSpec`` attached to a decorated pass function, or None."""
    return getattr(obj, _SPEC_ATTR, None)


def _specs_in_module(module: types.ModuleType) -> list[PassSpec]:
    specs = [spec_of(v) for v in vars(module).values()]
    return [s for s in specs if s is not None and s.fn.__module__ == module.__name__]


def _add(registry: dict[str, PassSpec], spec: PassSpec, where: str) -> None:
    if spec.name in registry:
        raise RegistryError(
            f"duplicate pass name '{spec.name}': {where} defines it, but {registry[spec.name].origin} already does"
        )
    registry[spec.name] = spec


def build_registry(
    builtin_modules: Iterable[str], entry_points: Iterable[importlib.metadata.EntryPoint]
) -> dict[str, PassSpec]:
    """Import the built-in pass modules and the plugins; return name → spec. Raises on any problem."""
    registry: dict[str, PassSpec] = {}
    for module_name in builtin_modules:
        for spec in _specs_in_module(importlib.import_module(module_name)):
            _add(registry, spec, spec.origin)
    for ep in entry_points:
        dist = getattr(ep, "dist", None)
        plugin = f"plugin '{ep.name}' ({ep.value}" + (f", from {dist.name} {dist.version})" if dist else ")")
        if not _NAME_RE.match(ep.name):
            raise RegistryError(f"{plugin}: entry-point name {ep.name!r} is not a snake_case pass name")
        try:
            obj = ep.load()
        except Exception as err:  # a plugin that cannot import is an error, never skipped
            raise RegistryError(f"{plugin} failed to import: {type(err).__name__}: {err}") from err
        if isinstance(obj, types.ModuleType):
            specs = [s for s in _specs_in_module(obj) if s.name == ep.name]
            spec = specs[0] if specs else None
        else:
            spec = spec_of(obj)
        if spec is None or spec.name != ep.name:
            found = f"'{spec.name}'" if spec else "no function marked with @compressx.register_pass"
            raise RegistryError(f"{plugin} must point at the pass '{ep.name}', found {found}")
        _add(registry, spec, plugin)
    return registry


@functools.cache
def _registry() -> dict[str, PassSpec]:
    from compressx.passes import BUILTIN_PASS_MODULES

    return build_registry(BUILTIN_PASS_MODULES, importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def get_pass(name_or_fn: str | Callable) -> PassSpec:
    """The pass registered under ``name``; a decorated function is accepted as is (for passes in user code)."""
    if not isinstance(name_or_fn, str):
        spec = spec_of(name_or_fn)
        if spec is None:
            raise RegistryError(f"{name_or_fn!r} is not a pass: mark it with @compressx.register_pass")
        return spec
    registry = _registry()
    if name_or_fn not in registry:
        raise RegistryError(unknown_name_message("pass", name_or_fn, registry))
    return registry[name_or_fn]


def list_passes() -> list[PassSpec]:
    """Every registered pass, sorted by name."""
    return [spec for _, spec in sorted(_registry().items())]
