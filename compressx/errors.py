"""The exceptions compressx raises for bad input. Each names what is wrong and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class CompressxError(Exception):
    """Base class: a user-facing error. The CLI prints its message and exits with status 2."""


class ConfigError(CompressxError):
    """A pass config (or another block of a recipe) has a bad key or value.

    ``path`` is the dotted location inside the block (e.g. ``"sparsty"``) so that a recipe can prefix it with
    where the block sits (``steps[1].config.sparsty``). One error may carry several problems of one block, as
    ``(path, message)`` pairs in ``problems`` (``path`` / ``detail`` are the first), so all are reported at once.
    """

    def __init__(self, message: str, path: str = "", *, problems: Sequence[tuple[str, str]] = ()) -> None:
        self.problems = list(problems) or [(path, message)]
        self.path, self.detail = self.problems[0]
        super().__init__("\n".join(self.lines()))

    @classmethod
    def of(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error holding the problems of all ``errors``."""
        return cls("", problems=[problem for err in errors for problem in err.problems])

    def under(self, prefix: str) -> ConfigError:
        """The same problems, their paths put under ``prefix`` (where the block sits in the recipe)."""
        return ConfigError("", problems=[(f"{prefix}.{path}" if path else prefix, msg) for path, msg in self.problems])

    def lines(self) -> list[str]:
        """One ``path: message`` line per problem."""
        return [f"{path}: {msg}" if path else msg for path, msg in self.problems]


class RegistryError(CompressxError):
    """A pass could not be registered or found: duplicate, malformed name, failed plugin import, unknown name."""


class TargetError(CompressxError):
    """A ``targets`` / ``ignore`` pattern matched nothing, or the selection holds no module the pass supports."""


class RecipeError(CompressxError):
    """One or more problems in a recipe, each prefixed with the file and the path inside it."""

    def __init__(self, problems: list[str], source: str = "<recipe>") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{source}: {p}" for p in self.problems]
        head = f"{len(lines)} problem(s) in {source}:" if len(lines) > 1 else ""
        super().__init__("\n".join([head, *lines]) if head else lines[0])


class DataError(CompressxError):
    """Data that cannot be used: a text shorter than one window, an empty calibration tensor, token ids that are not
    integers or lie outside the model's vocabulary."""


class ExportError(CompressxError):
    """An export could not be written, or an export directory could not be read back (corrupt, missing, unknown)."""


class PushError(CompressxError):
    """An export could not be published to the Hub: bad repo id, no token, refused, offline, a network failure."""


class CheckpointError(CompressxError):
    """A checkpoint directory cannot be used: not compressx's, another run's, corrupted, or nothing to resume."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name`` (for 'did you mean' hints), or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_name_message(what: str, name: str, allowed: Iterable[str]) -> str:
    """``unknown <what> '<name>'; allowed: ...; did you mean '<closest>'?``"""
    allowed = sorted(allowed)
    hint = closest(name, allowed)
    msg = f"unknown {what} '{name}'; allowed: {', '.join(allowed) or '(none)'}"
    return msg + (f"; did you mean '{hint}'?" if hint else "")


def unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    return unknown_name_message("key", key, allowed)
