import dataclasses
from typing import ClassVar, Literal

import pytest

from compressx.config import Block, PassConfig, option
from compressx.errors import ConfigError
from compressx.registry import list_passes


@dataclasses.dataclass(frozen=True)
class DemoConfig(PassConfig):
    rate: float = 0.5
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    name: str = "x"
    layers: tuple[int, ...] = ()
    flag: bool = False
    limit: float | None = None


def test_from_dict_fills_defaults_and_normalises():
    config = DemoConfig.from_dict({"rate": 1, "layers": [1, 2]})
    assert config.rate == 1.0 and isinstance(config.rate, float)
    assert config.layers == (1, 2)
    assert config.to_dict() == {
        "rate": 1.0,
        "steps": 3,
        "mode": "a",
        "name": "x",
        "layers": [1, 2],
        "flag": False,
        "limit": None,
    }


def test_unknown_key_names_key_allowed_and_closest():
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict({"rte": 0.1})
    assert err.value.path == "rte"
    assert "allowed: flag, layers, limit, mode, name, rate, steps" in str(err.value)
    assert "did you mean 'rate'?" in str(err.value)


@pytest.mark.parametrize(
    "values, path, fragment",
    [
        ({"rate": "high"}, "rate", "expected a number"),
        ({"rate": True}, "rate", "expected a number"),
        ({"steps": 2.5}, "steps", "expected an integer"),
        ({"mode": "c"}, "mode", "allowed: 'a', 'b'"),
        ({"flag": 1}, "flag", "expected true or false"),
        ({"layers": [1, "x"]}, "layers[1]", "expected an integer"),
        ({"limit": "none"}, "limit", "expected number or null"),
    ],
)
def test_type_errors_name_the_field(values, path, fragment):
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict(values)
    assert err.value.path == path
    assert fragment in str(err.value)


def test_unquoted_yaml_ratio_gets_a_hint():
    with pytest.raises(ConfigError, match="quote it"):
        DemoConfig.from_dict({"name": 124})


def test_every_problem_of_one_config_is_reported_together():
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict({"rte": 0.1, "name": 124, "steps": 2.5})
    assert [path for path, _ in err.value.problems] == ["rte", "name", "steps"]
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and "did you mean 'rate'?" in lines[0] and "quote it" in lines[1]
    assert "expected an integer" in lines[2]
    assert err.value.under("steps[0].config").lines()[0].startswith("steps[0].config.rte: unknown key")


@pytest.mark.parametrize("spec", list_passes(), ids=lambda s: s.name)
def test_every_registered_config_round_trips(spec):
    config = spec.config.from_dict({})
    again = spec.config.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, next(iter(config.to_dict())), 0)


# --- the same mechanism for recipe blocks: tags, per-source keys, nested mappings, unions of blocks ---------------


@dataclasses.dataclass(frozen=True)
class DemoSource(Block):
    tag: ClassVar[str] = "kind"

    kind: str = option(choices=("file", "memory"), what="demo kind")
    path: str | None = option(None, only=("file",), needs=("file",), doc="where the file is")
    size: int = option(1, ge=1, le=10)
    lr: float = option(0.1, group="opt", ge=0)
    optimizer: str = option("sgd", group="opt", key="name", choices=("sgd", "adamw"))


@dataclasses.dataclass(frozen=True)
class DemoOther(Block):
    tag: ClassVar[str] = "kind"

    kind: str = option(choices=("tape",), what="demo kind")


@dataclasses.dataclass(frozen=True)
class DemoHolder(Block):
    holder: DemoSource | DemoOther | None = None
    seeds: tuple[int, ...] = ()


