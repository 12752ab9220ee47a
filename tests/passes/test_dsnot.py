import pytest
import torch
import torch.nn as nn

import compressx
from compressx.errors import ConfigError
from compressx.ops.sparsity import is_nm_sparse, nm_mask, topk_mask
from compressx.passes.dsnot import DsnotConfig, dsnot_refine

TOKENS = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(0))


def decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def random_layer(rows=16, cols=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    mean = torch.randn(cols, generator=gen)
    var = torch.rand(cols, generator=gen) + 0.1
    sq_norm = torch.rand(cols, generator=gen) + 0.5
    return w, mean, var, sq_norm


def test_config_defaults_follow_the_reference():
    config = DsnotConfig()
    assert (config.init, config.max_cycles, config.update_threshold, config.var_power) == ("wanda", 50, 0.1, 1.0)
    assert config.same_sign is False and config.refine_mlp is False
    assert DsnotConfig(pattern="2:4").same_sign is True
    with pytest.raises(ConfigError, match="init"):
        DsnotConfig.from_dict({"init": "random"})
    with pytest.raises(ConfigError, match="max_cycles"):
        DsnotConfig(max_cycles=-1)


def test_one_swap_by_hand():
    dense = torch.tensor([[1.0, 2.0, -3.0, 4.0]])
    keep = torch.tensor([[False, False, True, True]])
    ones = torch.ones(4)
    out = dsnot_refine(dense, dense * keep, keep, ones, ones, ones, threshold=0.0)
    # error 1+2 = 3 > 0: regrow the largest positive (2.0); prune the kept negative contribution (-3.0) -> -2.
    # Then error < 0 needs a negative regrow candidate: none is left (1.0 is positive), so the row stops.
    assert out.keep.tolist() == [[False, True, False, True]]
    assert out.error_before.tolist() == [3.0] and out.error_after.tolist() == [-2.0]
    assert out.swaps.tolist() == [1]
    assert out.weight.tolist() == [[0.0, 2.0, 0.0, 4.0]]


def test_variance_steers_growth_to_stable_channels():
    dense = torch.tensor([[2.0, 1.5, -1.0, 4.0]])
    keep = torch.tensor([[False, False, True, True]])
    ones = torch.ones(4)
    noisy_first = torch.tensor([10.0, 1.0, 1.0, 1.0])
    assert dsnot_refine(dense, dense * keep, keep, ones, ones, ones, threshold=0.0, max_cycles=1).keep[0, 0]
    chosen = dsnot_refine(dense, dense * keep, keep, ones, noisy_first, ones, threshold=0.0, max_cycles=1).keep
    assert chosen[0, 1] and not chosen[0, 0]  # 1.5/1 beats 2.0/10
    ignore_var = dsnot_refine(dense, dense * keep, keep, ones, noisy_first, ones, threshold=0.0, max_cycles=1,
                              var_power=0.0).keep  # fmt: skip
    assert ignore_var[0, 0]


@pytest.mark.parametrize("cycles", [0, 1, 3, 50, 500])
def test_every_swap_keeps_the_row_count_unstructured(cycles):
    w, mean, var, sq = random_layer()
    keep = topk_mask(w.abs() * sq.sqrt(), 0.5, dim=1)
    out = dsnot_refine(w, w * keep, keep, mean, var, sq, max_cycles=cycles, threshold=0.0)
    assert torch.equal(out.keep.sum(dim=1), keep.sum(dim=1))
    assert torch.equal(out.weight != 0, out.keep)
    if cycles == 0:
        assert torch.equal(out.keep, keep) and int(out.swaps.sum()) == 0
    else:
        assert int(out.swaps.sum()) > 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_every_swap_keeps_the_nm_pattern(n, m):
    w, mean, var, sq = random_layer(cols=32)
    score = w.abs() * sq.sqrt()
    keep = nm_mask(score, n, m)
    out = dsnot_refine(w, w * keep, keep, mean, var, sq, max_cycles=500, threshold=0.0, nm=(n, m),
                       init_score=score, same_sign=True)  # fmt: skip
    assert is_nm_sparse(out.weight, n, m)
    assert torch.all(out.keep.reshape(-1, m).sum(dim=1) == n)
    assert int(out.swaps.sum()) > 0


def test_small_layer_exhaustion_never_breaks_the_count():
    """Many cycles on 8 columns: the reference code's shared pointers overrun here; ours stop the row."""
    for seed in range(20):
        w, mean, var, sq = random_layer(rows=8, cols=8, seed=seed)
        keep = topk_mask(w.abs(), 0.5, dim=1)
        out = dsnot_refine(w, w * keep, keep, mean, var, sq, max_cycles=200, threshold=0.0)
        assert torch.equal(out.keep.sum(dim=1), keep.sum(dim=1)), seed


def test_zero_contributions_are_never_candidates():
    w, mean, var, sq = random_layer(rows=4, cols=16)
    mean[::3] = 0.0  # channels with zero mean contribute nothing
    w[:, 1] = 0.0  # and zero weights
    keep = topk_mask(w.abs(), 0.5, dim=1)
    out = dsnot_refine(w, w * keep, keep, mean, var, sq, max_cycles=100, threshold=0.0)
    changed = out.keep != keep
    assert not changed[:, ::3].any() and not changed[:, 1].any()
    assert torch.equal(out.keep.sum(dim=1), keep.sum(dim=1))


def test_refinement_lowers_the_expected_error():
    w, mean, var, sq = random_layer(rows=64, cols=128)
    keep = topk_mask(w.abs() * sq.sqrt(), 0.6, dim=1)
    out = dsnot_refine(w, w * keep, keep, mean, var, sq)
    assert out.error_after.abs().mean() < 0.5 * out.error_before.abs().mean()


def test_threshold_stops_rows():
    w, mean, var, sq = random_layer()
    keep = topk_mask(w.abs(), 0.5, dim=1)
    huge = dsnot_refine(w, w * keep, keep, mean, var, sq, threshold=1e9)
    assert torch.equal(huge.keep, keep)


@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
def test_zero_cycles_returns_the_initial_mask(tiny_llama, init):
    from conftest import make_tiny_llama

    baseline = make_tiny_llama()
    if init == "wanda":
        step = {"pass": "wanda", "config": {"sparsity": 0.5}}
    elif init == "sparsegpt":
        step = {"pass": "sparsegpt", "config": {"sparsity": 0.5, "scope": "row"}}
    else:
        step = {"pass": "magnitude", "config": {"sparsity": 0.5, "scope": "row"}, "targets": ["re:.*layers.*"]}
    compressx.apply(baseline, [step], data=TOKENS, progress=False)
    config = {"init": init, "sparsity": 0.5, "max_cycles": 0, "refine_mlp": True}
    compressx.apply(tiny_llama, [{"pass": "dsnot", "config": config}], data=TOKENS, progress=False)
    for name, module in decoder_linears(tiny_llama).items():
        assert torch.allclose(module.weight, baseline.get_submodule(name).weight, atol=1e-6), name
        assert torch.equal(module.weight == 0, baseline.get_submodule(name).weight == 0), name


@pytest.mark.parametrize("init", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None), ("4:8", None)])
def test_pass_exact_sparsity_and_pattern(tiny_llama, init, pattern, sparsity):
    config = {"init": init, "pattern": pattern, "sparsity": sparsity, "refine_mlp": True}
    result = compressx.apply(tiny_llama, [{"pass": "dsnot", "config": config}], data=TOKENS, progress=False)
    for name, module in decoder_linears(tiny_llama).items():
        if pattern == "unstructured":
            assert torch.all((module.weight == 0).sum(dim=1) == int(0.6 * module.in_features)), name
        else:
            assert is_nm_sparse(module.weight, *map(int, pattern.split(":"))), name
    report = result.steps[0].report
    assert report["refined_modules"] == 14
    assert report["expected_error_reduction"] > 0


