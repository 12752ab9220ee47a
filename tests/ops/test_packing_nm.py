import pytest
import torch

from compressx.ops.packing import check_packed_nm, pack_nm, unpack_nm
from compressx.ops.sparsity import is_nm_sparse, nm_mask, to_input_last

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    )


def _nm_weight(shape, n, m, dtype=torch.float32, seed=0, drop=0.0):
    """A random N:M weight (``torch.where``: +0.0 at pruned places); ``drop`` zeroes some kept weights too."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=generator)
    keep = nm_mask(torch.rand(shape, generator=generator), n, m)
    if drop:
        keep &= torch.rand(shape, generator=generator) >= drop
    return torch.where(keep, dense, torch.zeros(())).to(dtype)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 16), (3, 8)])
@pytest.mark.parametrize("shape", [(8, 32), (6, 16, 3, 3), (4, 32, 1, 1), (3, 16, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_identical(n, m, shape, dtype):
    weight = _nm_weight(shape, n, m, dtype)
    values, indices = pack_nm(weight, n, m)
    blocks = weight.numel() // m
    assert values.shape == (blocks, n) and values.dtype == dtype
    assert indices.shape == (blocks, n) and indices.dtype == torch.uint8
    assert bool((indices.long()[:, 1:] > indices.long()[:, :-1]).all())  # ascending, distinct
    out = unpack_nm(values, indices, weight.shape, n, m)
    assert _bits_equal(out, weight)
    assert out.is_contiguous()


def test_blocks_with_fewer_than_n_non_zeros():
    weight = _nm_weight((8, 16, 3, 3), 2, 4, drop=0.5)
    blocks = to_input_last(weight).reshape(-1, 4)
    counts = (blocks != 0).sum(dim=1)
    assert bool((counts < 2).any()) and bool((counts == 0).any())
    values, indices = pack_nm(weight, 2, 4)
    assert _bits_equal(unpack_nm(values, indices, weight.shape, 2, 4), weight)
    empty = torch.nonzero(counts == 0)[0, 0]
    assert values[empty].tolist() == [0.0, 0.0] and indices[empty].tolist() == [0, 1]  # lowest unused positions


def test_layout_is_ohwi_blocks_in_row_major_order():
    weight = torch.zeros(1, 8, 1, 2)
    weight[0, 1, 0, 0], weight[0, 6, 0, 0] = 1.0, 2.0  # kernel column 0: channels 1 (block 0) and 6 (block 1)
    weight[0, 3, 0, 1] = 3.0  # kernel column 1: channel 3 (block 2)
    values, indices = pack_nm(weight, 1, 4)
    assert values.flatten().tolist() == [1.0, 2.0, 3.0, 0.0]  # block 3 (column 1, channels 4-7) is empty
    assert indices.flatten().tolist() == [1, 2, 3, 0]


def test_pack_rejects_a_non_nm_weight_naming_the_block():
    weight = _nm_weight((4, 16), 2, 4)
    weight[1, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # block 1 * 4 + 2 = 6 gets 3 non-zeros
    with pytest.raises(ValueError, match="block 6 has 3 non-zeros, more than N=2"):
        pack_nm(weight, 2, 4)
    with pytest.raises(ValueError, match="not divisible by M=4"):
        pack_nm(torch.zeros(4, 6), 2, 4)
    with pytest.raises(ValueError, match="M <= 256"):
        pack_nm(torch.zeros(4, 512), 1, 512)


def test_check_packed_nm_rejects_bad_input():
    weight = _nm_weight((4, 16), 2, 4)
    values, indices = pack_nm(weight, 2, 4)
    check_packed_nm(values, indices, (4, 16), 2, 4)  # valid
    with pytest.raises(ValueError, match=r"expected values and indices of shape \(16, 2\)"):
        check_packed_nm(values[:-1], indices[:-1], (4, 16), 2, 4)
    with pytest.raises(ValueError, match="expected values and indices"):
        check_packed_nm(values, indices, (4, 32), 2, 4)
    with pytest.raises(ValueError, match="expected values and indices"):
        check_packed_nm(values.reshape(8, 4), indices.reshape(8, 4), (4, 16), 2, 4)
    with pytest.raises(ValueError, match="no input dimension divisible by M=4"):
        check_packed_nm(values, indices, (8, 6), 2, 4)
    with pytest.raises(ValueError, match="no input dimension divisible"):
        check_packed_nm(values, indices, (64,), 2, 4)
    with pytest.raises(ValueError, match="uint8"):
        check_packed_nm(values, indices.long(), (4, 16), 2, 4)
    out_of_range = indices.clone()
    out_of_range[3, 1] = 4
    with pytest.raises(ValueError, match="index is >= M=4"):
        check_packed_nm(values, out_of_range, (4, 16), 2, 4)
    duplicate = indices.clone()
    duplicate[5] = torch.tensor([2, 2], dtype=torch.uint8)
    with pytest.raises(ValueError, match="distinct"):
        check_packed_nm(values, duplicate, (4, 16), 2, 4)
    with pytest.raises(ValueError, match="distinct"):
        unpack_nm(values, duplicate, (4, 16), 2, 4)  # unpack validates first
    descending = indices.clone()
    descending[0] = torch.tensor([3, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="ascending"):
        check_packed_nm(values, descending, (4, 16), 2, 4)


def to_semi_structured(model: torch.nn.Module) -> list[str]:
    """Swap the 2:4-sparse ``Linear`` weights of a CUDA fp16/bf16 model for PyTorch's semi-structured sparse
    tensors (``torch.sparse.to_sparse_semi_structured``: sparse tensor cores, Ampere and later); returns the names.
    A recipe for users (docs/training.md), not part of compressx: only these tests use it.

    Only Linear layers (PyTorch has no semi-structured conv), only 2:4 along the input dimension, only on CUDA in
    half precision (in float32 the hardware pattern is 1:2). Raises ValueError when nothing qualifies, saying why.
    """
    converted, reasons = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"{name}: {weight.dtype} on {weight.device.type} (needs float16/bfloat16 on cuda)")
        elif not is_nm_sparse(weight.detach(), 2, 4):
            reasons.append(f"{name}: not 2:4 sparse")
        else:
            sparse = torch.sparse.to_sparse_semi_structured(weight.detach())
            module.weight = torch.nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
    if not converted:
        raise ValueError("no Linear layer can take the semi-structured layout: " + "; ".join(reasons[:5]))
    return converted


def test_semi_structured_refuses_cpu_float32_and_says_why():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"float32 on cpu \(needs float16/bfloat16 on cuda\)"):
        to_semi_structured(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with sparse tensor cores")
def test_semi_structured_matches_dense_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    model = model.half().cuda().eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4))
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    dense = model(x)
    assert to_semi_structured(model) == ["0", "2"]
    assert torch.allclose(model(x), dense, atol=1e-2, rtol=1e-2)
