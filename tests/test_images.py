"""compressx.images: the image data blocks (digits, image_folder), their loaders and the top1 metric."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from compressx.errors import CompressxError, ConfigError
from compressx.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataSpec,
    digits_tensors,
    image_dataset,
    loader,
    parse_image_data_spec,
    top1,
)


def digits(**kwargs):
    return digits_tensors(parse_image_data_spec({"source": "digits", **kwargs}))


@pytest.mark.parametrize(
    "block, path, fragments",
    [
        ({"source": "digitz"}, "source", ["unknown image data source 'digitz'", "digits, image_folder", "'digits'?"]),
        (
            {"source": "digits", "nosie": 0.1},
            "nosie",
            ["unknown key 'nosie'", "did you mean 'noise'?", "train_images"],
        ),
        ({"source": "digits", "path": "/x"}, "path", ["unknown key 'path'"]),  # a key of image_folder only
        ({"source": "image_folder", "path": "/x", "noise": 0.1}, "noise", ["unknown key 'noise'", "image_size"]),
        ({"source": "digits", "split": "val"}, "split", ["'val'", "allowed: train, test"]),
        ({"source": "digits", "noise": -0.1}, "noise", ["expected a number >= 0"]),
        ({"source": "digits", "noise": True}, "noise", ["expected a number >= 0"]),
        ({"source": "digits", "noise": "0.1"}, "noise", ["expected a number >= 0"]),
        ({"source": "digits", "train_images": 5}, "train_images", ["1257 images (10 at least)"]),
        ({"source": "digits", "train_images": 2000}, "train_images", ["1257 images"]),
        ({"source": "digits", "train_images": 100.0}, "train_images", ["expected a positive integer"]),
        ({"source": "digits", "train_images": True}, "train_images", ["expected a positive integer"]),
        ({"source": "digits", "seed": 1.5}, "seed", ["expected an integer"]),
        ({"source": "image_folder"}, "path", ["image_folder needs 'path'"]),
        ({"source": "image_folder", "path": "/x", "image_size": 4}, "image_size", ["expected an integer >= 8"]),
        ({"source": "image_folder", "path": "/x", "image_size": "224"}, "image_size", ["expected an integer >= 8"]),
        ({"source": "image_folder", "path": "/x", "split": ""}, "split", ["expected a split directory name"]),
    ],
)
def test_parse_errors_name_the_key_and_what_is_allowed(block, path, fragments):
    with pytest.raises(ConfigError) as info:
        parse_image_data_spec(block)
    assert info.value.path == path
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_parse_rejects_a_non_mapping_and_fills_defaults():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_image_data_spec("digits")
    spec = parse_image_data_spec({"source": "digits"})
    assert spec == ImageDataSpec("digits", "train", None, 0.0, 0, None, 224)
    assert spec.to_dict() == {"source": "digits", "split": "train", "noise": 0.0, "seed": 0}
    assert parse_image_data_spec(spec.to_dict()) == spec
    folder = parse_image_data_spec({"source": "image_folder", "path": "/d", "split": "val", "image_size": 32})
    assert folder.to_dict() == {"source": "image_folder", "split": "val", "path": "/d", "image_size": 32}
    assert folder.label == "image_folder/val"


def test_digits_split_sizes_are_fixed_and_stratified():
    train_x, train_y = digits(split="train")
    test_x, test_y = digits(split="test")
    assert train_x.shape == (1257, 1, 8, 8) and test_x.shape == (540, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train_x.min()) >= 0.0 and float(train_x.max()) <= 1.0 and float(train_x.max()) == 1.0
    train_counts, test_counts = torch.bincount(train_y, minlength=10), torch.bincount(test_y, minlength=10)
    total = train_counts + test_counts
    assert torch.all((test_counts.float() - 0.3 * total.float()).abs() <= 1), test_counts  # stratified
    # Disjoint: no test image (with its label) appears among the training images.
    train_rows = {(tuple(x.flatten().tolist()), int(y)) for x, y in zip(train_x, train_y)}
    overlap = sum((tuple(x.flatten().tolist()), int(y)) in train_rows for x, y in zip(test_x, test_y))
    assert overlap < 5  # the digits set holds a few exact duplicate images; a shared split would give ~540
    # The same split in every call (no hidden RNG).
    again_x, again_y = digits(split="test", seed=7)
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)


def test_train_images_subset_is_stratified_deterministic_and_seeded():
    full_x, full_y = digits()
    x, y = digits(train_images=100)
    assert x.shape == (100, 1, 8, 8)
    assert torch.bincount(y, minlength=10).min() >= 9 and torch.bincount(y, minlength=10).max() <= 11
    rows = {tuple(r.flatten().tolist()) for r in full_x}
    assert all(tuple(r.flatten().tolist()) in rows for r in x)  # a subset of the training part
    x2, y2 = digits(train_images=100)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = digits(train_images=100, seed=1)
    assert not torch.equal(x, x3)
    # The test split is always the fixed 540 images: train_images there is an error, not silently ignored.
    with pytest.raises(ConfigError, match="train_images subsets the train split only"):
        digits(split="test", train_images=100)


def test_noise_is_deterministic_per_seed_and_split():
    clean_train, _ = digits()
    clean_test, _ = digits(split="test")
    noisy, _ = digits(noise=0.25)
    assert torch.equal(noisy, digits(noise=0.25)[0])
    delta = noisy - clean_train
    assert delta.std().item() == pytest.approx(0.25, rel=0.05) and abs(delta.mean().item()) < 0.01
    assert not torch.equal(noisy, digits(noise=0.25, seed=1)[0])
    test_noisy, _ = digits(split="test", noise=0.25)
    assert torch.equal(test_noisy, digits(split="test", noise=0.25)[0])
    test_delta = test_noisy - clean_test
    assert not torch.allclose(test_delta, delta[: len(test_delta)])  # train and test draw different noise
    # The test tensors do not depend on the training subset's seed-free settings: same (seed, split), same noise.
    assert torch.equal(test_noisy, digits(split="test", noise=0.25)[0])
    # Scaling: noise 0.5 is twice the noise 0.25 draw.
    assert torch.allclose(digits(noise=0.5)[0] - clean_train, 2 * delta, atol=1e-6)


def _write_folder(root, size=(40, 30)):
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = Image.new("RGB", size, colour)
                pixels.putpixel((i, i), (0, 255, 0))  # make the images distinct
                if split == "train":  # a gradient, so that crops and flips differ
                    for x in range(size[0]):
                        for y in range(size[1]):
                            pixels.putpixel((x, y), (6 * x, 8 * y, 0))
                pixels.save(folder / f"{i}.png")


def test_image_folder_transforms(tmp_path):
    _write_folder(tmp_path)
    spec = parse_image_data_spec({"source": "image_folder", "path": str(tmp_path), "split": "val", "image_size": 16})
    val = image_dataset(spec)
    assert len(val) == 6 and val.classes == ["cat", "dog"]
    image, label = val[0]
    assert image.shape == (3, 16, 16) and label == 0
    # Deterministic: resize + centre crop, then the ImageNet normalisation of a pure red image.
    assert torch.equal(image, val[0][0])
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    centre = image[:, 8, 8]
    assert torch.allclose(centre, red, atol=1e-5)
    assert val[3][1] == 1 and torch.allclose(
        val[3][0][:, 8, 8], (torch.tensor([0.0, 0.0, 1.0]) - mean) / std, atol=1e-5
    )

    train = image_dataset(dataclasses.replace(spec, split="train"))
    assert len(train) == 6 and train[0][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random-resized crop + flip

    batch_images, batch_labels = next(iter(loader(spec, batch_size=6, shuffle=False)))
    assert batch_images.shape == (6, 3, 16, 16) and batch_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_missing_split_directory(tmp_path):
    spec = parse_image_data_spec({"source": "image_folder", "path": str(tmp_path), "split": "val"})
    with pytest.raises(CompressxError, match="is not a directory"):
        image_dataset(spec)


class RuleModel(nn.Module):
    """Predicts class (number of bright pixels in the top row) % 10, as one-hot logits (optionally in .logits)."""

    def __init__(self, wrap: bool = False) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.wrap = wrap
        self.batches = []

    def forward(self, images):
        self.batches.append(len(images))
        assert not self.training
        guess = (images[:, 0, 0, :] > 0.5).sum(dim=1) % 10
        logits = nn.functional.one_hot(guess, 10).float() + self.anchor
        if self.wrap:
            return type("Output", (), {"logits": logits})()
        return logits


@pytest.mark.parametrize("wrap", [False, True])
def test_top1_is_the_percentage_of_correct_predictions(wrap):
    spec = parse_image_data_spec({"source": "digits", "split": "test"})
    images, labels = digits_tensors(spec)
    expected = 100.0 * float(((images[:, 0, 0, :] > 0.5).sum(dim=1) % 10 == labels).float().mean())
    assert 5 < expected < 50  # the rule is right sometimes, not always
    model = RuleModel(wrap).train()
    assert top1(model, spec, batch_size=64) == pytest.approx(expected)
    assert model.training  # the mode is restored
    assert model.batches == [64] * 8 + [28]  # 540 images, the last batch partial
