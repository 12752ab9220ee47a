import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import compressx
from compressx.errors import ConfigError
from compressx.ops.sparsity import is_nm_sparse, to_input_last
from compressx.passes.lbc import LbcConfig, candidate_matrix, candidates_kept

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Stem conv (kept dense), two N:M convs (3x3 and 1x1), a hidden Linear and a dense classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pw(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


SPARSE = ("conv", "pw", "fc")


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def _mask_of(module: nn.Module):
    return module.parametrizations.weight[0]


def _blocks(weight: torch.Tensor, m: int) -> torch.Tensor:
    return to_input_last(weight).reshape(-1, m)


def _batches(seed: int, count: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, generator=generator, dtype=dtype), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(count)
    ]


def _train_epoch(model, optimizer, batches):
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --- construction -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16), (3, 4)])
def test_candidate_matrix(n, m):
    matrix = candidate_matrix(n, m)
    assert matrix.shape == (math.comb(m, n), m)
    assert set(matrix.unique().tolist()) <= {0.0, 1.0}
    assert (matrix.sum(dim=1) == n).all()
    rows = [tuple(int(j) for j in torch.nonzero(row).flatten()) for row in matrix]
    assert len(set(rows)) == len(rows)
    assert rows == list(itertools.combinations(range(m), n))  # lexicographic (itertools) order


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8"])
def test_scores_start_at_inverse_comb_and_the_start_is_dense(pattern):
    n, m = map(int, pattern.split(":"))
    model = _net().eval()
    x = torch.randn(4, 1, 8, 8)
    dense_out = model(x)
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in SPARSE}
    handle = compressx.prepare(model, "lbc", {"pattern": pattern})
    for name in SPARSE:
        module = model.get_submodule(name)
        mask = _mask_of(module)
        assert mask.scores.shape == (module.weight.numel() // m, math.comb(m, n))
        assert torch.allclose(mask.scores, torch.full_like(mask.scores, 1 / math.comb(m - 1, n - 1)))
        # every position is covered by comb(M-1, N-1) candidates: summed score 1
        assert torch.allclose(mask.scores @ mask.candidates, torch.ones(mask.scores.shape[0], m))
        assert bool(mask.alive.all())
        assert torch.equal(module.weight, dense[name])  # the mask is all ones
    assert not parametrize.is_parametrized(model.stem) and not parametrize.is_parametrized(model.head)
    # equal weights; the outputs are compared exactly in test_masked_weight_keeps_the_plain_layout
    assert torch.allclose(model(x), dense_out, rtol=0, atol=1e-6)
    assert handle.pass_name == "lbc"


def test_masked_weight_keeps_the_plain_layout():
    # A 1x1 conv's masked weight must have the latent weight's (NCHW-contiguous) strides; otherwise the conv
    # picks a channels-last kernel: outputs differ in the last bits from the plain conv with the same weights
    # (bit-identical) and come out in channels_last memory format.
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 1)
    x = torch.randn(4, 16, 8, 8)
    wrapper = nn.Sequential(conv).eval()
    compressx.prepare(wrapper, "lbc", {"pattern": "2:4", "skip_stem": False, "skip_classifier": False})
    with torch.no_grad():
        masked = conv.weight.clone(memory_format=torch.contiguous_format)
        out = wrapper(x)
        plain = F.conv2d(x, masked, conv.bias)
    assert conv.weight.stride() == conv.parametrizations.weight.original.stride()
    assert out.is_contiguous()
    assert torch.equal(out, plain)


# --- gradient identity ------------------------------------------------------------------------------------------


def _official_effective_weight(weight, scores, candidates, m):
    """The official formulation: a = α⊙1[α≠0], s = a·B, m = STE(1[s≠0]) (identity backward), W_eff = W ⊙ m."""
    alive_scores = scores * (scores != 0).to(scores.dtype)
    summed = alive_scores @ candidates
    binary = (summed != 0).to(summed.dtype)
    mask = summed + (binary - summed).detach()
    mask = mask.reshape(to_input_last(weight).shape)
    mask = mask if weight.dim() == 2 else mask.movedim(-1, 1)
    return weight * mask


