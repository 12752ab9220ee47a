import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import compressx
from compressx.errors import ConfigError, RecipeError
from compressx.ops.sparsity import is_nm_sparse, nm_mask, to_input_last
from compressx.passes.sr_ste import SrSteConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, stem_in: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(stem_in, 8, 3, padding=1)  # 4 input channels: M divides it, the stem rule skips it
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, hidden, 1)
        self.fc = nn.Linear(hidden, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = self.pw(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def _projection(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.where(nm_mask(weight.abs(), n, m), weight, torch.zeros((), dtype=weight.dtype))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_forward_is_the_nm_projection_of_the_latent_weight(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = Net()
    compressx.prepare(model, "sr_ste", {"pattern": pattern})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 4, 6, 6)
    for _ in range(3):  # the mask follows the latent weight at every step
        for name in ("conv", "pw", "fc"):
            module = model.get_submodule(name)
            latent = module.parametrizations.weight.original
            assert torch.equal(module.weight, _projection(latent.detach(), n, m))
            assert is_nm_sparse(module.weight, n, m)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("decay", [2e-4, 0.5, 0.0])
def test_backward_adds_the_decay_on_pruned_weights(decay):
    torch.manual_seed(0)
    layer = nn.Linear(8, 3).double()
    compressx.prepare(
        nn.Sequential(layer),
        "sr_ste",
        {"pattern": "2:4", "decay": decay, "skip_stem": False, "skip_classifier": False},
    )
    x = torch.randn(5, 8, dtype=torch.float64)
    upstream = torch.randn(5, 3, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    latent = layer.parametrizations.weight.original
    grad_eff = upstream.t() @ x  # ∂L/∂W_eff of a Linear, by hand
    pruned = ~nm_mask(latent.detach().abs(), 2, 4)
    expected = grad_eff + decay * pruned * latent.detach()
    assert torch.allclose(latent.grad, expected, rtol=0, atol=1e-12)
    if decay:
        assert not torch.allclose(latent.grad, grad_eff)


def test_conv_backward_hand_check():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3).double()
    compressx.prepare(
        nn.Sequential(conv), "sr_ste", {"pattern": "2:4", "decay": 0.1, "skip_stem": False, "skip_classifier": False}
    )
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    (conv(x) ** 2).sum().backward()
    effective = conv.weight.detach().clone().requires_grad_(True)
    (F.conv2d(x, effective, conv.bias) ** 2).sum().backward()
    latent = conv.parametrizations.weight.original
    keep = nm_mask(latent.detach().abs(), 2, 4)
    # OHWI blocks: 2 kept of every 4 consecutive input channels at each (o, kh, kw)
    assert bool((to_input_last(keep).reshape(-1, 4).sum(dim=1) == 2).all())
    assert torch.allclose(latent.grad, effective.grad + 0.1 * (~keep) * latent.detach(), rtol=1e-12, atol=1e-9)


def test_finalize_is_nm_with_plain_modules():
    torch.manual_seed(0)
    model = Net()
    keys = set(model.state_dict())
    handle = compressx.prepare(model, "sr_ste", {"pattern": "2:4"})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4, 6, 6)
    for _ in range(3):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = model(x)
        projected = {name: model.get_submodule(name).weight.clone() for name in ("conv", "pw", "fc")}
    handle.finalize()
    for name, weight in projected.items():
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        assert torch.equal(module.weight.detach(), weight)
        blocks = to_input_last(module.weight.detach()).reshape(-1, 4)
        assert bool(((blocks != 0).sum(dim=1) == 2).all())
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0, atol=1e-6)
    assert handle.final_report["sparsity"] == 0.5
    assert handle.history == []  # no schedule


def test_stem_and_classifier_stay_dense_by_default():
    model = Net()
    handle = compressx.prepare(model, "sr_ste", {"pattern": "2:4"})
    assert not parametrize.is_parametrized(model.stem) and not parametrize.is_parametrized(model.head)
    assert all(parametrize.is_parametrized(model.get_submodule(n)) for n in ("conv", "pw", "fc"))
    handle.remove()
    model = Net()
    handle = compressx.prepare(model, "sr_ste", {"pattern": "2:4", "skip_stem": False, "skip_classifier": False})
    assert parametrize.is_parametrized(model.stem) and parametrize.is_parametrized(model.head)


def test_skip_reasons_are_reported():
    from compressx.api import apply

    result = apply(Net(), [{"pass": "sr_ste", "config": {"pattern": "2:4"}}], progress=False)
    dense = result.steps[0].report["dense_modules"]
    assert dense == {"stem": "stem (skip_stem)", "head": "classifier (skip_classifier)"}


def test_incompatible_layer_is_skipped_or_an_error():
    model = Net(hidden=6)  # fc has 6 inputs: not divisible by M=4
    handle = compressx.prepare(model, "sr_ste", {"pattern": "2:4"})
    assert not parametrize.is_parametrized(model.fc)
    assert parametrize.is_parametrized(model.conv)
    handle.remove()
    with pytest.raises((ConfigError, RecipeError)) as err:  # the pass's ConfigError, reported by apply()
        compressx.prepare(Net(hidden=6), "sr_ste", {"pattern": "2:4", "incompatible": "error"})
    assert "incompatible: skip" in str(err.value)
    assert "'fc'" in str(err.value) and "6" in str(err.value) and "M=4" in str(err.value)
    assert "pw" not in str(err.value)


def test_nothing_sparsifiable_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises((ConfigError, RecipeError), match="no targeted layer can take 2:4"):
        compressx.prepare(model, "sr_ste", {"pattern": "2:4"})


def test_masked_weight_keeps_the_plain_layout():
    # Same root cause as tests/passes/test_lbc.py::test_masked_weight_keeps_the_plain_layout: the 1x1 conv's N:M
    # projection gets channels-last strides, which the finalized weight keeps (leave_parametrized=True).
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 1)
    x = torch.randn(4, 16, 8, 8)
    wrapper = nn.Sequential(conv).eval()
    handle = compressx.prepare(wrapper, "sr_ste", {"pattern": "2:4", "skip_stem": False, "skip_classifier": False})
    with torch.no_grad():
        out = wrapper(x)
        plain = F.conv2d(x, conv.weight.clone(memory_format=torch.contiguous_format), conv.bias)
    assert torch.equal(out, plain)
    handle.finalize()
    assert conv.weight.stride() == (16, 1, 1, 1)


@pytest.mark.parametrize(
    "values, path, fragment",
    [({"decay": -1.0}, "decay", ">= 0"), ({"pattern": "4:4"}, "pattern", "0 < N < M")],
)
def test_config_errors(values, path, fragment):
    with pytest.raises(ConfigError) as err:
        SrSteConfig.from_dict(values)
    assert err.value.path == path and fragment in str(err.value)
