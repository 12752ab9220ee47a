"""The quantization core: quantizers, their calibration, fake-quant layers and integer packing.

Shared by the post-training quantization passes (``ptq_minmax``, ``repq_vit``, ``isvit``) and meant for later
weight-only passes as well. Everything here is "fake" quantization: values are rounded onto the integer grid and
mapped back to floats, so the model runs in floating point with quantized values (no integer kernels).

Quantizers (``nn.Module``; parameters are buffers, never trained):

* ``UniformQuantizer`` — ``q = clamp(round(x / Δ) + z, 0, 2^b - 1)``, ``x̂ = (q - z) Δ`` (I&S-ViT, arXiv:2311.10126,
  §3 "Preliminaries"), asymmetric or symmetric, per tensor, per channel (any axis) or per group (groups of
  ``group_size`` consecutive elements of the last dimension), 2–8 bits. Calibration: ``minmax``; ``percentile``
  (clip to the ``[1 - p, p]`` quantiles); ``mse`` (the percentile among ``candidates`` whose fake-quant output
  has the least squared error, chosen per group — the initialisation RepQ-ViT, arXiv:2212.08254 §4, and I&S-ViT
  share).
* ``LogQuantizer`` — ``x̂ = Δ · base^-k``, ``k = round(-log_base(x / Δ))`` for ``k < 2^b``, 0 beyond; base 2 (plain
  log2) or √2 (RepQ-ViT's log√2 quantizer for post-Softmax activations, arXiv:2212.08254 §3.3).
* ``SULQ`` — I&S-ViT's shift-uniform-log2 quantizer (arXiv:2311.10126 §4.2, Eq. 9–10): shift by η, take log2,
  quantize *uniformly* over the calibrated log range with exactly ``2^b`` codes, round the de-quantized exponent to
  an integer and map back: ``x̂ = 2^round(k s + y_min) - η``. η is searched by MSE.

A quantizer calibrates itself on the first batch it sees while enabled and unset (the reference code's "first
forward initialises"); ``reset()`` forgets the calibration. Rounding uses a straight-through estimator, so weights
behind a quantizer can be fine-tuned (block reconstruction).

Layers: ``QuantLinear`` / ``QuantConv2d`` (subclasses of ``nn.Linear`` / ``nn.Conv2d`` with a weight and an input
quantizer) and ``QuantMatMul`` (both operands quantized, for q·kᵀ and attn·v). ``set_quant_state`` switches weight
and activation quantization on and off model-wide.

Packing: ``pack_codes`` / ``unpack_codes`` store ``b``-bit codes as a little-endian bit stream (two 4-bit codes per
byte, eight 3-bit codes in three bytes, ...; 8-bit codes are the bytes themselves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressx.ops.packing import pack_bits, packed_length, unpack_bits

Granularity = Literal["tensor", "channel", "group"]
CalibrationMethod = Literal["minmax", "percentile", "mse"]
MIN_BITS, MAX_BITS = 2, 8
# The percentile candidates of the reference initialisation (RepQ-ViT / I&S-ViT code).
ACTIVATION_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES: tuple[float, ...] = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
SULQ_ETAS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
_TORCH_QUANTILE_LIMIT = 16_000_000  # torch.quantile refuses larger inputs; numpy takes over (same interpolation)


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


# ---------------------------------------------------------------------------------------------------------------
# Uniform quantization: pure functions


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, 0, 2^b - 1)`` (as floats, differentiable via STE)."""
    return torch.clamp(round_ste(x / scale) + zero_point, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded onto the uniform grid of ``(scale, zero_point, bits)``; broadcasting parameters."""
    return dequantize_codes(quantize_codes(x, scale, zero_point, bits), scale, zero_point)


def uniform_params(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool = False, include_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` that map ``[low, high]`` onto the codes ``0 .. 2^b - 1``.

    Asymmetric: ``Δ = (high - low) / (2^b - 1)``, ``z = round(-low / Δ)`` (negative or above ``2^b - 1`` for a
    range that excludes 0, as in the reference percentile search; ``include_zero`` widens the range to hold 0,
    the usual min-max convention). Symmetric: ``Δ = max(|low|, |high|) / (2^(b-1) - 1)`` and ``z = 2^(b-1)``
    (signed codes stored with an offset). Zero-width ranges get a tiny Δ.
    """
    if include_zero or symmetric:
        low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / (2 ** (bits - 1) - 1)
        scale = torch.clamp(scale, min=1e-8)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = torch.clamp((high - low) / (2**bits - 1), min=1e-8)
    return scale, torch.round(-low / scale)


def to_groups(x: torch.Tensor, granularity: Granularity, axis: int = 0, group_size: int = 0) -> torch.Tensor:
    """``x`` as ``[groups, elements]``: each row is one set of values that shares ``(scale, zero_point)``.

    ``tensor``: one row. ``channel``: one row per index of ``axis`` (``0`` = output channels of a weight, ``-1`` =
    the channels of an activation ``[..., C]``). ``group``: groups of ``group_size`` consecutive elements of the
    last dimension (row-major), the usual layout of per-group weight quantization.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if x.shape[-1] % group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by group_size={group_size}")
    return x.reshape(-1, group_size)


def param_shape(shape: torch.Size, granularity: Granularity, axis: int = 0, group_size: int = 0) -> tuple[int, ...]:
    """The shape the per-group parameters take to broadcast against ``x`` (or its grouped view, for ``group``)."""
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        out = [1] * len(shape)
        out[axis] = shape[axis]
        return tuple(out)
    return (*shape[:-1], shape[-1] // group_size, 1)


def grouped_view(x: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """``x`` reshaped so per-group parameters broadcast: the last dimension split into ``[groups, group_size]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size) if granularity == "group" else x