def _kill_some(alive: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Remove a random subset of candidates, keeping at least one alive per block."""
    dead = torch.rand(alive.shape, generator=generator, dtype=torch.float64) < 0.5
    survivor = torch.randint(0, alive.shape[1], (alive.shape[0],), generator=generator)
    dead[torch.arange(alive.shape[0]), survivor] = False
    return alive & ~dead


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
@pytest.mark.parametrize("removed", [False, True])
def test_score_gradient_is_the_spec_formula(kind, pattern, removed):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(16, 6).double()
        x = torch.randn(5, 16, dtype=torch.float64)
    else:
        layer = nn.Conv2d(16, 6, 3, padding=1).double()
        x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    wrapper = nn.Sequential(layer.float())
    compressx.prepare(wrapper, "lbc", {"pattern": pattern, "skip_stem": False, "skip_classifier": False})
    wrapper.double()  # scores and candidates too (test_score_gradient_precision_follows_the_model: without this)
    mask = _mask_of(layer)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # distinct scores, so the formulation does not depend on the equal initial values
        mask.scores.copy_(torch.rand(mask.scores.shape, generator=generator, dtype=torch.float64) + 0.1)
    if removed:
        mask.alive.copy_(_kill_some(mask.alive, generator))
        assert not bool(mask.alive.all())
    upstream = torch.randn(layer(x).shape, generator=generator, dtype=torch.float64)

    (layer(x) * upstream).sum().backward()
    latent = layer.parametrizations.weight.original
    assert mask.scores.dtype == torch.float64 and mask.scores.grad.dtype == torch.float64

    # ∂L/∂W_eff from the plain op on the masked weight
    effective = layer.weight.detach().clone().requires_grad_(True)
    out = F.linear(x, effective, layer.bias) if kind == "linear" else layer._conv_forward(x, effective, layer.bias)
    (out * upstream).sum().backward()
    grad_eff = effective.grad
    w_blocks, g_blocks = _blocks(latent.detach(), m), _blocks(grad_eff, m)
    candidates = candidate_matrix(n, m).double()
    expected = ((w_blocks * g_blocks) @ candidates.t()) * mask.alive.double()
    assert torch.allclose(mask.scores.grad, expected, rtol=0, atol=1e-10)
    if removed:
        assert bool((mask.scores.grad[~mask.alive] == 0).all())
    # the weight gets the masked gradient: m ⊙ ∂L/∂W_eff
    keep = (mask.alive.double() @ candidates) > 0
    expected_w = torch.where(keep, g_blocks, torch.zeros((), dtype=torch.float64))
    assert torch.allclose(_blocks(latent.grad, m), expected_w, rtol=0, atol=1e-10)

    # the official formulation under autograd (removed candidates are exact zeros there)
    scores = (mask.scores.detach() * mask.alive.double()).requires_grad_(True)
    weight = latent.detach().clone().requires_grad_(True)
    official = _official_effective_weight(weight, scores, candidates, m)
    assert torch.equal(official.detach(), layer.weight.detach())
    out = F.linear(x, official, layer.bias) if kind == "linear" else layer._conv_forward(x, official, layer.bias)
    (out * upstream).sum().backward()
    assert torch.allclose(mask.scores.grad, scores.grad, rtol=0, atol=1e-10)
    assert torch.allclose(latent.grad, weight.grad, rtol=0, atol=1e-10)


def test_score_gradient_precision_follows_the_model():
    # A float64 model prepared as it is: its scores' gradient should be float64-exact (to 1e-10).
    # LbcMask makes scores and candidates float32, so the gradient is computed at float32 precision.
    torch.manual_seed(1)
    layer = nn.Linear(16, 6).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    compressx.prepare(nn.Sequential(layer), "lbc", {"pattern": "2:4", "skip_stem": False, "skip_classifier": False})
    mask = _mask_of(layer)
    upstream = torch.randn(5, 6, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    grad_eff = upstream.t() @ x  # ∂L/∂W_eff of a Linear
    latent = layer.parametrizations.weight.original.detach()
    expected = (_blocks(latent, 4) * _blocks(grad_eff, 4)) @ candidate_matrix(2, 4).double().t()
    assert torch.allclose(mask.scores.grad.double(), expected, rtol=0, atol=1e-10)


def test_conv_blocks_are_ohwi():
    # 2:4 conv with one candidate per block: the mask must follow input channels at a fixed (o, kh, kw)
    conv = nn.Conv2d(8, 2, 3)
    wrapper = nn.Sequential(conv)
    compressx.prepare(wrapper, "lbc", {"pattern": "2:4", "skip_stem": False, "skip_classifier": False})
    mask = _mask_of(conv)
    alive = torch.zeros_like(mask.alive)
    alive[:, 0] = True  # candidate 0 of 2:4 = positions {0, 1} of each block
    mask.alive.copy_(alive)
    kept = conv.weight != 0
    expected = torch.zeros(2, 8, 3, 3, dtype=torch.bool)
    expected[:, [0, 1, 4, 5]] = True  # input channels 0,1 of block 0-3 and 4,5 of block 4-7, every (o, kh, kw)
    assert torch.equal(kept, expected)


# --- schedule ---------------------------------------------------------------------------------------------------


def _change_points(count, start, end, power, epochs):
    points, previous = [], None
    for epoch in range(epochs):
        kept = candidates_kept(epoch, count, start, end, power)
        if kept != previous:
            points.append((epoch, kept))
            previous = kept
    return points


@pytest.mark.parametrize(
    "count, start, end, power, expected",
    [
        (6, 0, 60, 3, [(0, 6), (5, 5), (10, 4), (16, 3), (25, 2), (60, 1)]),
        (4, 0, 60, 3, [(0, 4), (8, 3), (19, 2), (60, 1)]),
        (
            16,
            0,
            60,
            3,
            [(0, 16), (2, 15), (3, 14), (5, 13), (6, 12), (8, 11), (10, 10), (12, 9), (14, 8), (16, 7), (19, 6)]
            + [(22, 5), (25, 4), (30, 3), (36, 2), (60, 1)],
        ),
        (6, 0, 200, 4, [(0, 6), (11, 5), (24, 4), (41, 3), (67, 2), (200, 1)]),  # DeiT
    ],
)
def test_schedule_tables_of_the_spec(count, start, end, power, expected):
    assert _change_points(count, start, end, power, 2 * end + 50) == expected


@pytest.mark.parametrize("power", [3, 4, 2, 1.5])
def test_schedule_is_clamped_and_monotone(power):
    count, start, end = 6, 10, 30
    kept = [candidates_kept(e, count, start, end, power) for e in range(0, 100)]
    assert kept[: start + 1] == [count] * (start + 1)  # before t_i: nothing removed (official formula: k < 0)
    assert kept[end:] == [1] * (100 - end)  # after t_f: one left, also with an even power (official: regrows)
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert all(k >= 2 for k in kept[:end])  # keep >= 2 until the window ends


def test_removal_is_monotone_never_revives_and_freezes():
    model = _net()
    end = 6
    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": end})
    # momentum and weight decay on the scores: removed scores keep moving, they must never come back
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    masks = {name: _mask_of(model.get_submodule(name)) for name in SPARSE}
    previous = {name: mask.alive.clone() for name, mask in masks.items()}
    for epoch in range(end + 3):
        handle.on_epoch_start(epoch)
        keep = candidates_kept(epoch, 6, 0, end, 3)
        for name, mask in masks.items():
            assert bool((mask.alive.sum(dim=1) == keep).all()), (name, epoch)
            assert bool((mask.alive <= previous[name]).all()), f"{name}: a candidate revived at epoch {epoch}"
            assert mask.scores.requires_grad == (keep > 1)
        # idempotent within an epoch
        again = {name: mask.alive.clone() for name, mask in masks.items()}
        handle.on_epoch_start(epoch)
        assert all(torch.equal(again[name], mask.alive) for name, mask in masks.items())
        previous = again
        _train_epoch(model, optimizer, _batches(epoch, 2))
        for name, mask in masks.items():
            assert bool((mask.alive == previous[name]).all())  # training does not touch alive
            module = model.get_submodule(name)
            covered = (mask.alive.float() @ mask.candidates) > 0
            assert torch.equal(_blocks(module.weight, 4) != 0, covered & (_blocks(module.weight, 4) != 0))
            if keep == 1:
                assert mask.scores.grad is None  # frozen: no gradient reaches the scores
    for name, mask in masks.items():
        assert bool((mask.alive.sum(dim=1) == 1).all())
        assert is_nm_sparse(model.get_submodule(name).weight, 2, 4)
        blocks = _blocks(model.get_submodule(name).weight, 4)
        assert bool(((blocks != 0).sum(dim=1) == 2).all())  # random weights: exactly N per block
    keeps = [candidates_kept(e, 6, 0, end, 3) for e in range(end + 3)]
    assert keeps[: end + 1] == [6, 4, 3, 2, 2, 2, 1]
    assert [h["epoch"] for h in handle.history] == [1, 2, 3, 6]  # the epochs where candidates were removed
    assert [h["candidates_kept"] for h in handle.history] == [4, 3, 2, 1]
    assert handle.history[-1]["scores_frozen"] is True


def test_removal_drops_the_lowest_scores():
    layer = nn.Linear(8, 2)
    wrapper = nn.Sequential(layer)
    handle = compressx.prepare(
        wrapper, "lbc", {"pattern": "2:4", "end_epoch": 5, "skip_stem": False, "skip_classifier": False}
    )
    mask = _mask_of(layer)
    scores = torch.tensor([[0.3, -0.2, 0.9, 0.1, 0.5, 0.4]]).repeat(mask.scores.shape[0], 1)
    with torch.no_grad():
        mask.scores.copy_(scores)
    handle.on_epoch_start(2)  # keep(2) = 1 + ceil(5 * 0.6^3) = 3
    assert mask.alive[0].tolist() == [False, False, True, False, True, True]
    handle.on_epoch_start(5)
    assert mask.alive[0].tolist() == [False, False, True, False, False, False]
    # candidate 2 of 2:4 is {0, 3}
    assert torch.equal(_blocks(layer.weight, 4)[0] != 0, torch.tensor([True, False, False, True]))


# --- finalize ---------------------------------------------------------------------------------------------------


def _trained(end_epoch, epochs, pattern="2:4", seed=0):
    model = _net(seed)
    reference_keys = set(model.state_dict())
    handle = compressx.prepare(model, "lbc", {"pattern": pattern, "end_epoch": end_epoch})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(epochs):
        handle.on_epoch_start(epoch)
        _train_epoch(model, optimizer, _batches(epoch, 2))
    return model, handle, reference_keys


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
def test_finalize_gives_plain_nm_modules_with_the_same_outputs(pattern):
    n, m = map(int, pattern.split(":"))
    model, handle, reference_keys = _trained(end_epoch=3, epochs=5, pattern=pattern)
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        effective = {name: model.get_submodule(name).weight.clone() for name in SPARSE}
    assert handle.finalize() is model
    for name in SPARSE:
        module = model.get_submodule(name)
        assert type(module) in (nn.Conv2d, nn.Linear) and not parametrize.is_parametrized(module)
        assert isinstance(module.weight, nn.Parameter)
        assert torch.equal(module.weight.detach(), effective[name])  # W ⊙ m_final, bit for bit
        assert bool(((_blocks(module.weight, m) != 0).sum(dim=1) == n).all())
    assert set(model.state_dict()) == reference_keys  # no scores, alive, candidates left
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, rtol=0, atol=1e-6)
    report = handle.final_report
    assert report["pattern"] == pattern and report["unfinished_blocks"] == 0
    assert report["sparsity"] == pytest.approx(1 - n / m)
    fresh = _net(7)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_finalize_before_end_epoch_keeps_the_best_scored_candidate():
    model, handle, _ = _trained(end_epoch=20, epochs=3)
    masks = {name: _mask_of(model.get_submodule(name)) for name in SPARSE}
    expected = {}
    for name, mask in masks.items():
        assert bool((mask.alive.sum(dim=1) > 1).all())
        ranked = mask.scores.detach().masked_fill(~mask.alive, float("-inf"))
        best = ranked.argmax(dim=1)
        expected[name] = mask.candidates[best] > 0
        latent = model.get_submodule(name).parametrizations.weight.original.detach().clone()
        expected[name] = (expected[name], latent)
    handle.finalize()
    for name, (keep, latent) in expected.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(_blocks(weight, 4) != 0, keep & (_blocks(latent, 4) != 0))
        assert torch.equal(_blocks(weight, 4)[keep], _blocks(latent, 4)[keep])
    assert handle.final_report["unfinished_blocks"] == sum(mask.scores.shape[0] for mask in masks.values())


def test_remove_restores_the_dense_latent_weights():
    model, handle, reference_keys = _trained(end_epoch=2, epochs=3)
    latent = {name: model.get_submodule(name).parametrizations.weight.original.detach().clone() for name in SPARSE}
    handle.remove()
    for name in SPARSE:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        assert torch.equal(module.weight.detach(), latent[name])
    assert set(model.state_dict()) == reference_keys


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, path, fragment",
    [
        ({"end_epoch": 0}, "end_epoch", "must be > start_epoch"),
        ({"start_epoch": 10, "end_epoch": 10}, "end_epoch", "must be > start_epoch"),
        ({"start_epoch": -1}, "start_epoch", ">= 0"),
        ({"power": 0}, "power", "> 0"),
        ({"pattern": "4:2"}, "pattern", "0 < N < M"),
        ({"pattern": "2-4"}, "pattern", "N:M"),
        ({"pattern": "8:16"}, "pattern", "12870 candidates"),
        ({"incompatible": "ignore"}, "incompatible", "skip"),
    ],
)
def test_config_errors(values, path, fragment):
    with pytest.raises(ConfigError) as err:
        LbcConfig.from_dict(values)
    assert err.value.path == path
    assert fragment in str(err.value)


def test_prepare_reports_config_errors_with_the_step_path():
    with pytest.raises(ConfigError) as err:
        compressx.prepare(_net(), "lbc", {"end_epoch": 0})
    assert err.value.path.endswith("config.end_epoch")
