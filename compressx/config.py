"""Validated blocks: every block of a recipe and every pass config is a frozen dataclass that checks itself.

A block is data: built from a mapping (a recipe's ``model:``, ``data:``, ``train:``, ``eval:``, ``export:`` block,
a step's ``config:`` or ``compressx.json``), serialised back to a mapping, never pickled. ``Block.from_dict``
refuses unknown keys (naming the allowed ones and the closest) and values of the wrong type, with the exact path
of each (``optimizer.lrr``, ``data.split``, ``paths[0]``); each subclass checks ranges and combinations in
``__post_init__`` by raising ``ConfigError``. The same declarations give the block's JSON Schema
(``Block.json_schema``, behind ``compressx schema``).

What a type annotation alone cannot say is declared per field with ``option(...)`` (``Rules``): a YAML key that is
not the field's name (``class``), a nested mapping the field is read from (``optimizer: {lr: ...}``), bounds, a
closed set of names, the values of the block's *tag* (e.g. ``source``) the key applies to or is required for.
Supported annotations: bool, int, float, str, Literal[...], X | None, tuple[X, ...], dict[str, Any], Any, a Block
subclass (a nested block) and a union of Block subclasses that share a tag (the tag's value picks the class).

Adding a key to a block is one field: ``report: bool = False`` (any type above), or with rules
``revision: str | None = option(None, nonempty=True)``; a key of some sources only adds ``only=("hf",)``, one a
source requires ``needs=(...)``. A nested block is a Block subclass used as the field's type
(``push_to_hub: PushSpec | None = None``). Parsing, the error messages, ``to_dict`` and the schema follow.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar, Union

from compressx.errors import ConfigError, unknown_key_message, unknown_name_message

B = TypeVar("B", bound="Block")
RULES = "compressx.rules"  # the dataclasses field-metadata key under which ``option`` stores a field's ``Rules``


Names = Sequence[str] | Callable[[], Sequence[str]]  # names, or a function giving them (called when needed)


def _names(names: Names | None) -> Sequence[str] | None:
    return names() if callable(names) else names


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a field's annotation cannot say. Every attribute is optional."""

    key: str | None = None  # the YAML key, when it is not the field's name (``class`` → ``cls``)
    group: str | None = None  # read from the nested mapping ``group:`` (``optimizer: {lr: ...}`` → field ``lr``)
    # the values of the block's tag this key applies to (None: all) and those it is required for; like ``choices``,
    # a callable is called when needed (a table filled in after the class, e.g. evaluate.METRICS)
    only: Names | None = None
    needs: Names = ()
    choices: Names | None = None  # the allowed values
    what: str | None = None  # with choices: "unknown <what> 'x'; allowed: ...; did you mean ...?" messages
    ge: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # a string with a non-blank character, a list with an item
    one_or_many: bool = False  # tuple fields: a single value stands for a one-item list
    expected: str | None = None  # what to say is expected when the value is refused (default: from type and bounds)
    missing: str | None = None  # the message when a required key is absent (default: the check of null)
    doc: str | None = None  # what the key is, for the schema and for "needs" messages

    def allowed(self) -> Sequence[str] | None:
        return _names(self.choices)

    def applies_to(self) -> Sequence[str] | None:
        return _names(self.only)

    def needed_by(self) -> Sequence[str]:
        return _names(self.needs) or ()


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with ``Rules`` (keyword arguments as there), e.g. ``samples: int = option(128, ge=1)``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RULES: Rules(**rules)})


def rules_of(f: dataclasses.Field) -> Rules:
    return f.metadata.get(RULES) or Rules()


