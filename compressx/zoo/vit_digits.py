"""``vit_digits``: a DeiT-tiny-shaped timm ViT (4 blocks, width 96, 3 heads) on noisy digits, the ViT PTQ proxy.

A timm ``VisionTransformer`` (class token, learned position embeddings, pre-LN blocks with GELU MLPs of ratio 4,
3 heads as DeiT-tiny; width 96 and 4 blocks to train on a CPU) behind a bilinear 3x upsampling of scikit-learn's
8x8 digits to 24x24: patch 4 gives 36 patch tokens + the class token (37 tokens). The digits carry Gaussian
noise of std 0.2 (fixed per image, ``compressx.images``), and training is short (20 epochs of AdamW, batch 16),
so the task is not saturated and low-bit quantization visibly costs accuracy.

``model: {source: zoo, id: vit_digits}`` — trained here on the digits training split (about 70 s of one CPU
thread, cached); calibrate on ``{source: digits, split: train, noise: 0.2}`` and evaluate top-1 on
``{source: digits, split: test, noise: 0.2}``. ``pretrained: false`` gives the architecture freshly initialised.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressx.threads import tiny_model_threads

NAME = "vit_digits"
# Bump when anything below changes the trained weights: it is part of the cache key.
BUILDER_VERSION = 2
NOISE = 0.2
UPSAMPLE = 3
TRAINING = {
    "data": {"source": "digits", "split": "train", "noise": NOISE},
    "epochs": 20,
    "batch_size": 16,
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "seed": 0,
}


class ViTDigits(nn.Module):
    """Upsample 8x8 → 24x24, normalise to about [-1, 1], then a timm ``VisionTransformer`` (``self.vit``)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(
            img_size=8 * UPSAMPLE,
            patch_size=4,
            in_chans=1,
            num_classes=num_classes,
            embed_dim=96,
            depth=4,
            num_heads=3,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)
        return self.vit((x - 0.5) / 0.5)

    def get_classifier(self) -> nn.Module:
        return self.vit.head


def build_empty() -> ViTDigits:
    """The architecture, initialised from the global RNG (seed it first for a reproducible init)."""
    return ViTDigits()


@tiny_model_threads()
def train(progress: bool = True) -> tuple[ViTDigits, dict[str, Any]]:
    """Train the model on the noisy digits training split, deterministically."""
    from compressx.builtin_trainer import parse_train_spec
    from compressx.builtin_trainer import train as run_training
    from compressx.images import parse_image_data_spec, top1

    spec = parse_train_spec(TRAINING)
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = build_empty()
        run_training(model, spec, progress=progress)
    model.eval()
    test = parse_image_data_spec({"source": "digits", "split": "test", "noise": NOISE})
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "training": TRAINING,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_top1": round(top1(model, test), 3),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info


def cache_salt() -> str:
    """Part of the cache key: the digits ship with scikit-learn, the architecture comes from timm."""
    import sklearn
    import timm

    return f"sklearn{sklearn.__version__}-timm{timm.__version__}"


def save(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(Path(directory) / "model.safetensors"))


def load(directory: str) -> ViTDigits:
    from safetensors.torch import load_model

    with torch.random.fork_rng():  # the init is overwritten: leave the caller's RNG alone
        model = build_empty()
    load_model(model, str(Path(directory) / "model.safetensors"))
    return model.eval()
