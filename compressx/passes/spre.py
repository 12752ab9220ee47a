"""SpRe: spatial re-parameterisation for N:M sparse CNNs — an extra branch in training, folded away for inference.

Zhang et al., "Spatial Re-parameterization for N:M Sparsity", arXiv:2306.05612 (TPAMI 2025); behaviour from the
official code (zyxxmu/SpRE).

Idea: N:M forces the same sparsity at every kernel position, while unstructured sparsity keeps some positions
denser than others. SpRe trains every spatial N:M conv (the main branch, SR-STE, followed by its BatchNorm) with a
parallel extra conv + BatchNorm whose weight is masked by the main branch's current N:M mask *and* a spatial mask:
the kernel positions that layer-wise unstructured magnitude pruning at the same sparsity ``1 - N/M`` keeps denser
than average (recomputed from the main weight before every training forward). The block computes
``BN_main(conv(x, W_main ⊙ B)) + BN_extra(conv(x, W_extra ⊙ B ⊙ S))``. With eval-mode BatchNorm both branches
are linear, and the sum has the support of B, so it folds exactly into one N:M conv.

Touches:
* every selected ``Conv2d`` with a spatial kernel that is directly followed by a ``BatchNorm2d`` (its next
  sibling module; checked on the ``torch.fx`` graph when the model traces): the pair is replaced in training by
  one ``SpreConv2d`` (the BatchNorm's place holds an ``nn.Identity``);
* every other selected layer (1x1 convs, Linear layers — the classifier too, as in the official ResNets —, convs
  without a BatchNorm): SR-STE only, through a weight parametrization. A model with no such pair (a ViT: Linear
  layers only) therefore trains exactly as ``sr_ste``; the pass then logs a warning and its report says so
  (``note``, ``extra_branches: 0``).
``finalize()`` puts back the model's own modules: each conv holds the folded N:M kernel and each BatchNorm the
folded affine parameters (``fold_into_conv_bn``), so the architecture and its state-dict keys are the original
ones (a timm / torchvision model reloads as itself). Folding that BatchNorm into the conv for deployment is the
usual conv-BN fusion; ``fold_branches`` gives the paper's single conv-with-bias form directly.

Deviations from the official code:
* The fold is checked (N:M asserted on the result) instead of re-masking the deployed conv, which would hide a
  wrong fold.
* Depthwise convs (one input channel per group) are not blocked across kernel positions and output channels as
  the official MobileNet does: M cannot divide them, so they follow ``incompatible`` (skipped by default).
* Any spatial kernel size gets the extra branch (the official spatial mask is hard-shaped 3x3); ``spatial_every``
  can recompute the spatial mask less often than every forward (official: every iteration).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn as nn

from compressx.errors import ConfigError
from compressx.ops.sparsity import nm_mask, topk_mask
from compressx.ops.ste import sr_ste
from compressx.passes.sr_ste import SrSteMask
from compressx.registry import PassContext, PassResult, register_pass
from compressx.training import (
    NM_TRAINABLE_TYPES,
    InTrainingModule,
    NMTrainingConfig,
    TrainingHandle,
    check_nm_layers,
    nm_final_report,
    parametrize_weights,
    select_nm_layers,
    set_submodule,
    unparametrize,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpreConfig(NMTrainingConfig):
    """Config of the ``spre`` pass (and the fields of ``NMTrainingConfig``: pattern, skip_stem, ...).

    Attributes:
        decay: SR-STE's λ_W for the main branches and the other N:M layers (2e-4, hard-coded officially).
        spatial_every: recompute the spatial masks every this many training forwards (official: 1).
        skip_classifier: default False here: SpRe's ResNets make the classifier N:M (a 1x1 SR-STE conv).
    """

    skip_classifier: bool = False
    decay: float = 2e-4
    spatial_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay < 0:
            raise ConfigError(f"got {self.decay}; must be >= 0", path="decay")
        if self.spatial_every < 1:
            raise ConfigError(f"got {self.spatial_every}; must be >= 1", path="spatial_every")


def spatial_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``[kh, kw]`` boolean: kernel positions that unstructured magnitude pruning at ``1 - N/M`` keeps denser
    than the layer average (``floor(numel · p)`` smallest ``|w|`` pruned, p = 1 - N/M)."""
    p = 1.0 - n / m
    pruned = ~topk_mask(weight.detach().abs().float(), p, dim=None)
    return pruned.float().mean(dim=(0, 1)) < p


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = t · x + c`` per channel."""
    weight = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    t = weight / torch.sqrt(bn.running_var + bn.eps)
    return t, bias - bn.running_mean * t


def fold_branches(
    main_weight: torch.Tensor,
    main_bias: torch.Tensor | None,
    main_bn: nn.BatchNorm2d,
    extra_weight: torch.Tensor,
    extra_bn: nn.BatchNorm2d,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's deploy conv ``(W, b)`` of ``BN_main(conv(x, main) + main_bias) + BN_extra(conv(x, extra))``.

    ``main_weight`` and ``extra_weight`` are the already-masked kernels (``W_main ⊙ B``, ``W_extra ⊙ B ⊙ S``).
    Exact for eval-mode BatchNorm: ``W = t_m ⊙ main + t_e ⊙ extra``, ``b = t_m · main_bias + c_m + c_e``.
    """
    t_main, c_main = _bn_scale_shift(main_bn)
    t_extra, c_extra = _bn_scale_shift(extra_bn)
    weight = t_main.view(-1, 1, 1, 1) * main_weight + t_extra.view(-1, 1, 1, 1) * extra_weight
    bias = c_main + c_extra + (t_main * main_bias if main_bias is not None else 0.0)
    return weight, bias


