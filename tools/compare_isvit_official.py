"""I&S-ViT stage 1 initialisation and stage 2 fold: compressx beside the official code (zysxmu/IaS-ViT).

Both sides start from one tiny timm ViT (random weights, non-trivial LayerNorm affines so that the per-channel
post-LayerNorm ranges differ) and the same calibration batch of 64 images, on the CPU in float32:

* the reference: its ``build_model`` attention patch, ``quant_model``, one forward with activation quantizers on
  (their initialisation), then its stage-2 loop, **read from the checkout's ``test_quant.py`` and run as is**
  (nothing of the reference is copied into compressx);
* compressx: ``wrap`` with ``official_sulq`` (the reference forward's 2^b + 1 SULQ codes, so that every later
  quantizer sees the same inputs), ``initialise``, then ``fold_all`` with ``round_zero_point`` false (the
  reference's unrounded z̃) and true (compressx's default, arXiv:2311.10126 §4.3 with RepQ-ViT's exact fold).

Printed: the differences of every activation quantizer's calibrated parameters, of the folded LayerNorm / Linear
parameters and per-tensor targets, of the logits, and what rounding z̃ changes. The reference needs two CPU
patches, made here without touching its files: its attention forward takes timm 1.0's ``attn_mask`` /
``is_causal`` keywords, and the device is never set (nothing runs on ``cuda``).

Run: PYTHONPATH=. OMP_NUM_THREADS=1 python tools/compare_isvit_official.py --official PATH/TO/IaS-ViT --bits 4 3
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, VisionTransformer

from compressx.ops.quant import set_quant_state
from compressx.ops.vit_quant import QuantSettings, find_layout, fold_all, wrap
from compressx.passes._vit_ptq import initialise

STAGE2_START = 'print("Stage Two, reparameterization")'
STAGE2_END = "set_quant_state(q_model, input_quant=True, weight_quant=False)"
FOLDED = ("attn.qkv", "mlp.fc1")


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=4, num_heads=4
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 3 + 0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def reference_stage2(checkout: Path) -> str:
    """The reference's stage-2 loop, as source text from its ``test_quant.py``."""
    source = (checkout / "test_quant.py").read_text()
    start = source.index(STAGE2_START)
    end = source.index(STAGE2_END, start)
    lines = source[start:end].splitlines()[1:]
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def reference_model(fp: nn.Module, official: types.ModuleType, build: types.ModuleType, bits: int) -> nn.Module:
    model = copy.deepcopy(fp)
    for module in model.modules():
        if isinstance(module, Attention):
            module.matmul1, module.matmul2 = build.MatMul(), build.MatMul()
            # timm 1.0 passes attn_mask / is_causal, which the reference forward (written for timm 0.4) lacks
            module.forward = types.MethodType(
                lambda self, x, attn_mask=None, is_causal=False: build.attention_forward(self, x), module
            )
    return official.quant_model(
        model,
        input_quant_params={"n_bits": bits, "channel_wise": False},
        weight_quant_params={"n_bits": bits, "channel_wise": True},
    )


