"""``resnet_digits``: a small ResNet (~76k parameters) for scikit-learn's 8x8 digits, the N:M training proxy.

A plain torch module: a 3x3 stem (1 → 16 channels) with BatchNorm, two residual basic blocks (16 → 32, stride 1;
32 → 64, stride 2; each with a 1x1 conv + BatchNorm shortcut), global average pooling and a Linear classifier.
Every conv but the stem has a number of input channels divisible by 16, so 2:4, 1:4 and 1:16 apply to all of
them; every 3x3 conv is followed by its BatchNorm, so SpRe gives each one an extra branch.

Two uses:
* ``model: {source: zoo, id: resnet_digits, pretrained: false}`` — the architecture with a fresh init (seeded by
  the recipe's ``train.seed``), for passes that train from scratch (LBC, SpRe, SR-STE);
* ``model: {source: zoo, id: resnet_digits}`` — trained dense here on the digits training split (30 epochs,
  about 20 s on 2 cores, cached), for prune-then-fine-tune baselines and dense reference numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressx.threads import tiny_model_threads

NAME = "resnet_digits"
# Bump when anything below changes the trained weights: it is part of the cache key.
BUILDER_VERSION = 2  # 2: built with a fixed torch thread count (compressx.threads)
TRAINING = {
    "data": {"source": "digits", "split": "train"},
    "epochs": 30,
    "batch_size": 64,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "cosine"},
    "seed": 0,
}


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNetDigits(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc


def build_empty() -> ResNetDigits:
    """The architecture, initialised from the global RNG (seed it first for a reproducible init)."""
    return ResNetDigits()


@tiny_model_threads()
def train(progress: bool = True) -> tuple[ResNetDigits, dict[str, Any]]:
    """Train the dense model on the digits training split, deterministically."""
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
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "training": TRAINING,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_top1": round(top1(model, parse_image_data_spec({"source": "digits", "split": "test"})), 3),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info


def cache_salt() -> str:
    """Part of the cache key: the digits data ship with scikit-learn, whose version is the salt."""
    import sklearn

    return f"sklearn{sklearn.__version__}"


def save(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(Path(directory) / "model.safetensors"))


def load(directory: str) -> ResNetDigits:
    from safetensors.torch import load_model

    with torch.random.fork_rng():  # the init is overwritten: leave the caller's RNG alone
        model = build_empty()
    load_model(model, str(Path(directory) / "model.safetensors"))
    return model.eval()
