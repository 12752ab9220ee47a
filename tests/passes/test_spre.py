import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import compressx
from compressx.api import apply
from compressx.errors import ConfigError
from compressx.ops.sparsity import is_nm_sparse, nm_mask, to_input_last
from compressx.passes.spre import SpreConfig, SpreConv2d, spatial_mask

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A ResNet basic block (residual; 1x1 conv + BN shortcut when it downsamples)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def _train(model, x, steps=4, lr=0.1):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        noisy = x + 0.3 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        loss = model(noisy).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _randomise_bns(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                shape, dtype = module.weight.shape, module.weight.dtype
                module.weight.copy_(torch.rand(shape, generator=generator, dtype=dtype) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator, dtype=dtype))
                module.running_mean.copy_(torch.randn(shape, generator=generator, dtype=dtype))
                module.running_var.copy_(torch.rand(shape, generator=generator, dtype=dtype) + 0.5)


# --- spatial mask -----------------------------------------------------------------------------------------------


def _levelled_kernel() -> torch.Tensor:
    """[4, 4, 3, 3]: every kernel position holds one magnitude level: centre 100, edges 10..13, corners 1..4."""
    levels = torch.tensor([[1.0, 10.0, 2.0], [11.0, 100.0, 12.0], [3.0, 13.0, 4.0]])
    generator = torch.Generator().manual_seed(0)
    jitter = 0.01 * torch.rand(4, 4, 3, 3, generator=generator)
    signs = torch.randint(0, 2, (4, 4, 3, 3), generator=generator) * 2 - 1
    return (levels + jitter) * signs


def test_spatial_mask_centre_on_corners_off():
    # 2:4, p = 0.5: 72 of 144 pruned = the 4 corners (64) + 8 of the lowest edge (fraction 0.5, not < p)
    mask = spatial_mask(_levelled_kernel(), 2, 4)
    assert mask.dtype == torch.bool and mask.shape == (3, 3)
    assert mask.tolist() == [[False, False, False], [True, True, True], [False, True, False]]


def test_spatial_mask_uses_one_minus_n_over_m():
    # 1:4, p = 0.75: 108 pruned = corners (64) + edges 10 and 11 (32) + 12 of edge 12 (fraction 0.75, not < p).
    # With p = N/M = 0.25 instead, 36 pruned: corners 1, 2 and 4 of corner 3 → every edge would be on.
    assert spatial_mask(_levelled_kernel(), 1, 4).tolist() == [
        [False, False, False],
        [False, True, False],
        [False, True, False],
    ]
    assert spatial_mask(_levelled_kernel(), 3, 4).tolist() == [  # p = 0.25: corners 1, 2 and 4 of corner 3
        [False, True, False],
        [True, True, True],
        [False, True, True],
    ]


# --- fold equivalence -------------------------------------------------------------------------------------------


def _pair(stride=1, bias=False, groups=1, dtype=torch.float32):
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(16, 16, 3, stride, 1, bias=bias, groups=groups), nn.BatchNorm2d(16)).to(dtype)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fold_equals_the_two_branch_block(stride, bias, groups, dtype, tol):
    model = _pair(stride, bias, groups, dtype)
    handle = compressx.prepare(model, "spre", {"pattern": "2:4", "skip_stem": False})
    block = model[0]
    assert isinstance(block, SpreConv2d) and isinstance(model[1], nn.Identity)
    x = torch.randn(4, 16, 8, 8, dtype=dtype)
    _train(model, x)
    _randomise_bns(model)  # non-trivial statistics on both branches
    model.eval()
    with torch.no_grad():
        two_branch = model(x)
        main_keep = nm_mask(block.conv.weight.abs(), 2, 4)
        weight, deploy_bias = block.fold()
        single = F.conv2d(x, weight, deploy_bias, stride, 1, 1, groups)
    assert (two_branch - single).abs().max() <= tol
    assert is_nm_sparse(weight, 2, 4)
    assert not bool(((weight != 0) & ~main_keep).any())  # supp(W_deploy) ⊆ supp(B_main)
    handle.finalize()
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.BatchNorm2d
    with torch.no_grad():
        assert (model(x) - two_branch).abs().max() <= tol
    assert is_nm_sparse(model[0].weight, 2, 4)
    assert not bool(((model[0].weight != 0) & ~main_keep).any())


def test_train_mode_is_not_expected_to_fold():
    # BatchNorm uses batch statistics in train mode: the fold is an eval-mode identity only. Do not "fix" the
    # tolerance of the test above because of this.
    model = _pair()
    compressx.prepare(model, "spre", {"pattern": "2:4", "skip_stem": False})
    x = torch.randn(4, 16, 8, 8)
    _train(model, x)
    _randomise_bns(model)
    block = model[0]
    with torch.no_grad():
        weight, bias = block.fold()
        model.train()
        train_out = model(x)
    assert (train_out - F.conv2d(x, weight, bias, 1, 1)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_whole_model_fold(dtype, tol):
    torch.manual_seed(0)
    model = ResNetLike().to(dtype)
    keys = set(model.state_dict())
    types = {name: type(module) for name, module in model.named_modules()}
    handle = compressx.prepare(model, "spre", {"pattern": "2:4"})
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, SpreConv2d)}
    assert set(blocks) == {"layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"}  # stem stays dense
    assert parametrize.is_parametrized(model.layer2.shortcut[0]) and parametrize.is_parametrized(model.fc)
    assert not parametrize.is_parametrized(model.stem)
    x = torch.randn(6, 3, 8, 8, dtype=dtype)
    _train(model, x)
    model.eval()
    with torch.no_grad():
        before = model(x)
        main_keep = {name: nm_mask(b.conv.weight.abs(), 2, 4) for name, b in blocks.items()}
    handle.finalize()
    assert {name: type(module) for name, module in model.named_modules()} == types
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert (model(x) - before).abs().max() <= tol
    for name, keep in main_keep.items():
        weight = model.get_submodule(name).weight
        assert is_nm_sparse(weight, 2, 4) and not bool(((weight != 0) & ~keep).any())
    for name in ("layer2.shortcut.0", "fc"):
        assert is_nm_sparse(model.get_submodule(name).weight, 2, 4)
    fresh = ResNetLike().to(dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - model(x)).abs().max() <= tol
    assert handle.final_report["sparsity"] == 0.5