def fold_into_conv_bn(
    weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Express the deploy conv ``(weight, bias)`` as a bias-free conv followed by ``bn`` with its running
    statistics kept: returns ``(conv weight, bn weight, bn bias)``.

    Per channel the BatchNorm keeps its scale ``t`` (or uses 1 where it is 0), the conv takes ``weight / t`` and
    the BatchNorm's bias absorbs the rest; the composition equals the deploy conv exactly (up to rounding).
    """
    t_main, _ = _bn_scale_shift(bn)
    scale = torch.where(t_main == 0, torch.ones_like(t_main), t_main)
    conv_weight = weight / scale.view(-1, 1, 1, 1)
    bn_weight = scale * torch.sqrt(bn.running_var + bn.eps)
    bn_bias = bias + bn.running_mean * scale
    return conv_weight, bn_weight, bn_bias


class SpreConv2d(InTrainingModule):
    """Training-time SpRe block: the N:M main conv and its BatchNorm, plus the spatially masked extra branch."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, n: int, m: int, decay: float, every: int) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.n, self.m, self.decay, self.every = n, m, decay, every
        self.extra = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=False,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        nn.init.kaiming_normal_(self.extra.weight, mode="fan_in", nonlinearity="relu")  # the official conv init
        self.extra_bn = nn.BatchNorm2d(
            bn.num_features, bn.eps, bn.momentum, device=conv.weight.device, dtype=conv.weight.dtype
        )
        self.register_buffer("spatial", torch.ones(conv.kernel_size, dtype=torch.bool, device=conv.weight.device))
        self._forwards = 0

    def branch_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_main ⊙ B, W_extra ⊙ B ⊙ S)``; the first carries SR-STE's gradient, the mask carries none."""
        main = sr_ste(self.conv.weight, self.n, self.m, self.decay)
        keep = (main.detach() != 0) & self.spatial
        zero = torch.zeros((), dtype=main.dtype, device=main.device)
        return main, torch.where(keep, self.extra.weight, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self._forwards % self.every == 0:
                self.spatial.copy_(spatial_mask(self.conv.weight, self.n, self.m))
            self._forwards += 1
        main, extra = self.branch_weights()
        return self.bn(self.conv._conv_forward(x, main, self.conv.bias)) + self.extra_bn(
            self.extra._conv_forward(x, extra, None)
        )

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deploy conv ``(W, b)`` (eval-mode BatchNorm statistics): one N:M conv."""
        weight = self.conv.weight
        keep = nm_mask(weight.abs(), self.n, self.m)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        main = torch.where(keep, weight, zero)
        extra = torch.where((main != 0) & self.spatial, self.extra.weight, zero)
        return fold_branches(main, self.conv.bias, self.bn, extra, self.extra_bn)


def following_batchnorm(model: nn.Module, name: str, conv: nn.Conv2d) -> str | None:
    """The name of the ``BatchNorm2d`` registered right after conv ``name`` in its parent, if it can take the fold
    (same channels, affine, running statistics)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    siblings = list(parent.named_children())
    position = [n for n, _ in siblings].index(child)
    if position + 1 >= len(siblings):
        return None
    next_name, nxt = siblings[position + 1]
    fits = isinstance(nxt, nn.BatchNorm2d) and nxt.affine and nxt.track_running_stats
    if fits and nxt.num_features == conv.out_channels:
        return f"{parent_name}.{next_name}" if parent_name else next_name
    return None


def _graph_feeds(model: nn.Module) -> dict[str, list[str]] | None:
    """``conv name -> names of the modules that use its output`` from a ``torch.fx`` trace; None if untraceable."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # tracing is best effort: any failure means "cannot verify"
        log.info("spre: the model does not trace with torch.fx (%s); pairing conv and BatchNorm by module order", err)
        return None
    users: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            users[str(node.target)] = [
                str(u.target) if u.op == "call_module" else f"<{u.op} {u.target}>" for u in node.users
            ]
    return users


def pair_conv_bn(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[dict[str, str], dict[str, str]]:
    """``conv -> batchnorm`` pairs that get the extra branch, and ``conv -> reason`` for the other layers."""
    feeds = _graph_feeds(model)
    pairs, single = {}, {}
    for name, module in layers.items():
        if not isinstance(module, nn.Conv2d) or module.kernel_size[0] * module.kernel_size[1] == 1:
            single[name] = "no spatial kernel: SR-STE only"
            continue
        bn = following_batchnorm(model, name, module)
        if bn is None:
            single[name] = "no affine BatchNorm2d with running statistics right after it: SR-STE only"
        elif feeds is not None and feeds.get(name) != [bn]:
            single[name] = f"its output does not go only to {bn} in the traced graph: SR-STE only"
        else:
            pairs[name] = bn
    return pairs, single


@register_pass(
    "spre",
    config=SpreConfig,
    kind="training",
    paper="Spatial Re-parameterization for N:M Sparsity (Zhang et al., arXiv:2306.05612)",
    families=("cnn", "vit", "any"),
    target_types=NM_TRAINABLE_TYPES,
    check=check_nm_layers,
)
def apply_spre(model: nn.Module, config: SpreConfig, ctx: PassContext) -> PassResult:
    """Give every spatial conv + BatchNorm pair the extra branch and the other N:M layers SR-STE."""
    n, m = config.nm
    layers, skipped = select_nm_layers(model, ctx.targets, config)
    pairs, single = pair_conv_bn(model, layers)
    for name, reason in single.items():
        log.info("spre: %s: %s", name, reason)
    blocks: dict[str, SpreConv2d] = {}
    for conv_name, bn_name in pairs.items():
        block = SpreConv2d(layers[conv_name], model.get_submodule(bn_name), n, m, config.decay, config.spatial_every)
        set_submodule(model, conv_name, block)
        set_submodule(model, bn_name, nn.Identity())
        blocks[conv_name] = block
    others = {name: layers[name] for name in single}
    parametrize_weights(others, lambda _: SrSteMask(n, m, config.decay))  # SR-STE only
    note = None
    if not blocks:  # e.g. a ViT: Linear layers only. Say so: the run is plain SR-STE, not SpRe.
        note = (
            f"no spatial conv followed by a BatchNorm among the {len(layers)} N:M layers: no extra branch, "
            "so spre trains exactly as sr_ste"
        )
        log.warning("spre: %s", note)

    def restore(fold: bool) -> None:
        for conv_name, block in blocks.items():
            if fold:
                weight, bias = block.fold()
                conv_weight, bn_weight, bn_bias = fold_into_conv_bn(weight, bias, block.bn)
                with torch.no_grad():
                    block.conv.weight.copy_(conv_weight)
                    if block.conv.bias is not None:
                        block.conv.bias.zero_()  # absorbed into the BatchNorm's bias by fold_branches
                    block.bn.weight.copy_(bn_weight)
                    block.bn.bias.copy_(bn_bias)
            set_submodule(model, conv_name, block.conv)
            set_submodule(model, pairs[conv_name], block.bn)
        unparametrize(others, keep_projection=fold)

    def finalize() -> dict:
        restore(fold=True)
        return nm_final_report(layers, config.pattern)

    handle = TrainingHandle(model, "spre", None, finalize, functools.partial(restore, fold=False))
    report = {
        "pattern": config.pattern,
        "decay": config.decay,
        "modules": len(layers),
        "extra_branches": len(blocks),
        "extra_parameters": sum(
            p.numel() for b in blocks.values() for p in (*b.extra.parameters(), *b.extra_bn.parameters())
        ),
        "sr_ste_only": single,
        "dense_modules": skipped,
        **({"note": note} if note else {}),
    }
    return PassResult(report=report, handle=handle)
