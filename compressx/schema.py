"""``compressx schema``: the JSON Schema (draft 2020-12) of a recipe, for editors that complete and check YAML.

Generated from the same dataclasses that validate a recipe (``compressx.config.Block``): the model, data, train,
eval, export and checkpoint blocks, and one ``steps`` item per registered pass (``oneOf``, picked by ``pass``)
with that pass's config. What a schema cannot say (a file that must exist, a split a dataset has, a target that
must match a module) is left to ``compressx validate``. docs/recipes.md shows how to point an editor at it.
"""

from __future__ import annotations

from typing import Any

from compressx.registry import PassSpec, list_passes

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def step_schema(spec: PassSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one step running pass ``spec``."""
    pattern = {"type": "string", "minLength": 1}
    patterns = _nullable({"anyOf": [pattern, {"type": "array", "items": pattern}]})
    properties: dict[str, Any] = {"pass": {"const": spec.name, "description": f"{spec.kind} pass: {spec.paper}"}}
    if spec.takes_targets:
        properties |= {"targets": patterns, "ignore": patterns}
    properties["config"] = _nullable(spec.config.json_schema(defs))
    return {"type": "object", "properties": properties, "required": ["pass"], "additionalProperties": False}


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file, with every pass registered in this installation (plugins included)."""
    from compressx.builtin_trainer import TrainSpec
    from compressx.checkpoint import LayerCheckpointSpec
    from compressx.evaluate import EvalSpec
    from compressx.models import ModelSpec
    from compressx.recipe import DataBlock, ExportSpec

    defs: dict[str, Any] = {}
    properties = {
        "model": ModelSpec.json_schema(defs),
        "data": _nullable(DataBlock.json_schema(defs)),
        "steps": {"type": "array", "minItems": 1, "items": {"oneOf": [step_schema(s, defs) for s in list_passes()]}},
        "train": _nullable(TrainSpec.json_schema(defs)),
        "eval": _nullable({"type": "array", "items": EvalSpec.json_schema(defs)}),
        "export": _nullable(ExportSpec.json_schema(defs)),
        "checkpoint": _nullable(LayerCheckpointSpec.json_schema(defs)),
    }
    return {
        "$schema": DRAFT,
        "title": "compressx recipe",
        "description": "A compressx recipe (docs/recipes.md); `compressx validate` checks the rest.",
        "type": "object",
        "properties": properties,
        "required": ["steps"],
        "additionalProperties": False,
        "$defs": defs,
    }
