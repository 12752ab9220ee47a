"""compressx: one registry of compression passes, applied to PyTorch / Hugging Face models through recipes.

Python API::

    import compressx
    result = compressx.apply(model, [{"pass": "magnitude", "config": {"sparsity": 0.5}, "ignore": ["lm_head"]}])
    compressx.save(model, "out/pruned", result)
    model = compressx.load("out/pruned")
    compressx.push_to_hub("out/pruned", "USER/NAME")

``Recipe``, ``load_recipe`` and ``run_recipe`` are imported on first use: the recipe format and runner bring the
model builders, the evaluators and the trainer, which ``import compressx`` does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressx._version import __version__
from compressx.config import PassConfig
from compressx.engine import ApplyResult, StepResult, StepSpec, apply, prepare
from compressx.errors import CompressxError, ConfigError, ExportError, RecipeError, RegistryError, TargetError
from compressx.export import load, save
from compressx.manifest import read_manifest
from compressx.push import push_to_hub
from compressx.registry import Need, PassContext, PassResult, PassSpec, get_pass, list_passes, register_pass

if TYPE_CHECKING:
    from compressx.recipe import Recipe, load_recipe
    from compressx.runner import run_recipe

__all__ = [
    "ApplyResult",
    "CompressxError",
    "ConfigError",
    "ExportError",
    "Need",
    "PassConfig",
    "PassContext",
    "PassResult",
    "PassSpec",
    "Recipe",
    "RecipeError",
    "RegistryError",
    "StepResult",
    "StepSpec",
    "TargetError",
    "__version__",
    "apply",
    "get_pass",
    "list_passes",
    "load",
    "load_recipe",
    "prepare",
    "push_to_hub",
    "read_manifest",
    "register_pass",
    "run_recipe",
    "save",
]


def __getattr__(name: str) -> Any:
    if name in ("Recipe", "load_recipe"):
        from compressx import recipe

        return getattr(recipe, name)
    if name == "run_recipe":
        from compressx import runner

        return runner.run_recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
