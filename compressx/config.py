"""``PassConfig``: the base of every pass config, a frozen dataclass that checks itself.

A config is data: built from a mapping (a recipe's ``config:`` block or ``compressx.json``), serialised back to
a mapping, never pickled. ``from_dict`` refuses unknown keys (naming the closest valid one) and values of the
wrong type; each subclass checks ranges and combinations in ``__post_init__`` by raising ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

from compressx.errors import ConfigError, unknown_key_message

C = TypeVar("C", bound="PassConfig")


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base class of pass configs. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

    ``version`` is bumped by a pass when the meaning of its config changes, so that ``compressx.load`` can refuse
    (or migrate) a config written by an older version.
    """

    version: ClassVar[int] = 1

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any] | None) -> C:
        """Build the config from a plain mapping; unknown keys and ill-typed values raise one ``ConfigError``
        that lists all of them (range and combination checks run once the keys and types are right)."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        problems = []
        for key, value in values.items():
            try:
                if key not in fields:
                    raise ConfigError(unknown_key_message(str(key), fields), path=str(key))
                values[key] = check_type(value, hints[key], path=key)
            except ConfigError as err:
                problems.append(err)
        if problems:
            raise ConfigError.of(problems)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready mapping (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}


# Seeds reach numpy (scikit-learn splits, accelerate's set_seed) as well as torch; numpy takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def check_seed(value: Any, path: str = "seed") -> int:
    """``value`` when it is an integer seed in ``0 .. SEED_MAX``; else ``ConfigError`` saying the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"got {value!r}; expected an integer >= 0 and <= {SEED_MAX} (2**32 - 1)", path=path)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    names = {type(None): "null", float: "number", int: "integer", str: "string", bool: "true/false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_type(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against a config field's annotation; return it normalised (int→float, list→tuple).

    Supported annotations: bool, int, float, str, Literal[...], X | None, tuple[X, ...], dict[str, Any], Any.
    """
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}", path=path)
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return check_type(value, option, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"got {value!r}; expected {_type_name(annotation)}", path=path)
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"got {value!r}; expected null", path=path)
        return None
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"got {value!r}; expected {_type_name(annotation)}", path=path)
        inner = typing.get_args(annotation)[0]
        return tuple(check_type(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"got {value!r}; expected a mapping", path=path)
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"got {value!r}; expected a number", path=path)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"got {value!r}; expected an integer", path=path)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"got {value!r}; expected true or false", path=path)
        return value
    if annotation is str:
        if not isinstance(value, str):
            hint = ' (YAML reads an unquoted 2:4 as the number 124: quote it, "2:4")' if isinstance(value, int) else ""
            raise ConfigError(f"got {value!r} ({type(value).__name__}); expected a string{hint}", path=path)
        return value
    raise TypeError(f"compressx config fields cannot be annotated {annotation!r} (field '{path}')")