@dataclasses.dataclass(frozen=True)
class Block:
    """Base of every validated block. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

    ``tag`` names the key whose value picks which of the block's keys apply (``Rules.only`` / ``needs``) and,
    in a union of blocks, which block a mapping is. ``shape`` is an example mapping for the message that refuses a
    value that is not a mapping at all.
    """

    tag: ClassVar[str | None] = None
    shape: ClassVar[str] = ""
    keep_null: ClassVar[bool] = False  # to_dict: keep keys whose value is None; errors then say "or null"

    @classmethod
    def from_dict(cls: type[B], values: Any) -> B:
        """Build the block from a plain mapping; unknown keys and ill-typed values raise one ``ConfigError`` that
        lists all of them (range and combination checks run once the keys and types are right)."""
        if not isinstance(values, dict):
            like = f" like {cls.shape}" if cls.shape else f" with keys {', '.join(cls.keys())}"
            raise ConfigError(f"expected a mapping{like}, got {values!r}")
        hints = typing.get_type_hints(cls)
        direct, groups = _layout(cls)
        tag_value = None
        if cls.tag is not None:  # checked first, alone: which other keys apply depends on it
            tag_field = direct[cls.tag]
            tag_value = check_field(values.get(cls.tag), tag_field, hints[tag_field.name], cls.tag)
        applies = {key: f for key, f in direct.items() if _applies(f, tag_value)}
        allowed = [*applies, *groups]
        kwargs: dict[str, Any] = {}
        problems: list[ConfigError] = []
        for key, value in values.items():
            try:
                if key in groups:
                    kwargs.update(_read_group(str(key), value, groups[key], hints))
                elif key in applies:
                    f = applies[key]
                    kwargs[f.name] = check_field(value, f, hints[f.name], str(key), not cls.keep_null)
                elif key in direct:
                    names = ", ".join(rules_of(direct[key]).applies_to() or ())
                    which = f"{cls.tag}{'s' if ',' in names else ''} {names}"
                    raise ConfigError(f"'{key}' applies to {which} only; {unknown_key_message(key, allowed)}", key)
                else:
                    raise ConfigError(unknown_key_message(str(key), allowed), path=str(key))
            except ConfigError as err:
                problems.append(err)
        for key, f in applies.items():
            rules = rules_of(f)
            try:
                if tag_value in rules.needed_by() and values.get(key) is None:
                    what = rules_of(direct[cls.tag]).what or cls.tag
                    doc = f" ({rules.doc})" if rules.doc else ""
                    raise ConfigError(f"{what} {tag_value} needs '{key}'{doc}", path=key)
                if key not in values and key != cls.tag and _required(f):
                    if rules.missing:
                        raise ConfigError(rules.missing, path=key)
                    check_field(None, f, hints[f.name], key)
            except ConfigError as err:
                problems.append(err)
        if problems:
            raise ConfigError.of(problems)
        if cls.tag is not None:
            kwargs[direct[cls.tag].name] = tag_value
        return cls(**kwargs)

    @classmethod
    def tag_values(cls) -> tuple[str, ...]:
        """The values the block's tag may take (e.g. its sources); () for a block without a tag."""
        return tuple(rules_of(_layout(cls)[0][cls.tag]).allowed() or ()) if cls.tag else ()

    @classmethod
    def describe(cls, tag_value: str) -> str | None:
        """What the block is for one value of its tag (the schema's description of that variant)."""
        return None

    @classmethod
    def keys(cls) -> list[str]:
        """The block's top-level keys (nested mappings by their name)."""
        direct, groups = _layout(cls)
        return [*direct, *groups]

    def to_dict(self) -> dict[str, Any]:
        """The block as a JSON-ready mapping in its YAML shape (tuples become lists, nested blocks mappings); keys
        that do not apply to the block's tag value, and unset (None) ones, are left out."""
        tag_value = getattr(self, self.tag) if self.tag else None
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            rules = rules_of(f)
            value = getattr(self, f.name)
            if not f.init or not _applies(f, tag_value) or (value is None and not self.keep_null):
                continue
            (out.setdefault(rules.group, {}) if rules.group else out)[rules.key or f.name] = _plain(value)
        return out

    @classmethod
    def json_schema(cls, defs: dict[str, Any]) -> dict[str, Any]:
        """A ``$ref`` to the block's JSON Schema (draft 2020-12), which is added to ``defs`` under its class name."""
        name = f"{cls.__module__}.{cls.__qualname__}"  # unique: two passes' configs may share a class name
        if name not in defs:
            defs[name] = {}  # a placeholder: a block that holds itself refers to its own name
            defs[name] = _block_schema(cls, defs)
        return {"$ref": f"#/$defs/{name}"}


@dataclasses.dataclass(frozen=True)
class PassConfig(Block):
    """Base class of pass configs. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

    ``version`` is bumped by a pass when the meaning of its config changes, so that ``compressx.load`` can refuse
    (or migrate) a config written by an older version.
    """

    version: ClassVar[int] = 1
    keep_null: ClassVar[bool] = True

    @classmethod
    def from_dict(cls: type[B], values: dict[str, Any] | None) -> B:
        """As ``Block.from_dict``; an absent config (None) is all defaults."""
        return super().from_dict({} if values is None else values)


# Seeds reach numpy (scikit-learn splits, accelerate's set_seed) as well as torch; numpy takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


_SEED_EXPECTED = f"an integer >= 0 and <= {SEED_MAX} (2**32 - 1)"