def test_mlp_gets_the_initial_mask_only_by_default(tiny_llama):
    from conftest import make_tiny_llama

    result = compressx.apply(tiny_llama, [{"pass": "dsnot"}], data=TOKENS, progress=False)
    assert result.steps[0].report["refined_modules"] == 8  # q, k, v, o of two layers
    assert all("mlp" not in name for name in result.steps[0].report["refinement"])
    # MLP Linears keep the initial per-row Wanda mask: survivors are the dense values, half of each row pruned
    dense = make_tiny_llama()
    for name, module in decoder_linears(tiny_llama).items():
        if ".mlp." in name:
            kept = module.weight != 0
            assert torch.equal(module.weight[kept], dense.get_submodule(name).weight[kept])
            assert torch.all((~kept).sum(dim=1) == module.in_features // 2)


def test_previous_refines_what_an_earlier_step_left(tiny_llama):
    from conftest import make_tiny_llama

    single = make_tiny_llama()
    compressx.apply(single, [{"pass": "dsnot", "config": {"init": "wanda", "sparsity": 0.6}}], data=TOKENS,
                    progress=False)  # fmt: skip
    steps = [{"pass": "wanda", "config": {"sparsity": 0.6}}, {"pass": "dsnot", "config": {"init": "previous"}}]
    result = compressx.apply(tiny_llama, steps, data=TOKENS, progress=False)
    assert result.steps[1].report["refined_modules"] == 8
    assert result.steps[1].report["expected_error_reduction"] > 0
    # layer 0's q/k/v see the same inputs and the same Wanda mask in both runs: identical refinement
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        assert torch.equal(tiny_llama.get_submodule(name).weight, single.get_submodule(name).weight), name
    for name, module in decoder_linears(tiny_llama).items():
        assert torch.all((module.weight == 0).sum(dim=1) == int(0.6 * module.in_features)), name


def test_previous_with_zero_cycles_keeps_the_earlier_result(tiny_llama):
    compressx.apply(tiny_llama, [{"pass": "wanda", "config": {"sparsity": 0.5}}], data=TOKENS, progress=False)
    after_wanda = {n: m.weight.clone() for n, m in decoder_linears(tiny_llama).items()}
    step = {"pass": "dsnot", "config": {"init": "previous", "max_cycles": 0, "refine_mlp": True}}
    compressx.apply(tiny_llama, [step], data=TOKENS, progress=False)
    for name, module in decoder_linears(tiny_llama).items():
        assert torch.equal(module.weight, after_wanda[name]), name


def test_previous_sparsegpt_regrows_dense_values_and_keeps_updated_ones(tiny_llama):
    from conftest import make_tiny_llama

    dense = make_tiny_llama()
    steps = [
        {"pass": "sparsegpt", "config": {"pattern": "2:4"}},
        {"pass": "dsnot", "config": {"init": "previous", "pattern": "2:4", "refine_mlp": True}},
    ]
    after_sparsegpt = make_tiny_llama()
    compressx.apply(after_sparsegpt, steps[:1], data=TOKENS, progress=False)
    compressx.apply(tiny_llama, steps, data=TOKENS, progress=False)
    name = "model.layers.0.self_attn.q_proj"  # layer 0 q: the same SparseGPT result in both runs
    w, w_sgpt, w_dense = (m.get_submodule(name).weight for m in (tiny_llama, after_sparsegpt, dense))
    assert is_nm_sparse(w, 2, 4)
    regrown = (w != 0) & (w_sgpt == 0)
    survived = (w != 0) & (w_sgpt != 0)
    assert regrown.any()
    assert torch.equal(w[regrown], w_dense[regrown]) and torch.equal(w[survived], w_sgpt[survived])


def test_previous_errors():
    from conftest import make_tiny_llama

    with pytest.raises(ConfigError, match="sparsity is the earlier step's"):
        DsnotConfig(init="previous", sparsity=0.5)
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match="has no zeros: run a pruning step before dsnot"):
        compressx.apply(model, [{"pass": "dsnot", "config": {"init": "previous"}}], data=TOKENS, progress=False)
    steps = [{"pass": "wanda", "config": {"sparsity": 0.5}},
             {"pass": "dsnot", "config": {"init": "previous", "pattern": "2:4"}}]  # fmt: skip
    with pytest.raises(ConfigError, match="is not 2:4"):
        compressx.apply(model, steps, data=TOKENS, progress=False)
