import math

import pytest
import torch
import torch.nn as nn

from compressx.ops.quant import (
    SULQ,
    SULQ_ETAS,
    LogQuantizer,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    calibrate_sulq,
    calibrate_uniform,
    fake_quant_uniform,
    pack_codes,
    pack_int32_rows,
    packed_code_bytes,
    set_quant_state,
    unpack_codes,
    unpack_int32_rows,
)


def softmax_maps(seed=0, tokens=65, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, tokens, tokens, generator=generator) * scale).softmax(dim=-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_sulq_outputs_lie_on_its_grid_with_at_most_2_pow_b_codes(bits):
    x = softmax_maps()
    q = SULQ(bits)
    q.enabled = True
    out = q(x)
    codes = q.codes(x)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    assert codes.unique().numel() <= 2**bits
    # every output is 2^e - eta for an integer exponent e
    exponent = torch.log2(out + q.eta)
    assert torch.allclose(exponent, exponent.round(), atol=1e-4)
    assert out.unique().numel() <= 2**bits
    # the calibrated log range is that of log2(x + eta) over the calibration batch
    y = torch.log2(x + q.eta)
    assert float(q.y_min) == pytest.approx(float(y.min()), abs=1e-6)
    assert float(q.y_max) == pytest.approx(float(y.max()), abs=1e-6)
    assert float(q.eta) in [pytest.approx(e) for e in SULQ_ETAS]


def test_sulq_official_forward_has_one_more_code():
    x = softmax_maps()
    eta, y_min, y_max = calibrate_sulq(x, 2)
    paper, official = SULQ(2), SULQ(2, official=True)
    for q in (paper, official):
        q.eta, q.y_min, q.y_max = eta, y_min, y_max
    assert int(paper.codes(x).max()) == 3
    assert int(official.codes(x).max()) == 4  # 2^b + 1 codes: the reference forward's off-by-one


def test_sulq_eta_search_picks_least_error():
    x = softmax_maps(seed=1)
    eta, _, _ = calibrate_sulq(x, 3)
    errors = {}
    for candidate in SULQ_ETAS:
        _, lo, hi = calibrate_sulq(x, 3, etas=(candidate,))
        q = SULQ(3)
        q.eta, q.y_min, q.y_max = torch.tensor(candidate), lo, hi
        errors[candidate] = float((q.quantize(x) - x).pow(2).mean())
    assert float(eta) == pytest.approx(min(errors, key=errors.get))


def test_uniform_minmax_on_known_tensor():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    scale, zero = calibrate_uniform(x, 2, method="minmax")
    assert float(scale) == pytest.approx(4 / 3)
    assert float(zero) == 1.0  # round(1 / (4/3)) = round(0.75)
    out = fake_quant_uniform(x, scale, zero, 2)
    assert torch.allclose(out, torch.tensor([-4 / 3, 0.0, 4 / 3, 8 / 3]))


def test_uniform_symmetric_on_known_tensor():
    scale, zero = calibrate_uniform(torch.tensor([-2.0, 0.5, 1.0]), 3, method="minmax", symmetric=True)
    assert float(scale) == pytest.approx(2 / 3) and float(zero) == 4.0


def test_uniform_per_channel_and_per_group_shapes_and_values():
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-8.0, 0.0, 4.0, 7.0]])
    scale, zero = calibrate_uniform(weight, 4, granularity="channel", axis=0, method="minmax")
    assert scale.shape == (2, 1)
    assert torch.allclose(scale.reshape(-1), torch.tensor([3 / 15, 15 / 15]))
    scale, zero = calibrate_uniform(weight, 4, granularity="group", group_size=2, method="minmax")
    assert scale.shape == (2, 2, 1)
    assert torch.allclose(scale.reshape(-1), torch.tensor([1 / 15, 3 / 15, 8 / 15, 7 / 15]))
    activation = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(0, 10, 50)], dim=-1)[None]  # [1, 50, 2]
    scale, _ = calibrate_uniform(activation, 8, granularity="channel", axis=-1, method="minmax")
    assert scale.shape == (1, 1, 2)
    assert torch.allclose(scale.reshape(-1), torch.tensor([2 / 255, 10 / 255]))