def seed_option(**rules: Any) -> Any:
    """The ``seed`` field of a block: an integer in ``0 .. SEED_MAX``, default 0 (``rules``: more ``Rules``)."""
    return option(0, ge=0, le=SEED_MAX, expected=_SEED_EXPECTED, **rules)


def check_seed(value: Any, path: str = "seed") -> int:
    """``value`` when it is an integer seed in ``0 .. SEED_MAX``; else ``ConfigError`` saying the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"got {value!r}; expected {_SEED_EXPECTED}", path=path)
    return value


def _layout(cls: type[Block]) -> tuple[dict[str, dataclasses.Field], dict[str, dict[str, dataclasses.Field]]]:
    """The block's fields by YAML key: ``(direct, {group: {key: field}})``."""
    direct: dict[str, dataclasses.Field] = {}
    groups: dict[str, dict[str, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if f.init:
            rules = rules_of(f)
            (groups.setdefault(rules.group, {}) if rules.group else direct)[rules.key or f.name] = f
    return direct, groups


def _applies(f: dataclasses.Field, tag_value: Any) -> bool:
    names = rules_of(f).applies_to()
    return names is None or tag_value is None or tag_value in names


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _read_group(group: str, value: Any, fields: dict[str, dataclasses.Field], hints: dict[str, Any]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping with keys {', '.join(fields)}, got {value!r}", path=group)
    out, problems = {}, []
    for key, item in value.items():
        try:
            if key not in fields:
                raise ConfigError(unknown_key_message(str(key), fields), path=f"{group}.{key}")
            out[fields[key].name] = check_field(item, fields[key], hints[fields[key].name], f"{group}.{key}")
        except ConfigError as err:
            problems.append(err)
    if problems:
        raise ConfigError.of(problems)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Block):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _number(value: float) -> str:
    return str(value) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _bounds(rules: Rules) -> str:
    if rules.ge is not None and rules.lt is not None:
        return f" in [{_number(rules.ge)}, {_number(rules.lt)})"
    parts = [f"{op} {_number(v)}" for op, v in ((">=", rules.ge), ("<=", rules.le), ("<", rules.lt)) if v is not None]
    return f" {' and '.join(parts)}" if parts else ""


def _expected(annotation: Any, rules: Rules) -> str:
    if rules.expected:
        return rules.expected
    base = {int: "an integer", float: "a number"}.get(_without_none(annotation), _type_name(annotation))
    return base + _bounds(rules)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def check_field(value: Any, f: dataclasses.Field, annotation: Any, path: str, null_is_unset: bool = True) -> Any:
    """Check ``value`` against a field's annotation and ``Rules``; return it normalised. With ``null_is_unset``, a
    field that defaults to None takes null as "unset", and a wrong value is told the type of a set one."""
    rules = rules_of(f)
    if null_is_unset and f.default is None and value is not None:
        annotation = _without_none(annotation)
    allowed = rules.allowed()
    if allowed is not None and not (value is None and f.default is None):
        if isinstance(value, bool) or not isinstance(value, str) or value not in allowed:
            if rules.what:
                raise ConfigError(unknown_name_message(rules.what, str(value), allowed), path=path)
            raise ConfigError(f"got {value!r}; allowed: {', '.join(allowed)}", path=path)
        return value
    if rules.one_or_many and isinstance(value, str):
        value = [value]
    if not (rules.expected or _bounds(rules)):
        checked = check_type(value, annotation, path)
    else:
        try:
            checked = check_type(value, annotation, path)
        except ConfigError as err:
            raise ConfigError(f"got {value!r}; expected {_expected(annotation, rules)}", path=path) from err
    if checked is None:
        return None
    low_ok = rules.ge is None or checked >= rules.ge
    high_ok = (rules.le is None or checked <= rules.le) and (rules.lt is None or checked < rules.lt)
    filled = not rules.nonempty or (checked.strip() if isinstance(checked, str) else len(checked))
    if not (low_ok and high_ok and filled):
        raise ConfigError(f"got {value!r}; expected {_expected(annotation, rules)}", path=path)
    return checked


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "a mapping"
    names = {type(None): "null", float: "number", int: "integer", str: "string", bool: "true/false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _block_union(annotation: Any) -> tuple[list[type[Block]], bool] | None:
    """``([blocks], nullable)`` when ``annotation`` is a Block or a union of Blocks (and maybe None)."""
    if isinstance(annotation, type) and issubclass(annotation, Block):
        return [annotation], False
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return None
    args = typing.get_args(annotation)
    blocks = [a for a in args if isinstance(a, type) and issubclass(a, Block)]
    if not blocks or len(blocks) + (type(None) in args) != len(args):
        return None
    return blocks, type(None) in args


def pick_block(value: Any, blocks: Sequence[type[Block]]) -> type[Block]:
    """The block of a union that a mapping is, by its tag's value."""
    if len(blocks) == 1:
        return blocks[0]
    tag = blocks[0].tag
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping with a '{tag}' key, got {value!r}")
    names: list[str] = []
    for block in blocks:
        if value.get(tag) in block.tag_values() and not isinstance(value.get(tag), bool):
            return block
        names += block.tag_values()
    what = rules_of(_layout(blocks[0])[0][tag]).what or tag
    raise ConfigError(unknown_name_message(what, str(value.get(tag)), names), path=tag)


def check_type(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against a field's annotation; return it normalised (int→float, list→tuple, mapping→block)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    blocks = _block_union(annotation)
    if blocks is not None:
        classes, nullable = blocks
        if value is None and nullable:
            return None
        try:
            return pick_block(value, classes).from_dict(value)
        except ConfigError as err:
            raise err.under(path) from err
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}", path=path)
        return value
    if origin in (Union, types.UnionType):
        for option_type in typing.get_args(annotation):
            try:
                return check_type(value, option_type, path)
            except ConfigError:
                pass
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
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
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


# --- JSON Schema (draft 2020-12) ----------------------------------------------------------------------------------


def type_schema(annotation: Any, defs: dict[str, Any], rules: Rules | None = None) -> dict[str, Any]:
    """The JSON Schema of a field's annotation and rules (nested blocks go into ``defs``)."""
    rules = rules or Rules()
    origin = typing.get_origin(annotation)
    blocks = _block_union(annotation)
    allowed = rules.allowed()
    if allowed is not None:
        schema: dict[str, Any] = {"enum": list(allowed)}
        if typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation):
            schema["enum"].append(None)
    elif blocks is not None:
        options = [b.json_schema(defs) for b in blocks[0]] + ([{"type": "null"}] if blocks[1] else [])
        schema = options[0] if len(options) == 1 else {"anyOf": options}
    elif annotation is Any:
        schema = {}
    elif origin is Literal:
        schema = {"enum": list(typing.get_args(annotation))}
    elif origin in (Union, types.UnionType):
        schema = {"anyOf": [type_schema(a, defs, _bounds_only(rules)) for a in typing.get_args(annotation)]}
    elif origin in (tuple, list):
        schema = {"type": "array", "items": type_schema(typing.get_args(annotation)[0], defs)}
        if rules.nonempty:
            schema["minItems"] = 1
        if rules.one_or_many:
            schema = {"anyOf": [schema["items"], schema]}
    elif origin is dict:
        schema = {"type": "object"}
    elif annotation is type(None):
        schema = {"type": "null"}
    else:
        schema = {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[annotation]}
        for word, bound in (("minimum", rules.ge), ("maximum", rules.le), ("exclusiveMaximum", rules.lt)):
            if bound is not None and annotation in (int, float):
                schema[word] = bound
        if rules.nonempty and annotation is str:
            schema["pattern"] = r"\S"
    if rules.doc:
        schema = {**schema, "description": rules.doc}
    return schema


def _bounds_only(rules: Rules) -> Rules:
    return Rules(ge=rules.ge, le=rules.le, lt=rules.lt, nonempty=rules.nonempty)


def _object_schema(
    fields: dict[str, dataclasses.Field], hints: dict[str, Any], defs: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    properties = {}
    for key, f in fields.items():
        properties[key] = type_schema(hints[f.name], defs, rules_of(f))
        if not _required(f) and f.default is not None and _json_scalar(f.default):
            properties[key]["default"] = f.default
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, "required": required} if required else schema


def _json_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value))


def _block_schema(cls: type[Block], defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    direct, groups = _layout(cls)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")

    def variant(tag_value: Any) -> dict[str, Any]:
        fields = {k: f for k, f in direct.items() if _applies(f, tag_value)}
        required = [k for k, f in fields.items() if _required(f) or tag_value in rules_of(f).needed_by()]
        schema = _object_schema(fields, hints, defs, required)
        if tag_value is not None:
            schema["properties"][cls.tag] = {"const": tag_value}
            if cls.describe(tag_value):
                schema["description"] = cls.describe(tag_value)
        for group, members in groups.items():
            schema["properties"][group] = _object_schema(members, hints, defs, [])
        return schema

    if cls.tag is None:
        return {"description": doc, **variant(None)}
    return {"description": doc, "oneOf": [variant(v) for v in cls.tag_values()]}
