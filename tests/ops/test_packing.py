import math

import pytest
import torch

from compressx.ops.packing import pack_bitmask, pack_bits, pack_zero_signs, unpack_bitmask, unpack_bits

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (so -0.0 and +0.0 differ, and NaN payloads count)."""
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    )


def _round_trip(tensor: torch.Tensor) -> torch.Tensor:
    values, bitmask = pack_bitmask(tensor)
    return unpack_bitmask(values, bitmask, tensor.shape, tensor.dtype, pack_zero_signs(tensor))


def test_bit_order_is_little_endian_row_major():
    # element i is bit i % 8 (value 1 << i % 8) of byte i // 8; the 6 padding bits of the last byte are 0
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10000001, 0b10000011, 0b00000010]
    assert torch.equal(unpack_bits(packed, bits.numel()), bits.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 32), (7, 9), (5, 3, 3, 3), (1, 1), (3, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_round_trip_is_bit_identical(dtype, shape, sparsity):
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(shape, generator=generator)
    keep = torch.rand(shape, generator=generator) >= sparsity
    tensor = (dense * keep).to(dtype)  # w * mask: the pruned negative weights become -0.0
    numel = tensor.numel()
    values, bitmask = pack_bitmask(tensor)
    assert bitmask.dtype == torch.uint8 and bitmask.shape == (math.ceil(numel / 8),)
    assert values.dtype == dtype and values.numel() == int((tensor != 0).sum())
    assert _bits_equal(_round_trip(tensor), tensor)


def test_all_zero_and_no_zero_tensors():
    no_zero = torch.arange(1, 22, dtype=torch.float32).reshape(3, 7)
    values, bitmask = pack_bitmask(no_zero)
    assert values.numel() == 21 and bitmask.tolist() == [255, 255, 0b00011111]
    assert pack_zero_signs(no_zero) is None
    assert _bits_equal(unpack_bitmask(values, bitmask, no_zero.shape, no_zero.dtype), no_zero)

    all_zero = torch.zeros(3, 7, dtype=torch.bfloat16)
    values, bitmask = pack_bitmask(all_zero)
    assert values.numel() == 0 and bitmask.tolist() == [0, 0, 0]
    assert pack_zero_signs(all_zero) is None  # only +0.0: no sign bits needed
    assert _bits_equal(unpack_bitmask(values, bitmask, all_zero.shape, all_zero.dtype), all_zero)


def test_negative_zeros_need_the_zero_signs():
    tensor = torch.tensor([[-0.0, 1.0, 0.0, -2.0], [0.0, -0.0, -0.0, 3.0]])
    values, bitmask = pack_bitmask(tensor)
    assert values.tolist() == [1.0, -2.0, 3.0]
    signs = pack_zero_signs(tensor)
    assert signs.tolist() == [0b11001]  # the zeros in row-major order are -0, +0, +0, -0, -0
    assert _bits_equal(unpack_bitmask(values, bitmask, tensor.shape, tensor.dtype, signs), tensor)
    plain = unpack_bitmask(values, bitmask, tensor.shape, tensor.dtype)  # without them: all zeros are +0.0
    assert torch.equal(plain, tensor) and not _bits_equal(plain, tensor)


def test_mismatched_inputs_are_refused():
    values, bitmask = pack_bitmask(torch.tensor([[1.0, 0.0, 2.0]]))
    with pytest.raises(ValueError, match="marks 2 non-zero"):
        unpack_bitmask(values[:1], bitmask, (1, 3), torch.float32)
    with pytest.raises(ValueError, match="1 byte"):
        unpack_bitmask(values, torch.cat([bitmask, bitmask]), (1, 3), torch.float32)
