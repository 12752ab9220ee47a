"""Post-training quantization of vision transformers: the model side the ``ptq_minmax``, ``repq_vit`` and ``isvit``
passes share (the quantizers themselves are in ``compressx.ops.quant``).

* ``find_layout`` — where the blocks, the post-LayerNorm linears, the attentions, the patch embedding and the head
  are in a supported model: timm ``VisionTransformer`` (ViT, DeiT), timm ``SwinTransformer`` and Hugging Face
  ``ViTForImageClassification`` / ``DeiTForImageClassification``, anywhere inside the given module. Anything else
  is a ``CompressxError`` naming those.
* ``wrap`` — every ``nn.Linear`` of the model becomes a ``QuantLinear`` (input and weight quantizer), the patch
  embedding ``Conv2d`` a ``QuantConv2d`` (weight quantizer; the image itself stays in full precision, as in the
  reference code of arXiv:2311.10126), and each attention *instance* gets ``matmul_qk`` / ``matmul_av``
  ``QuantMatMul`` children and a forward that routes q·kᵀ and attn·v through them (eager attention, same maths).
  ``QuantizedViT.remove()`` undoes all of it and leaves plain modules with the current weights.
* ``fold_post_layernorm`` — RepQ-ViT's scale reparameterisation (arXiv:2212.08254 §3.2, Eq. 4–6), I&S-ViT's SOS
  stage 2 (arXiv:2311.10126 §4.3): a channel-wise quantizer on a LayerNorm output becomes a per-tensor one, the
  per-channel ratios moving into the LayerNorm affine and the next linear layers' input columns and bias.
* ``capture`` / ``reconstruct`` — a unit's cached inputs and outputs over the calibration images, and block-wise
  reconstruction (Adam, cosine schedule, squared error summed over tokens and averaged over the rest,
  arXiv:2311.10126 §4.3 and its reference code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.errors import CompressxError
from compressx.ops.quant import (
    SULQ,
    LogQuantizer,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    QuantMatMul,
    UniformQuantizer,
    quantizers,
)

SUPPORTED_MODELS = (
    "timm VisionTransformer (vit_*, deit_*)",
    "timm SwinTransformer (swin_*)",
    "transformers ViTForImageClassification",
    "transformers DeiTForImageClassification",
)
SOFTMAX_QUANTIZERS = ("uniform", "log2", "log_sqrt2", "sulq")


@dataclasses.dataclass
class ViTLayout:
    """Module names (relative to the model given) of the parts the quantization passes treat specially."""

    family: str  # "timm_vit" | "timm_swin" | "hf_vit"
    blocks: list[str]
    post_layernorm: list[tuple[str, list[str]]]  # (LayerNorm, the linears reading its output)
    attentions: list[str]
    patch_embed: str
    head: str | None
    units: list[str] = dataclasses.field(default_factory=list)  # reconstruction units between patch embed and head

    def __post_init__(self) -> None:
        self.units = self.units or list(self.blocks)


def _is_timm_vit(module: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(module, VisionTransformer)


def _is_timm_swin(module: nn.Module) -> bool:
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError:
        return False
    return isinstance(module, SwinTransformer)


def _is_hf_vit(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in ("ViTModel", "DeiTModel") and hasattr(module, "embeddings") and _hf_layers(module) is not None


def _hf_layers(vit: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer layers of a transformers ViT/DeiT model (``layers``, or ``encoder.layer`` in older releases)."""
    if isinstance(getattr(vit, "layers", None), nn.ModuleList):
        return "layers", vit.layers
    encoder = getattr(vit, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return "encoder.layer", encoder.layer
    return None


def find_layout(model: nn.Module) -> ViTLayout:
    """The layout of the first supported ViT inside ``model``; ``CompressxError`` naming the supported ones."""
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if _is_timm_vit(module):
            return _timm_layout(module, dot)
        if _is_timm_swin(module):
            return _swin_layout(module, dot)
        if _is_hf_vit(module):
            return _hf_layout(model, module, dot)
    raise CompressxError(
        f"post-training ViT quantization does not support {type(model).__name__}: no supported vision transformer "
        f"inside it; supported: {', '.join(SUPPORTED_MODELS)}"
    )


def _timm_layout(vit: nn.Module, dot: str) -> ViTLayout:
    from timm.layers import Attention

    blocks, pairs, attentions = [], [], []
    for i, block in enumerate(vit.blocks):
        name = f"{dot}blocks.{i}"
        if type(getattr(block, "attn", None)) is not Attention or not isinstance(block.norm1, nn.LayerNorm):
            raise CompressxError(
                f"{name}: only timm blocks with the standard Attention and LayerNorm are supported "
                f"(got {type(getattr(block, 'attn', None)).__name__}); supported: {', '.join(SUPPORTED_MODELS)}"
            )
        blocks.append(name)
        attentions.append(f"{name}.attn")
        pairs.append((f"{name}.norm1", [f"{name}.attn.qkv"]))
        pairs.append((f"{name}.norm2", [f"{name}.mlp.fc1"]))
    head = f"{dot}head" if isinstance(vit.head, nn.Linear) else None
    return ViTLayout("timm_vit", blocks, pairs, attentions, f"{dot}patch_embed.proj", head)


def _swin_layout(swin: nn.Module, dot: str) -> ViTLayout:
    """timm Swin: stages ``layers[i]`` (PatchMerging ``downsample`` first, then ``blocks[j]``), head ``head.fc``.

    The PatchMerging ``reduction`` follows a LayerNorm too, but, as in the reference code, only ``qkv`` and ``fc1``
    inputs are quantized per channel; ``reduction`` is reconstructed as a layer unit of its own.
    """
    from timm.models.swin_transformer import PatchMerging, WindowAttention

    blocks, pairs, attentions, units = [], [], [], []
    for i, stage in enumerate(swin.layers):
        if isinstance(stage.downsample, PatchMerging):
            units.append(f"{dot}layers.{i}.downsample.reduction")
        for j, block in enumerate(stage.blocks):
            name = f"{dot}layers.{i}.blocks.{j}"
            if type(block.attn) is not WindowAttention:
                raise CompressxError(
                    f"{name}: only timm's WindowAttention is supported, got {type(block.attn).__name__}"
                )
            blocks.append(name)
            units.append(name)
            attentions.append(f"{name}.attn")
            pairs.append((f"{name}.norm1", [f"{name}.attn.qkv"]))
            pairs.append((f"{name}.norm2", [f"{name}.mlp.fc1"]))
    head = f"{dot}head.fc" if isinstance(getattr(swin.head, "fc", None), nn.Linear) else None
    return ViTLayout("timm_swin", blocks, pairs, attentions, f"{dot}patch_embed.proj", head, units)


def _hf_layout(model: nn.Module, vit: nn.Module, dot: str) -> ViTLayout:
    blocks, pairs, attentions = [], [], []
    where, layers = _hf_layers(vit)
    for i, layer in enumerate(layers):
        name = f"{dot}{where}.{i}"
        attn = layer.attention
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            raise CompressxError(
                f"{name}: this transformers version's {type(attn).__name__} has no q_proj/k_proj/v_proj/o_proj; "
                f"supported: {', '.join(SUPPORTED_MODELS)} with transformers >= 5"
            )
        blocks.append(name)
        attentions.append(f"{name}.attention")
        pairs.append((f"{name}.layernorm_before", [f"{name}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj")]))
        pairs.append((f"{name}.layernorm_after", [f"{name}.mlp.fc1"]))
    names = dict(model.named_modules())
    head = next((n for n in ("classifier", "cls_classifier") if isinstance(names.get(n), nn.Linear)), None)
    return ViTLayout("hf_vit", blocks, pairs, attentions, f"{dot}embeddings.patch_embeddings.projection", head)


