"""Repository consistency: every built-in pass has what a pass needs around it.

For each module in ``compressx.passes.BUILTIN_PASS_MODULES`` and the pass it registers:
the registry name equals the file name, the function is ``apply_<name>``, the config is ``<Name>Config``,
the module has a docstring, and there are ``tests/passes/test_<name>.py``, ``docs/passes/<name>.md`` and at
least one recipe under ``recipes/`` with ``pass: <name>``. Exits 1 listing what is missing.

Run: python tools/check_registry.py   (part of `make quality`, hence of CI)
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def problems() -> list[str]:
    from compressx.passes import BUILTIN_PASS_MODULES
    from compressx.registry import _specs_in_module

    found = []
    recipes = {p: p.read_text() for p in (ROOT / "recipes").rglob("*.yaml")}
    for module_name in BUILTIN_PASS_MODULES:
        module = importlib.import_module(module_name)
        specs = _specs_in_module(module)
        if len(specs) != 1:
            found.append(f"{module_name}: defines {len(specs)} passes; one file holds one pass")
            continue
        spec = specs[0]
        name = spec.name
        camel = "".join(part.capitalize() for part in name.split("_"))
        if module_name.rsplit(".", 1)[-1] != name:
            found.append(f"{module_name}: registers '{name}'; the file must be named {name}.py")
        if spec.fn.__name__ != f"apply_{name}":
            found.append(f"{module_name}: the pass function is {spec.fn.__name__}, expected apply_{name}")
        if spec.config.__name__ != f"{camel}Config":
            found.append(f"{module_name}: the config is {spec.config.__name__}, expected {camel}Config")
        if not (module.__doc__ or "").strip():
            found.append(f"{module_name}: no module docstring (paper, idea, what the pass touches)")
        for path in (f"tests/passes/test_{name}.py", f"docs/passes/{name}.md"):
            if not (ROOT / path).is_file():
                found.append(f"pass '{name}': {path} is missing")
        pattern = re.compile(rf"pass:\s*{name}\b")
        if not any(pattern.search(text) for text in recipes.values()):
            found.append(f"pass '{name}': no recipe under recipes/ uses it")
    return found


if __name__ == "__main__":
    issues = problems()
    for line in issues:
        print(line)
    print(f"check_registry: {'FAILED' if issues else 'ok'}")
    sys.exit(1 if issues else 0)
