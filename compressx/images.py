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
from typing import Any

import torch

from compressx.config import check_seed
from compressx.errors import CompressxError, ConfigError, unknown_key_message, unknown_name_message

IMAGE_SOURCES = ("digits", "image_folder")
_KEYS = {
    "digits": {"source", "split", "train_images", "noise", "seed"},
    "image_folder": {"source", "split", "path", "image_size", "augment"},
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ImageDataSpec:
    """An image dataset block."""

    source: str
    split: str = "train"
    train_images: int | None = None
    noise: float = 0.0
    seed: int = 0
    path: str | None = None
    image_size: int = 224
    augment: bool | None = None  # image_folder: random-resized crop + flip; default: for the train split only

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k in _KEYS[self.source] and v is not None}
        return out

    @property
    def label(self) -> str:
        return f"{self.source}/{self.split}"


def parse_image_data_spec(block: Any) -> ImageDataSpec:
    if not isinstance(block, dict):
        raise ConfigError(f"expected a mapping like {{source: digits, split: train}}, got {block!r}")
    source = block.get("source")
    if source not in IMAGE_SOURCES:
        raise ConfigError(unknown_name_message("image data source", str(source), IMAGE_SOURCES), path="source")
    for key in block:
        if key not in _KEYS[source]:
            raise ConfigError(unknown_key_message(str(key), _KEYS[source]), path=str(key))
    split = block.get("split", "train")
    if source == "digits" and split not in ("train", "test"):
        raise ConfigError(f"got {split!r}; allowed: train, test", path="split")
    if not isinstance(split, str) or not split:
        raise ConfigError(f"got {split!r}; expected a split directory name", path="split")
    train_images = block.get("train_images")
    if train_images is not None and (isinstance(train_images, bool) or not isinstance(train_images, int)):
        raise ConfigError(f"got {train_images!r}; expected a positive integer", path="train_images")
    if train_images is not None and split != "train":
        raise ConfigError("train_images subsets the train split only; the test split is used whole", "train_images")
    if train_images is not None and not 10 <= train_images <= 1257:
        raise ConfigError(
            f"got {train_images}; the digits training part has 1257 images (10 at least)", "train_images"
        )
    noise = block.get("noise", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or noise < 0:
        raise ConfigError(f"got {noise!r}; expected a number >= 0", path="noise")
    seed = check_seed(block.get("seed", 0))
    if source == "image_folder" and not isinstance(block.get("path"), str):
        raise ConfigError("image_folder needs 'path': the dataset root holding one directory per split", "path")
    image_size = block.get("image_size", 224)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"got {image_size!r}; expected an integer >= 8", path="image_size")
    augment = block.get("augment")
    if augment is not None and not isinstance(augment, bool):
        raise ConfigError(f"got {augment!r}; expected true or false", path="augment")
    return ImageDataSpec(source, split, train_images, float(noise), seed, block.get("path"), image_size, augment)


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
