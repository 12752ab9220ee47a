"""The shape of the package: no import cycle among compressx's modules, and ``import compressx.api`` stays light.

The cycle check reads every ``import`` statement with ``ast``, wherever it is: at module level, inside a function
(a lazy import is still a dependency) and under ``if TYPE_CHECKING:`` (a module whose annotations need another
cannot be read without it, so a type-only import counts too). ``from compressx.a import b`` is an edge to the
module ``compressx.a.b`` when there is one, else to ``compressx.a``. Importing a submodule also runs its
package's ``__init__``; that implicit edge is not counted (it would join every module to ``compressx/__init__``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compressx"


def _modules(package: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (any import statement anywhere in its source)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        edges.add(full)
                    elif base in modules:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete cycle through the component's first module, for the failure message."""
    start = component[0]
    members = set(component)
    path, seen = [start], {start}
    while True:
        following = sorted(graph[path[-1]] & members)
        if start in following and len(path) > 1:
            return " -> ".join([*path, start])
        unseen = [m for m in following if m not in seen]
        if not unseen:
            return " -> ".join([*path, "..."])
        path.append(unseen[0])
        seen.add(unseen[0])


def test_no_import_cycle_among_compressx_modules():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(_cycle_path(graph, c) for c in cycles)


def test_the_cycle_check_finds_a_lazy_and_a_type_only_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]


HEAVY = (
    "transformers",
    "diffusers",
    "timm",
    "accelerate",
    "compressx.builtin_trainer",
    "compressx.training",
    "compressx.evaluate",
)


def test_import_compressx_api_stays_light():
    """The engine needs torch, not the model libraries, the trainer or the evaluators."""
    code = f"import json, sys; import compressx.api; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    ).stdout
    assert json.loads(out.splitlines()[-1]) == []


# The layers of docs/architecture.md, bottom up. A module imports modules of its own layer or of lower ones only.
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        ["errors", "config", "_version", "ops", "targets", "checkpoint", "atomic", "threads", "pipelines"]
        + ["manifest", "sparse_export", "gguf_files", "hooks", "hooks.*", "offload", "memory"],
        0,
    ),  # foundation
    **dict.fromkeys(["registry", "passes"], 1),  # the registry (and the list of built-in pass modules)
    "engine": 2,
    **dict.fromkeys(["passes.*", "layerwise", "training"], 3),  # the passes and what several share
    **dict.fromkeys(
        ["data", "images", "zoo", "zoo.*", "models", "evaluate", "builtin_trainer", "push", "lm_harness"], 4
    ),
    **dict.fromkeys(["recipe", "schema"], 5),  # the recipe file format and its JSON Schema
    **dict.fromkeys(["export", "quant_export", "model_card", "report"], 6),
    "runner": 7,
    **dict.fromkeys(["cli", "__main__", "api", ""], 8),  # the CLI and the public facade (compressx, compressx.api)
}


def layer_of(module: str) -> int | None:
    name = module.removeprefix("compressx").removeprefix(".")
    parts = name.split(".")
    for key in (name, f"{parts[0]}.*" if len(parts) > 1 else None, parts[0]):
        if key is not None and key in LAYERS:
            return LAYERS[key]
    return None


def test_every_import_goes_down_the_layers_of_docs_architecture():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"give these modules a layer (LAYERS here and docs/architecture.md): {unplaced}"
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports up the layers: " + "; ".join(upward)
