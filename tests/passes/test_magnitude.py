import pytest
import torch

import compressx
from compressx.errors import ConfigError, RecipeError
from compressx.ops.sparsity import is_nm_sparse
from compressx.passes.magnitude import MagnitudeConfig, magnitude_mask


def test_config_defaults_and_nm_implied_sparsity():
    assert MagnitudeConfig().sparsity == 0.5
    assert MagnitudeConfig(pattern="1:4").sparsity == 0.75
    assert MagnitudeConfig.from_dict({"pattern": "2:4", "sparsity": 0.5}).sparsity == 0.5


@pytest.mark.parametrize(
    "values, path, fragment",
    [
        ({"sparsity": 1.0}, "sparsity", "[0, 1)"),
        ({"sparsity": -0.1}, "sparsity", "[0, 1)"),
        ({"pattern": "2:4", "sparsity": 0.7}, "sparsity", "fixes sparsity at 0.5"),
        ({"pattern": "4:2"}, "pattern", "0 < N < M"),
        ({"pattern": "dense"}, "pattern", "allowed: 'unstructured' or 'N:M'"),
        ({"pattern": "2:4", "scope": "row"}, "scope", "unstructured pattern only"),
        ({"pattern": 124}, "pattern", "quote it"),
    ],
)
def test_config_errors(values, path, fragment):
    with pytest.raises(ConfigError) as err:
        MagnitudeConfig.from_dict(values)
    assert err.value.path == path
    assert fragment in str(err.value)


def test_unstructured_layer_matches_threshold_reference():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    mask = magnitude_mask(weight, MagnitudeConfig(sparsity=0.6))
    k = round(0.6 * weight.numel())
    threshold = weight.abs().flatten().kthvalue(k).values
    # with continuous random weights there are no ties: exactly the k smallest are dropped
    assert torch.equal(mask, weight.abs() > threshold)


def test_row_scope_prunes_each_row_equally():
    torch.manual_seed(0)
    weight = torch.randn(8, 20) * torch.linspace(0.1, 10, 8)[:, None]  # rows of very different scale
    row = magnitude_mask(weight, MagnitudeConfig(sparsity=0.5, scope="row"))
    layer = magnitude_mask(weight, MagnitudeConfig(sparsity=0.5, scope="layer"))
    assert torch.all((~row).sum(dim=1) == 10)
    assert not torch.all((~layer).sum(dim=1) == 10)  # a per-layer threshold empties the small rows first


def test_apply_unstructured_on_llama(tiny_llama):
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    result = compressx.apply(tiny_llama, [{"pass": "magnitude", "config": {"sparsity": 0.5}, "ignore": ["lm_head"]}])
    report = result.steps[0].report
    assert report["modules"] == 14
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in report["per_module"].values())
    assert torch.equal(tiny_llama.lm_head.weight, before["lm_head.weight"])  # ignored
    q = tiny_llama.model.layers[0].self_attn.q_proj.weight
    kept = q != 0
    assert torch.equal(q[kept], before["model.layers.0.self_attn.q_proj.weight"][kept])  # survivors unchanged


def test_apply_nm_on_conv_and_linear(tiny_cnn):
    result = compressx.apply(
        tiny_cnn, [{"pass": "magnitude", "config": {"pattern": "2:4"}, "targets": ["body", "head"]}]
    )
    assert result.steps[0].targets == ["body.0", "body.2", "head"]
    for module in (tiny_cnn.body[0], tiny_cnn.body[2], tiny_cnn.head):
        assert is_nm_sparse(module.weight, 2, 4)
    assert result.steps[0].report["sparsity"] == pytest.approx(0.5)
    assert not (tiny_cnn.stem.weight == 0).any()


def test_nm_on_indivisible_input_names_the_module(tiny_cnn):
    # the stem has a single input channel: 2:4 cannot apply to it
    with pytest.raises(RecipeError, match="module 'stem' has input dimension 1, not divisible by M=4"):
        compressx.apply(tiny_cnn, [{"pass": "magnitude", "config": {"pattern": "2:4"}}])
    assert not (tiny_cnn.body[0].weight == 0).any()  # nothing was changed before the error


def test_pruning_raises_loss_monotonically(tiny_llama):
    from conftest import make_tiny_llama

    torch.manual_seed(1)
    x = torch.randint(0, 64, (4, 32))
    reference = tiny_llama(input_ids=x).logits
    errors = []
    for sparsity in (0.2, 0.5, 0.8):
        model = make_tiny_llama()
        compressx.apply(model, [{"pass": "magnitude", "config": {"sparsity": sparsity}}], progress=False)
        errors.append((model(input_ids=x).logits - reference).pow(2).mean().item())
    assert errors[0] < errors[1] < errors[2]