# ---------------------------------------------------------------------------------------------------------------
# Attention forwards with quantized matmuls (bound per instance)


def _timm_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Attention.forward`` (eager path) with q·kᵀ and attn·v through ``matmul_qk`` / ``matmul_av``."""
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale  # the reference scales after the matmul
    attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _swin_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
    """timm ``WindowAttention.forward`` (eager path) with quantized matmuls; q is scaled before q·kᵀ, and the
    relative-position bias and the shift mask are added before the softmax, as in the reference code."""
    B_, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self._get_rel_pos_bias()
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = self.matmul_av(attn, v).transpose(1, 2).reshape(B_, N, -1)
    return self.proj_drop(self.proj(x))


def _hf_attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers ``ViTAttention.forward`` (eager) with q·kᵀ and attn·v through ``matmul_qk`` / ``matmul_av``."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    attn = self.matmul_qk(q, k.transpose(2, 3)) * self.scaling
    if attention_mask is not None:
        attn = attn + attention_mask
    attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    attn = F.dropout(attn, p=self.attention_dropout if self.training else 0.0, training=self.training)
    out = self.matmul_av(attn, v).transpose(1, 2).reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), attn


_ATTENTION_FORWARDS = {
    "timm_vit": _timm_attention_forward,
    "timm_swin": _swin_attention_forward,
    "hf_vit": _hf_attention_forward,
}


def attention_forward(attn: nn.Module, family: str) -> None:
    """Bind the quantized-matmul forward of ``family`` to this attention instance (its class is untouched)."""
    attn.forward = types.MethodType(_ATTENTION_FORWARDS[family], attn)


# ---------------------------------------------------------------------------------------------------------------
# Wrapping


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """How ``wrap`` quantizes: bit-widths, granularities, calibration methods, what stays full precision."""

    w_bits: int = 4
    a_bits: int = 4
    weight_granularity: str = "channel"  # "channel" (per output channel) | "tensor"
    weight_method: str = "mse"  # minmax | percentile | mse
    activation_method: str = "mse"
    post_layernorm_channelwise: bool = True  # per-channel input quantizers on the post-LayerNorm linears
    softmax: str = "sulq"  # one of SOFTMAX_QUANTIZERS
    official_sulq: bool = False
    keep_full_precision: tuple[str, ...] = ()  # any of: patch_embed, head, attention_matmuls


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _softmax_quantizer(settings: QuantSettings) -> Quantizer:
    bits = settings.a_bits
    if settings.softmax == "sulq":
        return SULQ(bits, official=settings.official_sulq)
    if settings.softmax == "log2":
        return LogQuantizer(bits, base=2.0)
    if settings.softmax == "log_sqrt2":
        return LogQuantizer(bits, base=math.sqrt(2.0))
    return UniformQuantizer(bits, "activation", method=settings.activation_method)


class QuantizedViT:
    """The quantization installed on a model by ``wrap``; ``remove()`` restores plain modules."""

    def __init__(self, model: nn.Module, layout: ViTLayout, settings: QuantSettings) -> None:
        self.model, self.layout, self.settings = model, layout, settings
        self.linears: list[str] = []
        self.convs: list[str] = []
        self.attentions: list[str] = []

    def remove(self) -> None:
        for name in self.linears:
            _set_child(self.model, name, self.model.get_submodule(name).to_linear())
        for name in self.convs:
            _set_child(self.model, name, self.model.get_submodule(name).to_conv())
        for name in self.attentions:
            attn = self.model.get_submodule(name)
            del attn.forward  # the instance attribute: the class's forward applies again
            del attn.matmul_qk, attn.matmul_av
        self.linears, self.convs, self.attentions = [], [], []


def wrap(model: nn.Module, layout: ViTLayout, settings: QuantSettings) -> QuantizedViT:
    """Install fake quantization on ``model`` in place (quantizers disabled until ``set_quant_state``)."""
    handle = QuantizedViT(model, layout, settings)
    keep = set(settings.keep_full_precision)
    post_ln = {lin for _, linears in layout.post_layernorm for lin in linears}
    a = settings.a_bits
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            if name == layout.head and "head" in keep:
                continue
            per_channel = settings.post_layernorm_channelwise and name in post_ln
            act = UniformQuantizer(
                a, "activation", granularity="channel" if per_channel else "tensor", axis=-1,
                method=settings.activation_method,
            )  # fmt: skip
            weight = UniformQuantizer(
                settings.w_bits, "weight", granularity=settings.weight_granularity, axis=0,
                method=settings.weight_method,
            )  # fmt: skip
            _set_child(model, name, QuantLinear.from_linear(module, act, weight))
            handle.linears.append(name)
        elif type(module) is nn.Conv2d and name == layout.patch_embed and "patch_embed" not in keep:
            weight = UniformQuantizer(
                settings.w_bits, "weight", granularity=settings.weight_granularity, axis=0,
                method=settings.weight_method,
            )  # fmt: skip
            _set_child(model, name, QuantConv2d.from_conv(module, weight))
            handle.convs.append(name)
    quantize_matmuls = "attention_matmuls" not in keep
    for name in layout.attentions:
        attn = model.get_submodule(name)
        if quantize_matmuls:
            attn.matmul_qk = QuantMatMul(
                UniformQuantizer(a, "activation", method=settings.activation_method),
                UniformQuantizer(a, "activation", method=settings.activation_method),
            )
            attn.matmul_av = QuantMatMul(
                _softmax_quantizer(settings), UniformQuantizer(a, "activation", method=settings.activation_method)
            )
        else:
            attn.matmul_qk, attn.matmul_av = QuantMatMul(None, None), QuantMatMul(None, None)
        attention_forward(attn, layout.family)
        handle.attentions.append(name)
    return handle


# ---------------------------------------------------------------------------------------------------------------
# Stage 2 / RepQ-ViT: channel-wise post-LayerNorm quantizers folded into layer-wise ones


@torch.no_grad()
def fold_post_layernorm(
    layernorm: nn.LayerNorm, linears: list[QuantLinear], round_zero_point: bool = True
) -> dict[str, float]:
    """Turn the channel-wise input quantizer of ``linears`` (all reading ``layernorm``'s output) per-tensor.

    With per-channel ``(s_c, z_c)`` and targets ``s̃ = mean s_c``, ``z̃ = round(mean z_c)``: ``r_c = s_c / s̃``,
    ``b_c = -s̃ (z_c - z̃)``; the LayerNorm affine becomes ``γ_c / r_c``, ``β_c / r_c - b_c``; each linear's
    input column c is multiplied by ``r_c`` and ``W_new b`` is added to its bias (arXiv:2212.08254 Eq. 5–6). The
    full-precision function is unchanged, and since ``x'_c / s̃ + z̃ = x_c / s_c + z_c`` the integer codes are
    unchanged too when ``z̃`` is an integer. The reference I&S-ViT code leaves ``z̃`` unrounded, which makes the
    fold only approximately code-preserving; here it is rounded (``round_zero_point=False`` reproduces the
    reference). The linears' weight quantizers are reset, to recalibrate on the new weights.
    """
    first = linears[0].input_quantizer
    if not isinstance(first, UniformQuantizer) or first.granularity != "channel" or not first.calibrated:
        raise ValueError("fold_post_layernorm needs a calibrated channel-wise input quantizer on the linear")
    scale, zero = first.scale.reshape(-1).double(), first.zero_point.reshape(-1).double()
    target_scale = scale.mean()
    target_zero = zero.mean().round() if round_zero_point else zero.mean()
    ratio = scale / target_scale
    shift = -target_scale * (zero - target_zero)
    dtype = layernorm.weight.dtype
    layernorm.weight.copy_((layernorm.weight.double() / ratio).to(dtype))
    layernorm.bias.copy_((layernorm.bias.double() / ratio - shift).to(dtype))
    for linear in linears:
        new_weight = linear.weight.double() * ratio[None, :]
        extra = new_weight @ shift
        linear.weight.copy_(new_weight.to(dtype))
        if linear.bias is None:
            linear.bias = nn.Parameter(extra.to(dtype))
        else:
            linear.bias.copy_((linear.bias.double() + extra).to(dtype))
        layerwise = UniformQuantizer(first.bits, "activation", granularity="tensor", method=first.method)
        layerwise.set_params(target_scale.to(dtype), target_zero.to(dtype))
        layerwise.enabled = first.enabled
        linear.input_quantizer = layerwise
        if linear.weight_quantizer is not None:
            linear.weight_quantizer.reset()
    return {"scale_ratio_min": float(ratio.min()), "scale_ratio_max": float(ratio.max())}


def fold_all(model: nn.Module, layout: ViTLayout, round_zero_point: bool = True) -> dict[str, dict[str, float]]:
    """``fold_post_layernorm`` on every (LayerNorm, linears) pair of the layout that has channel-wise quantizers."""
    out = {}
    for ln_name, linear_names in layout.post_layernorm:
        linears = [model.get_submodule(n) for n in linear_names]
        if all(isinstance(lin, QuantLinear) for lin in linears):
            out[ln_name] = fold_post_layernorm(model.get_submodule(ln_name), linears, round_zero_point)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Calibration data, capture and block reconstruction


class _Stop(Exception):
    pass


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@torch.no_grad()
def capture(
    model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, outputs)`` of ``unit`` when ``model`` runs on ``images``, concatenated over mini-batches.

    The model's forward stops right after the unit (nothing after it runs).
    """
    inputs, outputs = [], []

    def hook(_module, args, output):
        inputs.append(args[0].detach())
        outputs.append(_first(output).detach())
        raise _Stop

    handle = unit.register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            with contextlib.suppress(_Stop):
                model(images[start : start + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


@torch.no_grad()
def run_batches(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in mini-batches."""
    device = next(model.parameters()).device
    return torch.cat(
        [_logits(model(images[s : s + batch_size].to(device))) for s in range(0, len(images), batch_size)]
    )


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else _first(output)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimension 1 (tokens; classes for the head) and averaged over the rest."""
    return (output - target).pow(2).sum(dim=1).mean()


@torch.no_grad()
def unit_loss(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        out = _first(unit(inputs[start : start + batch_size]))
        total += float(reconstruction_loss(out, targets[start : start + batch_size])) * len(out)
    return total / max(len(inputs), 1)


def trainable_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the unit's Linear / Conv2d layers: what block reconstruction learns.

    LayerNorm affine parameters and every quantizer parameter stay frozen (arXiv:2311.10126 §4.3).
    """
    params = []
    for module in unit.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            params += [p for p in (module.weight, module.bias) if p is not None]
    return params


def reconstruct(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "reconstruct",
) -> tuple[float, float]:
    """Fine-tune the unit's linear weights so its (quantized) output matches ``targets``; loss before and after.

    Adam with default betas and no weight decay, cosine annealing of the learning rate to 0 over ``iterations``,
    each step on ``batch_size`` cached examples drawn at random (with ``generator``).
    """
    before = unit_loss(unit, inputs, targets)
    if iterations <= 0:
        return before, before
    params = trainable_parameters(unit)
    saved = {p: p.requires_grad for p in unit.parameters()}
    for p in unit.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    try:
        with torch.enable_grad():
            for _ in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
                index = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), generator=generator)
                loss = reconstruction_loss(_first(unit(inputs[index])), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return before, unit_loss(unit, inputs, targets)


def calibration_images(data: Any, count: int, seed: int) -> torch.Tensor:
    """``count`` calibration images drawn with ``seed`` from a ``[N, C, H, W]`` tensor or an ``(image, label)``
    dataset (the first batch of a shuffled loader, as the reference code takes them)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise CompressxError(f"calibration images must be a [N, C, H, W] tensor, got shape {tuple(data.shape)}")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
        return data[order]
    if isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(
            data, batch_size=count, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        batch = next(iter(loader))
        return batch[0] if isinstance(batch, list | tuple) else batch
    raise CompressxError(
        "calibration data for ViT quantization must be images: a [N, C, H, W] tensor or an (image, label) dataset "
        f"(in a recipe: data.calibration: {{source: digits | image_folder, ...}}), got {type(data).__name__}"
    )


def quantizer_report(model: nn.Module) -> dict[str, dict]:
    """Per quantizer: kind, bits and scale statistics (JSON-ready)."""
    return {name: q.describe() for name, q in quantizers(model).items()}
