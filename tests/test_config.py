import dataclasses
from typing import Literal

import pytest

from compressx.config import PassConfig
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