def test_percentile_clips_to_quantiles():
    x = torch.arange(1001, dtype=torch.float32)  # 0..1000: the q quantile is 1000 q
    scale, zero = calibrate_uniform(x, 8, method="percentile", percentile=0.99)
    assert float(scale) == pytest.approx((990 - 10) / 255, rel=1e-5)
    assert float(zero) == round(-10 / float(scale))  # a range above 0: negative zero point, as the reference
    assert float(calibrate_uniform(x, 8, method="minmax")[1]) == 0  # min-max widens the range to hold 0


def test_mse_search_clips_an_outlier_that_minmax_keeps():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=generator), torch.tensor([60.0])])
    minmax_scale, _ = calibrate_uniform(x, 4, method="minmax")
    mse_scale, mse_zero = calibrate_uniform(x, 4, method="mse", candidates=(0.99, 0.999, 0.99999))
    assert float(mse_scale) < float(minmax_scale) / 3
    errors = [
        (fake_quant_uniform(x, *calibrate_uniform(x, 4, method="percentile", percentile=p), 4) - x).pow(2).mean()
        for p in (0.99, 0.999, 0.99999)
    ]
    chosen = (fake_quant_uniform(x, mse_scale, mse_zero, 4) - x).pow(2).mean()
    assert float(chosen) == pytest.approx(float(min(errors)))


@pytest.mark.parametrize("base", [2.0, math.sqrt(2.0)])
def test_log_quantizer_outputs_powers_of_its_base(base):
    x = softmax_maps(seed=2)
    q = LogQuantizer(4, base=base)
    q.enabled = True
    out = q(x)
    nonzero = out[out > 0]
    k = -torch.log(nonzero / q.scale) / math.log(base)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert int(k.round().max()) <= 15 and int(k.round().min()) >= 0


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 13), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_code_bytes(codes.numel(), bits) == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_row_packing_round_trip_and_layout(bits):
    codes = torch.randint(0, 2**bits, (5, 19), generator=torch.Generator().manual_seed(bits))
    words = pack_int32_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, math.ceil(19 * bits / 32))
    assert torch.equal(unpack_int32_rows(words, bits, 19), codes)
    row = torch.tensor([[2**bits - 1] + [0] * (32 // bits - 1)])  # the first code in the lowest bits of a word
    assert pack_int32_rows(row, bits).tolist() == [[2**bits - 1]]
    high = torch.tensor([[0] * (32 // bits - 1) + [2**bits - 1]])  # the last code in the sign bit: negative int32
    assert int(pack_int32_rows(high, bits)) < 0 and torch.equal(
        unpack_int32_rows(pack_int32_rows(high, bits), bits, high.shape[1]), high
    )


def test_int32_row_packing_matches_compressed_tensors():
    helpers = pytest.importorskip(
        "compressed_tensors.compressors.pack_quantized.helpers", reason="compressed-tensors not installed"
    )
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (6, 21), generator=torch.Generator().manual_seed(0))
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_int32_rows(codes, bits), helpers.pack_to_int32(signed, bits))


def test_pack_int4_is_two_codes_per_byte_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]


def test_pack_rejects_codes_out_of_range_and_unpack_wrong_length():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="expected 2 uint8"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (4,))


def test_quant_layers_are_identity_when_disabled_and_quantize_when_enabled():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    ref = linear(x)
    qlinear = QuantLinear.from_linear(
        linear, UniformQuantizer(4), UniformQuantizer(4, "weight", granularity="channel")
    )
    assert torch.equal(qlinear(x), ref)
    set_quant_state(qlinear, weights=True, activations=True)
    out = qlinear(x)
    assert not torch.equal(out, ref)
    assert qlinear.weight_quantizer.codes(qlinear.weight).unique().numel() <= 16
    assert qlinear.to_linear().weight is linear.weight
    matmul = QuantMatMul(UniformQuantizer(3), None)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert torch.equal(matmul(a, b), a @ b)


def test_quantizer_rejects_bits_out_of_range():
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        UniformQuantizer(1)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        SULQ(9)
