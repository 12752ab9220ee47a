"""Property: whatever a shipped recipe is mutated into, ``compressx validate`` exits 0 or 2, never with a
traceback, within a time bound.

Mutations are structural (a value replaced by a value of another type, a key deleted, added or misspelled, a list
emptied or wrapped) and textual (bytes inserted or deleted, a line duplicated, the file cut short). Validation is
in-process through ``compressx.cli.main``, the model built on the meta device as validate does; the hub is off.
The fast test is derandomized (the same examples on every run); the slow one explores afresh.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from compressx.cli import main  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
OFFLINE = [p for p in RECIPES if "Not validated offline" not in p.read_text()]
SECONDS_PER_RECIPE = 60  # validate takes about a second; the bound catches hangs, with room for a loaded machine

# Values of every type a recipe might wrongly hold. No glob characters: a glob such as /** is a legitimate request
# to scan the whole disk, not a bad input.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 3, 2**31, 2**63, 10**12, 10**29, -(10**29)]),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf]),
    st.sampled_from(
        [
            "",
            "x",
            "2:4",
            "1:256",
            "unstructured",
            "float32",
            "perplexity",
            "stdlib_text",
            "magnitude",
            "zoo",
            "llama_byte_1m",
            "train",
            "test",
            "re:(",
            "re:.*mlp.*",
            "lm_head",
            "Linear",
            "${nope}",
            "${nope:1}",
            "${oc.env:COMPRESSX_SURELY_UNSET}",
            "${model}",
            "${steps}",
            "\x00",
            "é",
            "0" * 300,
        ]
    ),  # fmt: skip
    st.text(alphabet=st.characters(blacklist_characters="*?[", blacklist_categories=("Cs",)), max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) in a parsed recipe, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


@st.composite
def structural_mutation(draw, tree: Any) -> Any:
    path = draw(st.sampled_from(_paths(tree)))
    if not path:
        return draw(VALUES)  # the whole recipe replaced by something else
    parent, key = _get(tree, path[:-1]), path[-1]
    old = parent[key]
    kind = draw(st.sampled_from(["replace", "delete", "wrap-list", "wrap-dict", "empty", "add-key", "rename-key"]))
    if kind == "replace":
        parent[key] = draw(VALUES)
    elif kind == "delete":
        del parent[key]
    elif kind == "wrap-list":
        parent[key] = [old]
    elif kind == "wrap-dict":
        parent[key] = {"value": old}
    elif kind == "empty":
        parent[key] = type(old)() if isinstance(old, list | dict | str) else None
    elif kind == "add-key" and isinstance(old, dict):
        old[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    elif kind == "rename-key" and isinstance(parent, dict):
        parent[str(key)[:-1] + draw(st.sampled_from(["", "s", "_", "x"]))] = parent.pop(key)
    return tree


@st.composite
def mutated_recipe(draw) -> tuple[Path, bytes]:
    path = draw(st.sampled_from(OFFLINE))
    text = path.read_bytes()
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            tree = draw(structural_mutation(yaml.safe_load(text)))
            text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode()
        else:
            at = draw(st.integers(0, len(text)))
            kind = draw(st.sampled_from(["insert", "delete", "duplicate-line", "truncate"]))
            if kind == "insert":
                text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
            elif kind == "delete":
                text = text[:at] + text[at + draw(st.integers(1, 20)) :]
            elif kind == "duplicate-line":
                lines = text.splitlines(keepends=True) or [b""]
                line = draw(st.integers(0, len(lines) - 1))
                text = b"".join([*lines[: line + 1], lines[line], *lines[line + 1 :]])
            else:
                text = text[:at]
            try:
                yaml.safe_load(text)
            except (yaml.YAMLError, ValueError, RecursionError):
                break  # no longer YAML: validate it as it is
    return path, text


def _validate_never_crashes(case: tuple[Path, bytes]) -> None:
    source, text = case
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / source.name
        recipe.write_bytes(text)
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["-q", "validate", str(recipe), f"export.dir={Path(tmp) / 'out'}"])
        seconds = time.perf_counter() - start
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert code == 0 or err.getvalue().startswith("error: "), err.getvalue()
    assert seconds < SECONDS_PER_RECIPE, f"validate took {seconds:.0f} s on a mutation of {source.name}"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: a mutation that names a hub model fails at once instead of waiting on the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path / "cache"))  # validate builds nothing; if it did, not here


COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}


@settings(max_examples=100, derandomize=True, **COMMON)
@given(mutated_recipe())
def test_validate_of_a_mutated_recipe_exits_0_or_2(case):
    _validate_never_crashes(case)


@pytest.mark.slow
@settings(max_examples=400, **COMMON)
@given(mutated_recipe())
def test_validate_of_a_mutated_recipe_exits_0_or_2_explored(case):
    _validate_never_crashes(case)