def quantile_rows(rows: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of every row (linear interpolation, as ``torch.quantile``; numpy for huge inputs)."""
    rows = rows.detach().float()
    if rows.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(rows, q, dim=1)
    return torch.from_numpy(np.quantile(rows.cpu().numpy(), q, axis=1)).to(rows)


def calibrate_uniform(
    x: torch.Tensor,
    bits: int,
    *,
    granularity: Granularity = "tensor",
    axis: int = 0,
    group_size: int = 0,
    symmetric: bool = False,
    method: CalibrationMethod = "minmax",
    percentile: float = 0.9999,
    candidates: Sequence[float] = ACTIVATION_PERCENTILES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` for ``x``, each of shape ``param_shape(x.shape, ...)``.

    ``minmax``: the groups' min and max (widened to hold 0). ``percentile``: the ``1 - p`` and ``p`` quantiles.
    ``mse``: for every percentile in ``candidates``, the fake-quant squared error of each group; each group keeps
    its best (first on ties), as the reference initialisation does channel by channel.
    """
    check_bits(bits)
    rows = to_groups(x.detach().float(), granularity, axis, group_size)
    if method == "minmax":
        scale, zero = uniform_params(rows.min(dim=1).values, rows.max(dim=1).values, bits, symmetric, True)
    elif method == "percentile":
        scale, zero = uniform_params(
            quantile_rows(rows, 1 - percentile), quantile_rows(rows, percentile), bits, symmetric
        )
    elif method == "mse":
        best_err = None
        for p in candidates:
            s, z = uniform_params(quantile_rows(rows, 1 - p), quantile_rows(rows, p), bits, symmetric)
            err = (fake_quant_uniform(rows, s[:, None], z[:, None], bits) - rows).pow(2).mean(dim=1)
            if best_err is None:
                best_err, scale, zero = err, s, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    else:
        raise ValueError(f"unknown calibration method {method!r}; allowed: minmax, percentile, mse")
    shape = param_shape(x.shape, granularity, axis, group_size)
    return scale.reshape(shape).to(x.dtype), zero.reshape(shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Log-domain quantizers: pure functions


def fake_quant_log(x: torch.Tensor, scale: torch.Tensor, bits: int, base: float = 2.0) -> torch.Tensor:
    """``Δ · base^-k`` with ``k = round(-log_base(x / Δ))`` clamped at 0; ``k ≥ 2^b`` (too small) gives 0.

    For non-negative inputs (post-Softmax). ``base=√2`` is RepQ-ViT's log√2 quantizer (arXiv:2212.08254 §3.3).
    """
    k = round_ste(-torch.log(torch.clamp(x, min=1e-20) / scale) / math.log(base))
    underflow = k >= 2**bits
    k = torch.clamp(k, 0, 2**bits - 1)
    out = scale * torch.pow(torch.as_tensor(base, dtype=x.dtype, device=x.device), -k)
    return torch.where(underflow, torch.zeros_like(out), out)


def sulq_codes(
    x: torch.Tensor, eta: torch.Tensor, y_min: torch.Tensor, y_max: torch.Tensor, bits: int, official: bool = False
) -> torch.Tensor:
    """SULQ codes ``k = clamp(round((log2(x + η) - y_min) / s), 0, K)`` with ``s = (y_max - y_min) / K``.

    ``K = 2^b - 1`` (exactly 2^b codes, as the paper and the reference calibration define it). ``official=True``
    reproduces the reference forward, which uses ``K = 2^b`` and so ``2^b + 1`` codes (a bug: one more code than b
    bits hold; see arXiv:2311.10126 Eq. 9 for the b-bit definition).
    """
    top = 2**bits if official else 2**bits - 1
    step = torch.clamp((y_max - y_min) / top, min=1e-8)
    y = torch.log2(torch.clamp(x, min=0) + eta)
    return torch.clamp(round_ste((y - y_min) / step), 0, top)


def sulq_dequantize(codes: torch.Tensor, eta: torch.Tensor, y_min: torch.Tensor, y_max: torch.Tensor, bits: int,
                    official: bool = False) -> torch.Tensor:  # fmt: skip
    """``x̂ = 2^round(k s + y_min) - η``: the de-quantized log value rounded to an integer exponent (bit shifts)."""
    top = 2**bits if official else 2**bits - 1
    step = torch.clamp((y_max - y_min) / top, min=1e-8)
    return torch.pow(2.0, round_ste(codes * step + y_min)) - eta


def fake_quant_sulq(x: torch.Tensor, eta: torch.Tensor, y_min: torch.Tensor, y_max: torch.Tensor, bits: int,
                    official: bool = False) -> torch.Tensor:  # fmt: skip
    return sulq_dequantize(sulq_codes(x, eta, y_min, y_max, bits, official), eta, y_min, y_max, bits, official)


def calibrate_sulq(
    x: torch.Tensor, bits: int, etas: Sequence[float] = SULQ_ETAS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(η, y_min, y_max)``: for each η, the range of ``log2(x + η)`` and the MSE of the 2^b-code SULQ; the best."""
    check_bits(bits)
    x = x.detach().float()
    best = None
    for eta_value in etas:
        eta = torch.tensor(eta_value, dtype=x.dtype, device=x.device)
        y = torch.log2(torch.clamp(x, min=0) + eta)
        y_min, y_max = y.min(), y.max()
        err = (fake_quant_sulq(x, eta, y_min, y_max, bits) - x).pow(2).mean()
        if best is None or err < best[0]:
            best = (err, eta, y_min, y_max)
    return best[1], best[2], best[3]


def calibrate_log(
    x: torch.Tensor, bits: int, base: float = 2.0, candidates: Sequence[float] = ACTIVATION_PERCENTILES
) -> torch.Tensor:
    """``Δ`` of a log quantizer: among the ``candidates`` quantiles of ``x`` (and its max), the least-MSE one."""
    check_bits(bits)
    x = x.detach().float()
    flat = x.reshape(1, -1)
    best = None
    for delta in [quantile_rows(flat, p)[0] for p in candidates] + [x.max()]:
        delta = torch.clamp(delta, min=1e-8)
        err = (fake_quant_log(x, delta, bits, base) - x).pow(2).mean()
        if best is None or err < best[0]:
            best = (err, delta)
    return best[1]


# ---------------------------------------------------------------------------------------------------------------
# Quantizer modules


class Quantizer(nn.Module):
    """Base: ``enabled`` switches it on (else identity); unset parameters calibrate on the first enabled batch.

    ``role`` is ``"weight"`` or ``"activation"`` (``set_quant_state`` switches the two groups).
    """

    kind = "base"

    def __init__(self, bits: int, role: Literal["weight", "activation"]) -> None:
        super().__init__()
        check_bits(bits)
        self.bits = bits
        self.role = role
        self.enabled = False

    @property
    def calibrated(self) -> bool:
        raise NotImplementedError

    def calibrate(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.calibrated:
            with torch.no_grad():
                self.calibrate(x)
        return self.quantize(x)

    def describe(self) -> dict:
        """JSON-ready summary for reports: kind, bits and parameter statistics."""
        raise NotImplementedError


class UniformQuantizer(Quantizer):
    """Uniform affine quantizer; ``scale`` / ``zero_point`` buffers shaped by ``param_shape``."""

    kind = "uniform"

    def __init__(
        self,
        bits: int,
        role: Literal["weight", "activation"] = "activation",
        *,
        granularity: Granularity = "tensor",
        axis: int = 0,
        group_size: int = 0,
        symmetric: bool = False,
        method: CalibrationMethod = "mse",
        percentile: float = 0.9999,
        candidates: Sequence[float] | None = None,
    ) -> None:
        super().__init__(bits, role)
        if granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity {granularity!r}; allowed: tensor, channel, group")
        if granularity == "group" and group_size < 1:
            raise ValueError("per-group quantization needs group_size >= 1")
        self.granularity, self.axis, self.group_size = granularity, axis, group_size
        self.symmetric, self.method, self.percentile = symmetric, method, percentile
        default = WEIGHT_PERCENTILES if role == "weight" else ACTIVATION_PERCENTILES
        self.candidates = tuple(candidates) if candidates is not None else default
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def calibrate(self, x: torch.Tensor) -> None:
        scale, zero = calibrate_uniform(
            x,
            self.bits,
            granularity=self.granularity,
            axis=self.axis,
            group_size=self.group_size,
            symmetric=self.symmetric,
            method=self.method,
            percentile=self.percentile,
            candidates=self.candidates,
        )
        self.set_params(scale, zero)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale, self.zero_point = scale.detach().clone(), zero_point.detach().clone()

    def reset(self) -> None:
        self.scale = self.zero_point = None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int64, same shape as ``x``)."""
        view = grouped_view(x, self.granularity, self.group_size)
        return quantize_codes(view, self.scale, self.zero_point, self.bits).reshape(x.shape).round().long()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        view = grouped_view(x, self.granularity, self.group_size)
        return fake_quant_uniform(view, self.scale, self.zero_point, self.bits).reshape(x.shape)

    def describe(self) -> dict:
        out = {"kind": self.kind, "bits": self.bits, "granularity": self.granularity, "symmetric": self.symmetric}
        if self.calibrated:
            s = self.scale.float().reshape(-1)
            out.update(scale_min=float(s.min()), scale_mean=float(s.mean()), scale_max=float(s.max()))
            out["zero_point_mean"] = float(self.zero_point.float().mean())
        return out


class LogQuantizer(Quantizer):
    """Log-domain quantizer for non-negative activations (``base`` 2 or √2); ``scale`` buffer."""

    kind = "log"

    def __init__(self, bits: int, base: float = 2.0, candidates: Sequence[float] = ACTIVATION_PERCENTILES) -> None:
        super().__init__(bits, "activation")
        self.base, self.candidates = float(base), tuple(candidates)
        self.register_buffer("scale", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def calibrate(self, x: torch.Tensor) -> None:
        self.scale = calibrate_log(x, self.bits, self.base, self.candidates).to(x.dtype)

    def reset(self) -> None:
        self.scale = None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_log(x, self.scale, self.bits, self.base)

    def describe(self) -> dict:
        out = {"kind": self.kind, "bits": self.bits, "base": round(self.base, 6)}
        if self.calibrated:
            out["scale"] = float(self.scale)
        return out


class SULQ(Quantizer):
    """Shift-uniform-log2 quantizer (arXiv:2311.10126 §4.2); ``eta``, ``y_min``, ``y_max`` buffers.

    The reference code keeps ``y_min``/``y_max`` as plain attributes (not saved with the model); here they are
    buffers, so a calibrated model reloads without recalibration. ``official=True`` switches to the reference
    forward's ``2^b + 1`` codes (see ``sulq_codes``); the default follows the paper's ``2^b``.
    """

    kind = "sulq"

    def __init__(self, bits: int, etas: Sequence[float] = SULQ_ETAS, official: bool = False) -> None:
        super().__init__(bits, "activation")
        self.etas, self.official = tuple(etas), official
        for name in ("eta", "y_min", "y_max"):
            self.register_buffer(name, None)

    @property
    def calibrated(self) -> bool:
        return self.eta is not None

    def calibrate(self, x: torch.Tensor) -> None:
        eta, y_min, y_max = calibrate_sulq(x, self.bits, self.etas)
        self.eta, self.y_min, self.y_max = eta.to(x.dtype), y_min.to(x.dtype), y_max.to(x.dtype)

    def reset(self) -> None:
        self.eta = self.y_min = self.y_max = None

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return sulq_codes(x, self.eta, self.y_min, self.y_max, self.bits, self.official).round().long()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_sulq(x, self.eta, self.y_min, self.y_max, self.bits, self.official)

    def describe(self) -> dict:
        out = {"kind": self.kind, "bits": self.bits}
        if self.calibrated:
            out.update(eta=float(self.eta), y_min=float(self.y_min), y_max=float(self.y_max))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Fake-quant layers


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight pass through quantizers (either may be None: full precision)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.input_quantizer: Quantizer | None = None
        self.weight_quantizer: Quantizer | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, input_quantizer: Quantizer | None, weight_quantizer: Quantizer | None
    ) -> QuantLinear:
        """A ``QuantLinear`` sharing ``linear``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.input_quantizer, new.weight_quantizer = input_quantizer, weight_quantizer
        return new.train(linear.training)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (current, full-precision) parameters."""
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = self.in_features, self.out_features
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return F.linear(x, weight, self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a weight quantizer (the patch embedding: its input image is left in full precision)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_quantizer: Quantizer | None) -> QuantConv2d:
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # every conv attribute (stride, padding, ...) and the same parameters
        new._modules = dict(conv._modules)
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new.weight_quantizer = weight_quantizer
        return new

    def to_conv(self) -> nn.Conv2d:
        plain = nn.Conv2d.__new__(nn.Conv2d)
        plain.__dict__.update(self.__dict__)
        plain._modules = {k: v for k, v in self._modules.items() if k != "weight_quantizer"}
        plain._parameters, plain._buffers = dict(self._parameters), dict(self._buffers)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return self._conv_forward(x, weight, self.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with each operand through its quantizer (None: full precision). For q·kᵀ and attn·v."""

    def __init__(self, a_quantizer: Quantizer | None, b_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.a_quantizer, self.b_quantizer = a_quantizer, b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ b


def set_quant_state(model: nn.Module, weights: bool, activations: bool) -> None:
    """Enable or disable every weight and activation quantizer in ``model``."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.enabled = weights if module.role == "weight" else activations


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


# ---------------------------------------------------------------------------------------------------------------
# Packing integer codes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``b``-bit unsigned codes (any shape, row-major) as a 1-D uint8 tensor.

    8 bits: one byte per code. Fewer: a little-endian bit stream — bit ``j`` of code ``i`` is stream bit
    ``i * b + j`` — so two 4-bit codes share a byte (low nibble first) and eight 3-bit codes fill three bytes.
    """
    check_bits(bits)
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device)
    return pack_bits(((flat.unsqueeze(1) >> shifts) & 1).bool())


def packed_code_bytes(count: int, bits: int) -> int:
    return count if bits == 8 else packed_length(count * bits)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_codes``: int64 codes of ``shape``."""
    check_bits(bits)
    count = math.prod(int(s) for s in shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_code_bytes(count, bits):
        raise ValueError(
            f"expected {packed_code_bytes(count, bits)} uint8 byte(s) for {count} {bits}-bit code(s), "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.long().reshape(tuple(shape))
    stream = unpack_bits(packed, count * bits).reshape(count, bits).long()
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1).reshape(tuple(shape))


INT32_WORD_BITS = (4, 8)  # bit-widths whose codes tile a 32-bit word exactly


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``b``-bit unsigned codes ``[rows, cols]`` as int32 words ``[rows, ceil(cols * b / 32)]``, for b = 4 or 8.

    Code ``j`` of a row sits at bits ``(j mod 32/b) * b`` of word ``j div (32/b)`` (each row padded with zeros to
    whole words): the layout of compressed-tensors' ``pack-quantized`` format, whose stored values are the signed
    codes plus ``2^(b-1)`` — that is, our unsigned codes.
    """
    if bits not in INT32_WORD_BITS:
        raise ValueError(f"int32 word packing takes {INT32_WORD_BITS} bits, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"expected [rows, cols] codes, got shape {tuple(codes.shape)}")
    codes = codes.long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    per_word = 32 // bits
    codes = F.pad(codes, (0, -codes.shape[1] % per_word))
    shifts = torch.arange(per_word, device=codes.device) * bits
    words = (codes.reshape(codes.shape[0], -1, per_word) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_int32_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32_rows``: int64 codes ``[rows, cols]``."""
    if bits not in INT32_WORD_BITS:
        raise ValueError(f"int32 word packing takes {INT32_WORD_BITS} bits, got {bits}")
    per_word = 32 // bits
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != -(-cols // per_word):
        raise ValueError(
            f"expected int32 words [rows, {-(-cols // per_word)}] for {cols} {bits}-bit codes a row, "
            f"got {words.dtype} of shape {tuple(words.shape)}"
        )
    shifts = torch.arange(per_word, device=words.device) * bits
    codes = ((words.long() & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(words.shape[0], -1)[:, :cols]
