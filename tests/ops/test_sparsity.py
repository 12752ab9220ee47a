import pytest
import torch

from compressx.ops.sparsity import is_nm_sparse, lowest_mask, nm_mask, parse_nm, sparsity_of, topk_mask


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm("1:8") == (1, 8)
    for bad in ["4:4", "0:4", "2-4", "a:b", "2:4:8"]:
        with pytest.raises(ValueError):
            parse_nm(bad)


def test_nm_mask_linear_keeps_n_largest_per_block():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 4.0, 3.0, 2.0, 1.0]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (2, 8), (3, 8)])
def test_nm_mask_conv_blocks_run_along_input_channels(n, m):
    torch.manual_seed(0)
    weight = torch.randn(6, 16, 3, 3)
    mask = nm_mask(weight.abs(), n, m)
    # every (out, kh, kw) position has exactly n kept in each block of m consecutive input channels
    per_block = mask.permute(0, 2, 3, 1).reshape(-1, m).sum(dim=1)
    assert torch.all(per_block == n)
    assert is_nm_sparse(weight * mask, n, m)
    # the kept ones are the largest of their block
    blocks = weight.abs().permute(0, 2, 3, 1).reshape(-1, m)
    kept = mask.permute(0, 2, 3, 1).reshape(-1, m)
    assert torch.all(
        blocks[kept].reshape(-1, n).min(dim=1).values >= blocks[~kept].reshape(-1, m - n).max(dim=1).values
    )


def test_nm_mask_rejects_indivisible_input():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_mask(torch.rand(3, 6), 2, 4)


def test_is_nm_sparse_detects_violation():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not is_nm_sparse(w, 2, 4)
    assert is_nm_sparse(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2, 4)


def test_topk_mask_layer_and_row_counts():
    torch.manual_seed(0)
    scores = torch.rand(8, 10)
    layer = topk_mask(scores, 0.3)
    assert int((~layer).sum()) == 24
    threshold = scores[~layer].max()
    assert torch.all(scores[layer] >= threshold)
    row = topk_mask(scores, 0.3, dim=1)
    assert torch.all((~row).sum(dim=1) == 3)


def test_topk_mask_ties_are_deterministic_and_exact():
    scores = torch.zeros(4, 4)
    mask = topk_mask(scores, 0.5)
    assert int((~mask).sum()) == 8
    assert torch.equal(mask, topk_mask(scores.clone(), 0.5))


def _first_of_stable_sort(scores, count):
    order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


@pytest.mark.parametrize("shape", [(1, 2048), (16, 64), (7, 5), (3, 17)])
def test_lowest_mask_is_the_head_of_a_stable_sort_ties_included(shape):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, shape, generator=gen).float()  # many ties: order among equals decides
    scores[0, :3] = -0.0  # -0.0 == 0.0, as sorting sees it
    for count in range(shape[1] + 1):
        assert torch.equal(lowest_mask(scores, count), _first_of_stable_sort(scores, count)), count


@pytest.mark.parametrize("width", [4, 40])  # sorted, and selected by kthvalue
def test_lowest_mask_with_nan_sorts_nan_last(width):
    scores = torch.arange(width, dtype=torch.float32)[None].flip(1)
    scores[0, 0] = scores[0, 2] = float("nan")
    expected = torch.ones(1, width, dtype=torch.bool)
    expected[0, 2] = False  # the count takes every number and the first NaN
    assert torch.equal(lowest_mask(scores, width - 1), expected)


def test_sparsity_of():
    assert sparsity_of(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5
