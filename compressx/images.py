"""Image-classification data for training passes and the ``top1`` metric: ``{source: digits | image_folder, ...}``.

* ``digits`` — scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download). A fixed stratified split
  (30% test, seed 0, the same for every run) and, to make the task hard enough to separate N:M methods (see
  docs/results/nm_training.md), optional ``train_images`` (a stratified subset of the training part) and
  ``noise`` (Gaussian, std in units of the [0, 1] pixel range, drawn once per image from ``seed`` so the test set
  is fixed). Tensors ``[n, 1, 8, 8]`` in [0, 1] plus noise. Needs scikit-learn.
* ``image_folder`` — a torchvision ``ImageFolder`` directory (``path/<split>/<class>/*.jpg``, e.g. ImageNet's
  ``train`` / ``val``), with the standard ImageNet transforms: random-resized crop + flip for ``train``, resize to
  ``image_size / 0.875`` + centre crop for the other splits (``augment: true/false`` overrides: calibration images
  for post-training quantization are taken from ``train`` with ``augment: false``), then the ImageNet mean/std
  normalisation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch

from compressx.config import Block, option, seed_option
from compressx.errors import CompressxError, ConfigError

IMAGE_SOURCES = ("digits", "image_folder")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TRAIN_IMAGES = 1257  # the training part of the fixed digits split


@dataclasses.dataclass(frozen=True)
class ImageDataSpec(Block):
    """An image dataset block."""

    tag: ClassVar[str] = "source"
    shape: ClassVar[str] = "{source: digits, split: train}"

    source: str = option(choices=IMAGE_SOURCES, what="image data source")
    split: str = option("train", nonempty=True, expected="a split directory name")
    train_images: int | None = option(None, only=("digits",), expected="a positive integer")
    noise: float = option(0.0, only=("digits",), ge=0)
    seed: int = seed_option(only=("digits",))
    path: str | None = option(
        None,
        only=("image_folder",),
        needs=("image_folder",),
        doc="the dataset root holding one directory per split",
    )
    image_size: int = option(224, only=("image_folder",), ge=8)
    # image_folder: random-resized crop + flip; default: for the train split only
    augment: bool | None = option(None, only=("image_folder",))

    def __post_init__(self) -> None:
        if self.source == "digits" and self.split not in ("train", "test"):
            raise ConfigError(f"got {self.split!r}; allowed: train, test", path="split")
        if self.train_images is not None and self.split != "train":
            raise ConfigError(
                "train_images subsets the train split only; the test split is used whole", "train_images"
            )
        if self.train_images is not None and not 10 <= self.train_images <= DIGITS_TRAIN_IMAGES:
            raise ConfigError(
                f"got {self.train_images}; the digits training part has {DIGITS_TRAIN_IMAGES} images (10 at least)",
                "train_images",
            )

    @property
    def label(self) -> str:
        return f"{self.source}/{self.split}"


parse_image_data_spec = ImageDataSpec.from_dict  # the name callers know


def digits_tensors(spec: ImageDataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 1, 8, 8] float32, labels [n] int64)`` of the digits split a spec names."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise CompressxError("the digits data source needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    index = torch.arange(len(labels)).numpy()
    train_index, test_index = train_test_split(index, test_size=0.3, random_state=0, stratify=digits.target)
    if spec.split == "train" and spec.train_images is not None and spec.train_images < len(train_index):
        train_index, _ = train_test_split(
            train_index, train_size=spec.train_images, random_state=spec.seed, stratify=digits.target[train_index]
        )
    chosen = torch.as_tensor(train_index if spec.split == "train" else test_index)
    images, labels = images[chosen], labels[chosen]
    if spec.noise:
        # Noise drawn from (seed, split) for the chosen images in order: the same tensors in every run and process.
        generator = torch.Generator().manual_seed(spec.seed * 2 + (spec.split == "test"))
        images = images + spec.noise * torch.randn(images.shape, generator=generator)
    return images, labels


def image_dataset(spec: ImageDataSpec) -> torch.utils.data.Dataset:
    """The dataset a spec names (``(image, label)`` items)."""
    if spec.source == "digits":
        return torch.utils.data.TensorDataset(*digits_tensors(spec))
    from torchvision import datasets, transforms

    root = os.path.join(spec.path or "", spec.split)
    if not os.path.isdir(root):
        raise CompressxError(f"image_folder: {root} is not a directory (expected {spec.path}/<split>/<class>/...)")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if spec.augment if spec.augment is not None else spec.split == "train":
        steps = [transforms.RandomResizedCrop(spec.image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(spec.image_size / 0.875)), transforms.CenterCrop(spec.image_size)]
    return datasets.ImageFolder(root, transforms.Compose([*steps, transforms.ToTensor(), normalize]))


def loader(spec: ImageDataSpec, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over the dataset, shuffled when ``shuffle``.

    It has its own seeded generator either way: iterating a loader without one draws from the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    workers = 0 if spec.source == "digits" else min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        image_dataset(spec), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers
    )


@torch.no_grad()
def top1(model: torch.nn.Module, spec: ImageDataSpec, batch_size: int = 256, progress: bool = False) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on the dataset a spec names."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in tqdm(loader(spec, batch_size, False), desc="top1", disable=not progress, leave=False):
        logits = model(images.to(device))
        logits = getattr(logits, "logits", logits)
        correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)