def test_other_layers_get_sr_ste_only():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.ReLU()
            self.pw = nn.Conv2d(8, 8, 1)  # 1x1, followed by a BatchNorm
            self.pw_bn = nn.BatchNorm2d(8)
            self.late = nn.Conv2d(8, 8, 3, padding=1)  # a BatchNorm is registered next but the ReLU comes first
            self.late_bn = nn.BatchNorm2d(8)
            self.paired = nn.Conv2d(8, 8, 3, padding=1)
            self.paired_bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)
            # no BatchNorm: registered last (a non-BatchNorm sibling after it trips
            # test_conv_followed_by_a_module_without_num_features)
            self.nobn = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.act(self.nobn(self.stem(x)))
            x = self.pw_bn(self.pw(x))
            x = self.late_bn(torch.relu(self.late(x)))
            x = self.paired_bn(self.paired(x))
            return self.fc(x.mean(dim=(2, 3)))

    model = Net()
    result = apply(model, [{"pass": "spre", "config": {"pattern": "2:4"}}], progress=False)
    report = result.steps[0].report
    assert set(report["sr_ste_only"]) == {"nobn", "pw", "late", "fc"}
    assert "traced graph" in report["sr_ste_only"]["late"]
    assert report["extra_branches"] == 1
    assert isinstance(model.paired, SpreConv2d) and isinstance(model.paired_bn, nn.Identity)
    for name in ("nobn", "pw", "late", "fc"):
        assert parametrize.is_parametrized(model.get_submodule(name))
    assert type(model.late_bn) is nn.BatchNorm2d and not parametrize.is_parametrized(model.stem)


def test_conv_followed_by_a_module_without_num_features():
    # A 3x3 conv followed by an nn.ReLU sibling (conftest's TinyCNN body): following_batchnorm reads
    # ``nxt.num_features`` before checking the sibling is a BatchNorm2d -> AttributeError instead of SR-STE only.
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1))
    compressx.prepare(model, "spre", {"pattern": "2:4"})
    assert parametrize.is_parametrized(model[1])


def test_depthwise_conv_stays_dense():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)
    )
    result = apply(model, [{"pass": "spre", "config": {"pattern": "2:4"}}], progress=False)
    report = result.steps[0].report
    assert "1" in report["dense_modules"] and "not divisible by M=4" in report["dense_modules"]["1"]
    assert report["extra_branches"] == 0


def test_remove_restores_dense_modules():
    torch.manual_seed(0)
    model = ResNetLike()
    keys = set(model.state_dict())
    bn = model.layer1.bn1
    handle = compressx.prepare(model, "spre", {"pattern": "2:4"})
    x = torch.randn(6, 3, 8, 8)
    _train(model, x)
    latent = model.layer1.conv1.conv.weight.detach().clone()
    fc_latent = model.fc.parametrizations.weight.original.detach().clone()
    handle.remove()
    assert type(model.layer1.conv1) is nn.Conv2d and model.layer1.bn1 is bn
    assert torch.equal(model.layer1.conv1.weight.detach(), latent)
    assert not is_nm_sparse(model.layer1.conv1.weight, 2, 4)  # the dense latent weight, no zeros
    assert not parametrize.is_parametrized(model.fc) and torch.equal(model.fc.weight.detach(), fc_latent)
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, SpreConv2d) for m in model.modules())


def test_extra_branch_mask_follows_main_mask_and_spatial_mask():
    model = _pair()
    compressx.prepare(model, "spre", {"pattern": "2:4", "skip_stem": False})
    x = torch.randn(2, 16, 6, 6)
    _train(model, x, steps=1)
    block = model[0]
    main, extra = block.branch_weights()
    keep = (main != 0) & block.spatial
    assert torch.equal(extra != 0, keep & (block.extra.weight != 0))
    # the extra weight gets gradient only inside B ⊙ S
    model.zero_grad()
    model.eval()  # no spatial-mask recomputation in this forward: keep stays the mask checked above
    (model(x).sum()).backward()
    assert not bool(((block.extra.weight.grad != 0) & ~keep).any())
    extra_only = to_input_last(block.extra.weight.grad).reshape(-1, 4)
    assert bool(((extra_only != 0).sum(dim=1) <= 2).all())


@pytest.mark.parametrize(
    "values, path, fragment",
    [({"spatial_every": 0}, "spatial_every", ">= 1"), ({"decay": -1}, "decay", ">= 0")],
)
def test_config_errors(values, path, fragment):
    with pytest.raises(ConfigError) as err:
        SpreConfig.from_dict(values)
    assert err.value.path == path and fragment in str(err.value)


def test_classifier_is_nm_by_default():
    assert SpreConfig().skip_classifier is False
