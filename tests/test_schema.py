"""`compressx schema`: a valid JSON Schema (draft 2020-12) of a recipe, generated from the block dataclasses and the
registered passes' configs. Every shipped recipe satisfies it; a wrong key anywhere is refused by it, as by
`compressx validate`."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from compressx.cli import main
from compressx.errors import RecipeError
from compressx.recipe import TOP_KEYS, parse_recipe, read_recipe
from compressx.schema import recipe_schema

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
TEXT = {"source": "stdlib_text", "split": "test", "samples": 4, "seq_len": 64}
BASE = {
    "model": {"source": "zoo", "id": "llama_byte_1m", "dtype": "float32"},
    "data": {"calibration": {**TEXT, "split": "train"}},
    "steps": [{"pass": "magnitude", "targets": ["re:.*mlp.*"], "ignore": ["lm_head"], "config": {"sparsity": 0.5}}],
    "eval": [{"metric": "perplexity", "data": TEXT, "batch_size": 2}],
    "export": {"dir": "out/x", "sparse_format": "bitmask"},
    "checkpoint": {"dir": "ckpt/x"},
}
TRAINING = {
    "model": {"source": "zoo", "id": "resnet_digits", "pretrained": False},
    "steps": [{"pass": "lbc", "config": {"pattern": "1:16", "start_epoch": 0, "end_epoch": 2}}],
    "train": {
        "data": {"source": "digits", "split": "train", "noise": 0.25},
        "epochs": 4,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "checkpoint": {"dir": "ckpt/t", "every": 2},
    },
    "eval": [{"metric": "top1", "data": {"source": "digits", "split": "test"}}],
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(recipe_schema())


def test_cli_prints_a_valid_draft_2020_12_schema_of_every_top_level_key(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == set(TOP_KEYS) and schema["additionalProperties"] is False
    passes = [item["properties"]["pass"]["const"] for item in schema["properties"]["steps"]["items"]["oneOf"]]
    assert "magnitude" in passes and "lbc" in passes and len(passes) == len(set(passes))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_satisfies_the_schema(validator, path):
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(read_recipe(path))]
    assert not errors, errors


@pytest.mark.parametrize("recipe", [BASE, TRAINING], ids=["llm", "training"])
def test_the_test_recipes_are_good_for_both(validator, recipe):
    assert validator.is_valid(recipe)
    parse_recipe(copy.deepcopy(recipe))


def _edit(recipe: dict, where: str, key: str, value) -> dict:
    recipe = copy.deepcopy(recipe)
    node = recipe
    for part in where.split(".") if where else []:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    return recipe


# (recipe, where, key, value): a wrong key, or a wrong value, that both the schema and parse_recipe refuse
WRONG = [
    (BASE, "", "modle", {}),
    (BASE, "model", "clas", "LlamaForCausalLM"),
    (BASE, "model", "class", "LlamaForCausalLM"),  # hf only
    (BASE, "model", "source", "hub"),
    (BASE, "model", "dtype", "float64"),
    (BASE, "data", "calib", {}),
    (BASE, "data.calibration", "sampels", 4),
    (BASE, "data.calibration", "path", "x.txt"),  # a key of text_file, not of stdlib_text
    (BASE, "data.calibration", "samples", 0),
    (BASE, "data.calibration", "source", "wikitext"),
    (BASE, "steps.0", "ignor", ["lm_head"]),
    (BASE, "steps.0.config", "sparsty", 0.5),
    (BASE, "steps.0.config", "sparsity", "lots"),
    (BASE, "steps.0", "pass", "magnitud"),
    (BASE, "eval.0", "batchsize", 2),
    (BASE, "eval.0.data", "seqlen", 64),
    (BASE, "export", "overwirte", True),
    (BASE, "export", "sparse_format", "zip"),
    (BASE, "checkpoint", "every", 2),  # train.checkpoint only
    (TRAINING, "train", "epoch", 3),
    (TRAINING, "train.optimizer", "lrr", 0.1),
    (TRAINING, "train.optimizer", "name", "adam"),
    (TRAINING, "train.schedule", "warmup", 1),
    (TRAINING, "train.data", "nosie", 0.1),
    (TRAINING, "train.data", "path", "/x"),  # image_folder only
    (TRAINING, "train", "label_smoothing", 1.0),
    (TRAINING, "train.checkpoint", "evry", 2),
    (TRAINING, "steps.0.config", "start_epoh", 0),
]


@pytest.mark.parametrize("recipe, where, key, value", WRONG, ids=[f"{w[1]}.{w[2]}".strip(".") for w in WRONG])
def test_a_wrong_key_or_value_is_refused_by_the_schema_and_by_validation(validator, recipe, where, key, value):
    bad = _edit(recipe, where, key, value)
    assert not validator.is_valid(bad)
    with pytest.raises(RecipeError):
        parse_recipe(bad)