@pytest.mark.parametrize(
    "values, path, fragments",
    [
        ({"kind": "memory", "path": "x"}, "path", ["'path' applies to kind file only", "unknown key 'path'"]),
        ({"kind": "file"}, "path", ["demo kind file needs 'path' (where the file is)"]),
        ({"kind": "tape"}, "kind", ["unknown demo kind 'tape'; allowed: file, memory"]),
        ({"kind": "memory", "size": 11}, "size", ["got 11; expected an integer >= 1 and <= 10"]),
        ({"kind": "memory", "size": True}, "size", ["got True; expected an integer >= 1 and <= 10"]),
        ({"kind": "memory", "opt": {"lrr": 1}}, "opt.lrr", ["unknown key 'lrr'", "did you mean 'lr'?"]),
        ({"kind": "memory", "opt": {"name": "adam"}}, "opt.name", ["got 'adam'; allowed: sgd, adamw"]),
        ({"kind": "memory", "opt": "sgd"}, "opt", ["expected a mapping with keys lr, name"]),
    ],
)
def test_block_errors_name_the_path_and_what_is_allowed(values, path, fragments):
    with pytest.raises(ConfigError) as err:
        DemoSource.from_dict(values)
    assert err.value.path == path, str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_block_reads_nested_mappings_into_flat_fields_and_round_trips():
    block = DemoSource.from_dict({"kind": "file", "path": "p", "opt": {"lr": 1, "name": "adamw"}})
    assert (block.lr, block.optimizer, block.size) == (1.0, "adamw", 1)
    assert block.to_dict() == {"kind": "file", "path": "p", "size": 1, "opt": {"lr": 1.0, "name": "adamw"}}
    assert DemoSource.from_dict(block.to_dict()) == block
    assert "path" not in DemoSource.from_dict({"kind": "memory"}).to_dict()


def test_a_union_of_blocks_is_picked_by_the_tag_and_errors_keep_the_whole_path():
    assert DemoHolder.from_dict({"holder": {"kind": "tape"}}).holder == DemoOther("tape")
    assert DemoHolder.from_dict({}).holder is None
    with pytest.raises(ConfigError) as err:
        DemoHolder.from_dict({"holder": {"kind": "disk"}, "seeds": [1, "x"]})
    assert [path for path, _ in err.value.problems] == ["holder.kind", "seeds[1]"]
    assert "unknown demo kind 'disk'; allowed: file, memory, tape" in str(err.value)
    with pytest.raises(ConfigError, match=r"holder.size: got 0"):
        DemoHolder.from_dict({"holder": {"kind": "memory", "size": 0}})


def test_json_schema_of_a_tagged_block_has_one_variant_per_tag_value():
    defs: dict = {}
    ref = DemoHolder.json_schema(defs)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **ref, "$defs": defs}
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"holder": {"kind": "file", "path": "p", "opt": {"lr": 0.5}}})
    for bad in [
        {"holder": {"kind": "memory", "path": "p"}},  # path: file only
        {"holder": {"kind": "file"}},  # file needs path
        {"holder": {"kind": "memory", "size": 11}},
        {"holder": {"kind": "memory", "opt": {"lrr": 1}}},
        {"holder": {"kind": "disk"}},
        {"holdr": None},
    ]:
        assert not validator.is_valid(bad), bad


def test_every_recipe_block_round_trips_through_its_mapping(tmp_path):
    from compressx.builtin_trainer import TrainSpec
    from compressx.checkpoint import LayerCheckpointSpec
    from compressx.data import DataSpec
    from compressx.evaluate import EvalSpec
    from compressx.images import ImageDataSpec
    from compressx.models import ModelSpec
    from compressx.recipe import ExportSpec

    (tmp_path / "t.txt").write_text("x" * 100)
    train = {"data": {"source": "digits", "train_images": 100}, "epochs": 3, "optimizer": {"name": "adamw"},
             "checkpoint": {"dir": "c", "every": 2}}  # fmt: skip
    blocks = [
        ModelSpec.from_dict({"source": "hf", "id": "x", "class": "LlamaForCausalLM", "kwargs": {"revision": "a"}}),
        ModelSpec.from_dict({"source": "zoo", "id": "resnet_digits", "pretrained": False}),
        DataSpec.from_dict({"source": "text_files", "paths": str(tmp_path / "*.txt"), "samples": 2, "seq_len": 8}),
        ImageDataSpec.from_dict({"source": "image_folder", "path": "/d", "split": "val", "augment": False}),
        EvalSpec.from_dict({"metric": "top1", "data": {"source": "digits", "split": "test"}, "batch_size": 4}),
        TrainSpec.from_dict(train),
        ExportSpec.from_dict({"dir": "out", "overwrite": True}),
        LayerCheckpointSpec.from_dict({"dir": "c"}),
    ]
    for block in blocks:
        assert type(block).from_dict(block.to_dict()) == block, block
    assert blocks[2].paths == (str(tmp_path / "*.txt"),)  # one path stands for a list of one