@torch.no_grad()
def run_reference(model: nn.Module, official: types.ModuleType, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    official.set_quant_state(model, input_quant=quantized, weight_quant=False)
    return model(x)


@torch.no_grad()
def run_ours(model: nn.Module, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    set_quant_state(model, weights=False, activations=quantized)
    return model(x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().reshape(-1).double() - b.detach().reshape(-1).double()).abs().max().item()


def quantizer_pairs(ref: nn.Module, ours: nn.Module, blocks: int):
    """(reference uniform quantizer, ours) for every activation quantizer but SULQ; then the SULQ pairs."""
    uniform, sulq = [], []
    for i in range(blocks):
        for linear in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            name = f"blocks.{i}.{linear}"
            uniform.append((ref.get_submodule(name).input_quantizer, ours.get_submodule(name).input_quantizer))
        qk, av = ref.get_submodule(f"blocks.{i}.attn.matmul1"), ref.get_submodule(f"blocks.{i}.attn.matmul2")
        our_qk, our_av = (
            ours.get_submodule(f"blocks.{i}.attn.matmul_qk"),
            ours.get_submodule(f"blocks.{i}.attn.matmul_av"),
        )
        uniform += [(qk.quantizer_A, our_qk.a_quantizer), (qk.quantizer_B, our_qk.b_quantizer)]
        uniform.append((av.quantizer_B, our_av.b_quantizer))
        sulq.append((av.quantizer_A, our_av.a_quantizer))
    uniform.append((ref.head.input_quantizer, ours.head.input_quantizer))
    return uniform, sulq


def fake(y: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The reference's uniform fake quantization (also ours)."""
    return (torch.clamp(torch.round(y / scale) + zero, 0, 2**bits - 1) - zero) * scale


@torch.no_grad()
def values_moved(stage1: nn.Module, folded: nn.Module, images: torch.Tensor, bits: int) -> list[float]:
    """Per folded quantizer: the share of quantized post-LN values the next Linear sees differently after the fold
    (the folded value mapped back, y = (y' + b_c) r_c, against the stage-1 channel-wise one, same LN inputs)."""
    shares = []
    for i in range(len(stage1.blocks)):
        for norm_name, linear in zip(("norm1", "norm2"), FOLDED, strict=True):
            seen = {}
            norm1 = stage1.get_submodule(f"blocks.{i}.{norm_name}")
            hook = norm1.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("x", args[0]))
            run_ours(stage1, images, True)
            hook.remove()
            q1 = stage1.get_submodule(f"blocks.{i}.{linear}").input_quantizer
            q2 = folded.get_submodule(f"blocks.{i}.{linear}").input_quantizer
            s_c, z_c = q1.scale.reshape(-1), q1.zero_point.reshape(-1)
            r, b = s_c / q2.scale, -q2.scale * (z_c - q2.zero_point)
            before = fake(norm1(seen["x"]), s_c, z_c, bits)
            after = (
                fake(folded.get_submodule(f"blocks.{i}.{norm_name}")(seen["x"]), q2.scale, q2.zero_point, bits) + b
            ) * r
            shares.append(((after - before).abs() > 1e-3 * s_c).float().mean().item())
    return shares


def compare(checkout: Path, bits: int) -> None:
    import quant as official  # the reference's quant/ package, from --official

    build = importlib.import_module("utils.build_model")  # the module (utils re-exports a function of that name)

    fp = tiny_vit()
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    test = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    ref = reference_model(fp, official, build, bits)
    run_reference(ref, official, calib[:64], True)  # the reference initialises its quantizers on this forward
    ours = copy.deepcopy(fp)
    layout = find_layout(ours)
    wrap(ours, layout, QuantSettings(w_bits=bits, a_bits=bits, softmax="sulq", official_sulq=True))
    initialise(ours, calib[:64], weights=False, activations=True)

    print(f"## W{bits}/A{bits}\n")
    uniform, sulq = quantizer_pairs(ref, ours, len(fp.blocks))
    scale = max(max_diff(r.delta, o.scale) / r.delta.abs().max().item() for r, o in uniform)
    zero = max(max_diff(r.zero_point, o.zero_point) for r, o in uniform)
    print(f"- stage-1 initialisation, {len(uniform)} uniform activation quantizers (per-channel post-LN included): "
          f"max relative scale difference {scale:.3g}, max zero-point difference {zero:.3g}")  # fmt: skip
    eta = max(abs(float(r.delta) - float(o.eta)) for r, o in sulq)
    y_min = max(abs(float(r.minv) - float(o.y_min)) for r, o in sulq)
    y_max = max(abs(float(r.maxv) - float(o.y_max)) for r, o in sulq)
    print(f"- SULQ, {len(sulq)} quantizers: max |η difference| {eta:.3g}, |y_min| {y_min:.3g}, |y_max| {y_max:.3g}")
    before_ref = {q: run_reference(ref, official, test, q) for q in (False, True)}
    before_ours = {q: run_ours(ours, test, q) for q in (False, True)}
    print(f"- logits before the fold, 128 test images: FP {max_diff(before_ref[False], before_ours[False]):.3g}, "
          f"activations quantized {max_diff(before_ref[True], before_ours[True]):.3g}")  # fmt: skip

    stage1 = copy.deepcopy(ours)
    unrounded, rounded = ours, copy.deepcopy(ours)
    exec(reference_stage2(checkout), {"q_model": ref, "args": argparse.Namespace(model="vit"), "torch": torch,
                                      "Parameter": nn.Parameter, "RuntimeError": RuntimeError})  # fmt: skip
    fold_all(unrounded, layout, round_zero_point=False)
    fold_all(rounded, layout, round_zero_point=True)

    ref_state, our_state = ref.state_dict(), unrounded.state_dict()
    folded = {}
    for name, tensor in ref_state.items():
        part = next((p for p in ("norm1", "norm2", "qkv", "fc1") if f".{p}." in name), None)
        if part and "quantizer" not in name:
            key = f"{part}.{name.rsplit('.', 1)[-1]}"
            folded[key] = max(folded.get(key, 0.0), max_diff(tensor, our_state[name]))
    print(
        "- stage 2 against `round_zero_point: false`, max abs difference of the folded parameters: "
        + ", ".join(f"{k} {v:.2g}" for k, v in sorted(folded.items()))
    )
    targets = [(ref.get_submodule(f"blocks.{i}.{lin}").input_quantizer,
                unrounded.get_submodule(f"blocks.{i}.{lin}").input_quantizer)
               for i in range(len(fp.blocks)) for lin in FOLDED]  # fmt: skip
    print(
        f"- per-tensor targets: max |s̃ difference| {max(max_diff(r.delta, o.scale) for r, o in targets):.3g}, "
        f"max |z̃ difference| {max(max_diff(r.zero_point, o.zero_point) for r, o in targets):.3g}"
    )
    after_ref = {q: run_reference(ref, official, test, q) for q in (False, True)}
    after_un = {q: run_ours(unrounded, test, q) for q in (False, True)}
    after_ro = {q: run_ours(rounded, test, q) for q in (False, True)}
    print(
        f"- logits after the fold: FP {max_diff(after_ref[False], after_un[False]):.3g}, activations quantized "
        f"{max_diff(after_ref[True], after_un[True]):.3g}"
    )
    print(f"- the reference's unrounded z̃: {', '.join(f'{float(o.zero_point):.3f}' for _, o in targets)}")
    for label, after, before in (("reference (z̃ unrounded)", after_ref, before_ref),
                                 ("compressx (z̃ rounded)", after_ro, before_ours)):  # fmt: skip
        top1 = (after[True].argmax(1) == before[True].argmax(1)).float().mean().item()
        moved = values_moved(stage1, unrounded if label.startswith("reference") else rounded, test[:32], bits)
        print(
            f"- {label}: the fold changes the FP logits by {max_diff(after[False], before[False]):.2g} and the "
            f"A{bits} logits by {max_diff(after[True], before[True]):.3g} (top-1 kept on {100 * top1:.1f}% of the "
            f"images); quantized post-LN values moved: {100 * sum(moved) / len(moved):.1f}% on average"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of zysxmu/IaS-ViT")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    args = parser.parse_args()
    sys.path.insert(0, str(args.official))
    for bits in args.bits:
        compare(args.official, bits)


if __name__ == "__main__":
    main()
