import dataclasses

import pytest
import torch
import torch.nn as nn

import compressx
from compressx.config import PassConfig
from compressx.errors import RecipeError
from compressx.registry import PassResult, register_pass


@dataclasses.dataclass(frozen=True)
class CalibConfig(PassConfig):
    pass


@register_pass(
    "needs_data", config=CalibConfig, kind="weights", paper="test", families=("any",),
    target_types=(nn.Linear,), needs=("calibration",),
)  # fmt: skip
def apply_needs_data(model, config, ctx):
    return PassResult(report={"samples": len(ctx.calibration)})


PRUNE = {"pass": "magnitude", "config": {"sparsity": 0.5}}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_missing_calibration_in_a_later_step_changes_nothing(tiny_llama):
    before = _snapshot(tiny_llama)
    with pytest.raises(RecipeError, match=r"steps\[1\]: pass 'needs_data' needs calibration data"):
        compressx.apply(tiny_llama, [PRUNE, {"pass": apply_needs_data}])
    assert _unchanged(tiny_llama, before)


def test_bad_target_of_a_user_pass_in_a_later_step_changes_nothing(tiny_llama):
    before = _snapshot(tiny_llama)
    with pytest.raises(RecipeError, match=r"steps\[1\].targets\[0\]: pattern 'lm_haed' matches no module"):
        compressx.apply(tiny_llama, [PRUNE, {"pass": apply_needs_data, "targets": ["lm_haed"]}], data=[1])
    assert _unchanged(tiny_llama, before)


def test_calibration_data_reaches_the_pass_and_reports_come_back_in_order(tiny_llama):
    tokens = torch.zeros(3, 8, dtype=torch.long)
    result = compressx.apply(tiny_llama, [PRUNE, {"pass": apply_needs_data}], data=tokens)
    assert [s.pass_name for s in result.steps] == ["magnitude", "needs_data"]
    assert result.steps[1].report == {"samples": 3}
    assert result.report()[0]["pass"] == "magnitude" and result.report()[0]["sparsity"] == pytest.approx(0.5, 1e-3)


def test_step_given_as_config_object(tiny_llama):
    from compressx.passes.magnitude import MagnitudeConfig

    result = compressx.apply(tiny_llama, [{"pass": "magnitude", "config": MagnitudeConfig(pattern="2:4")}])
    assert result.steps[0].config.pattern == "2:4"
