"""compressx: one registry of compression passes, applied to PyTorch / Hugging Face models through recipes.

Python API::

    import compressx
    result = compressx.apply(model, [{"pass": "magnitude", "config": {"sparsity": 0.5}, "ignore": ["lm_head"]}])
    compressx.save(model, "out/pruned", result)
    model = compressx.load("out/pruned")
    compressx.push_to_hub("out/pruned", "USER/NAME")
"""

__version__ = "0.1.0"

from compressx.api import ApplyResult, StepResult, apply, prepare, run_recipe
from compressx.config import PassConfig
from compressx.errors import CompressxError, ConfigError, ExportError, RecipeError, RegistryError, TargetError
from compressx.export import load, read_manifest, save
from compressx.push import push_to_hub
from compressx.recipe import Recipe, StepSpec, load_recipe
from compressx.registry import PassContext, PassResult, PassSpec, get_pass, list_passes, register_pass

__all__ = [
    "ApplyResult",
    "CompressxError",
    "ConfigError",
    "ExportError",
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
