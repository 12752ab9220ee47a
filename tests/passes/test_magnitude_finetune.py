import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import compressx
from compressx.errors import ConfigError
from compressx.ops.sparsity import is_nm_sparse, nm_mask, to_input_last
from compressx.passes.magnitude_finetune import MagnitudeFinetuneConfig

SPARSE = ("conv", "fc")


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x)))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def _epoch(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(8, 1, 6, 6, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _latent(model, name):
    return model.get_submodule(name).parametrizations.weight.original


def test_dense_until_prune_epoch_then_a_fixed_magnitude_mask():
    torch.manual_seed(0)
    model = Net()
    handle = compressx.prepare(model, "magnitude_finetune", {"pattern": "2:4", "prune_epoch": 2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    masks = {}
    for epoch in range(5):
        if epoch == 2:
            at_prune = {name: _latent(model, name).detach().clone() for name in SPARSE}
        handle.on_epoch_start(epoch)
        for name in SPARSE:
            module = model.get_submodule(name)
            if epoch < 2:
                assert torch.equal(module.weight, _latent(model, name))  # dense
            else:
                keep = module.parametrizations.weight[0].mask
                if epoch == 2:
                    assert torch.equal(keep, nm_mask(at_prune[name].abs(), 2, 4))
                    masks[name] = keep.clone()
                assert torch.equal(keep, masks[name])  # fixed, although the weights keep training
                assert is_nm_sparse(module.weight, 2, 4)
        _epoch(model, optimizer, epoch)
        if epoch >= 2:
            for name in SPARSE:
                latent = _latent(model, name)
                assert not bool(latent.grad[~masks[name]].any())  # pruned weights get no gradient
                assert bool(latent.grad[masks[name]].any())
    assert handle.history == [{"epoch": 2, "pruned": "2:4"}]
    handle.finalize()
    for name in SPARSE:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        assert torch.equal(module.weight != 0, masks[name])
        blocks = to_input_last(module.weight.detach()).reshape(-1, 4)
        assert bool(((blocks != 0).sum(dim=1) == 2).all())
    assert handle.final_report["sparsity"] == 0.5


def test_prune_at_finalize_if_never_reached():
    torch.manual_seed(0)
    model = Net()
    keys = set(model.state_dict())
    handle = compressx.prepare(model, "magnitude_finetune", {"pattern": "1:4", "prune_epoch": 10})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        handle.on_epoch_start(epoch)
        _epoch(model, optimizer, epoch)
    latent = {name: _latent(model, name).detach().clone() for name in SPARSE}
    assert handle.history == []
    handle.finalize()
    for name in SPARSE:
        weight = model.get_submodule(name).weight.detach()
        expected = torch.where(nm_mask(latent[name].abs(), 1, 4), latent[name], torch.zeros(()))
        assert torch.equal(weight, expected)
    assert set(model.state_dict()) == keys
    assert handle.final_report["sparsity"] == 0.75


def test_prune_epoch_zero_prunes_at_once_and_remove_restores():
    torch.manual_seed(0)
    model = Net()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in SPARSE}
    handle = compressx.prepare(model, "magnitude_finetune", {"pattern": "2:4"})
    handle.on_epoch_start(0)
    for name in SPARSE:
        assert is_nm_sparse(model.get_submodule(name).weight, 2, 4)
    handle.remove()
    for name in SPARSE:
        assert not parametrize.is_parametrized(model.get_submodule(name))
        assert torch.equal(model.get_submodule(name).weight.detach(), dense[name])


def test_mask_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = Net()
    handle = compressx.prepare(model, "magnitude_finetune", {"pattern": "2:4", "prune_epoch": 0})
    handle.on_epoch_start(0)
    state = model.state_dict()
    torch.manual_seed(1)
    fresh = Net()
    fresh_handle = compressx.prepare(fresh, "magnitude_finetune", {"pattern": "2:4", "prune_epoch": 0})
    fresh.load_state_dict(state)
    fresh_handle.load_state_dict(handle.state_dict())
    fresh_handle.on_epoch_start(1)  # already pruned: the loaded mask is kept, not recomputed
    for name in SPARSE:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)


def test_config_errors():
    with pytest.raises(ConfigError) as err:
        MagnitudeFinetuneConfig.from_dict({"prune_epoch": -1})
    assert err.value.path == "prune_epoch" and ">= 0" in str(err.value)
