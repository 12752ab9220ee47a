"""sd_digits: a tiny Stable Diffusion pipeline trained here on the digits, native 16x16 px, prompts "digit N".

A real ``diffusers.StableDiffusionPipeline`` whose parts are all built and trained in a few minutes on CPU:

* images: the 1797 8x8 digits of ``sklearn.datasets.load_digits``, bilinearly upsampled to 16x16, grey (1 channel),
  in [-1, 1];
* ``vae``: an ``AutoencoderKL`` (1 → 4 latent channels, factor 2, so the latent is 4x8x8), trained for
  reconstruction with a small KL term; ``scaling_factor`` set to 1 / std of the training latents;
* ``text_encoder``: a 1-layer ``CLIPTextModel`` with random, frozen weights: a fixed map from a prompt to
  embeddings (the UNet learns to read it), with a ``CLIPTokenizer`` over a 20-token vocabulary ("digit", 0-9);
* ``unet``: a ``UNet2DConditionModel`` (sample_size 8, two levels, cross-attention on the prompt) trained with
  the epsilon objective (DDPM, 1000 steps, SD's scaled-linear betas); the prompt is dropped 10% of the time so
  classifier-free guidance works;
* ``scheduler``: ``EulerDiscreteScheduler`` with the training betas.

Beside the pipeline the build saves ``digit_classifier.safetensors``: a small CNN trained on the same 16x16
digits (``load_classifier``), used to score generated images (``compressx.zoo.sd_digits.digit_scores``).
Everything is seeded; the build is deterministic on one machine.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.threads import tiny_model_threads

log = logging.getLogger(__name__)

NAME = "sd_digits"
BUILDER_VERSION = 2  # 2: built with a fixed torch thread count (compressx.threads)
NATIVE_PX = 16
PROMPTS = [f"digit {d}" for d in range(10)]
CLASSIFIER_FILE = "digit_classifier.safetensors"
_SEED = 0


def cache_salt() -> str:
    return "digits1797"


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``[1797, 1, 16, 16]`` floats in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(NATIVE_PX, NATIVE_PX), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(digits.target)


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 grey digits in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in ["d", "i", "g", "t", "di", "dig", "digi", "t</w>", "digit</w>", *[f"{d}</w>" for d in range(10)]]:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nd i\ndi g\ndig i\ndigi t</w>\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=8, pad_token="<|endoftext|>"
    )


def _components() -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=NATIVE_PX,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=NATIVE_PX // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def _betas() -> dict[str, Any]:
    return {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


class DigitsBuild:
    """What ``train`` returns: the pipeline and the classifier, saved together by ``save_pretrained``."""

    def __init__(self, pipe: Any, classifier: DigitClassifier) -> None:
        self.pipe, self.classifier = pipe, classifier

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        self.pipe.save_pretrained(directory, safe_serialization=True)
        save_model(self.classifier, str(Path(directory) / CLASSIFIER_FILE))


def _train_vae(vae, images: torch.Tensor, steps: int, bar) -> None:
    g = torch.Generator().manual_seed(_SEED + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae.train()
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (64,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    vae.eval()


def _train_unet(unet, latents, labels, prompt_embeds, steps: int, bar) -> float:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**_betas())
    g = torch.Generator().manual_seed(_SEED + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = max(steps // 20, 1)
    lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    unet.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (64,), generator=g)
        x0 = latents[idx]
        cond = labels[idx].clone()
        cond[torch.rand(len(idx), generator=g) < 0.1] = 10  # the empty prompt: CFG's unconditional branch
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=prompt_embeds[cond]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        bar.update(1)
    unet.eval()
    return float(loss)


def _train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[DigitClassifier, float]:
    g = torch.Generator().manual_seed(_SEED + 3)
    order = torch.randperm(len(images), generator=g)
    train, val = order[:1500], order[1500:]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=g)]
        x = images[idx]
        # Small shifts and scale changes, so generated digits slightly off the training grid are still read.
        theta = torch.eye(2, 3).repeat(len(idx), 1, 1)
        theta[:, :, :2] *= 1 + 0.15 * (torch.rand(len(idx), 1, 1, generator=g) - 0.5)
        theta[:, :, 2] = 0.15 * (torch.rand(len(idx), 2, generator=g) - 0.5)
        x = F.grid_sample(
            x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False, padding_mode="border"
        )
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[val]).argmax(1) == labels[val]).float().mean())
    return model, accuracy


@tiny_model_threads()
def train(progress: bool = True, vae_steps: int = 400, unet_steps: int = 1500, classifier_steps: int = 400):
    """Build and train the pipeline and the classifier; returns (``DigitsBuild``, build info)."""
    with torch.random.fork_rng(devices=[]):  # seeded build; the caller's RNG is left alone
        torch.manual_seed(_SEED)
        return _train(progress, vae_steps, unet_steps, classifier_steps)


def _train(progress: bool, vae_steps: int, unet_steps: int, classifier_steps: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    start = time.perf_counter()
    images, labels = digit_images()
    parts = _components()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
    parts["text_encoder"].eval().requires_grad_(False)
    bar = tqdm(total=vae_steps + unet_steps, desc="building sd_digits", disable=not progress)
    _train_vae(parts["vae"], images, vae_steps, bar)
    with torch.no_grad():
        raw = parts["vae"].encode(images).latent_dist.mode()
        recon_mse = float(F.mse_loss(parts["vae"].decode(raw).sample, images))
        scaling = float(1.0 / raw.std())
        parts["vae"].register_to_config(scaling_factor=scaling)
        ids = tokenizer([*PROMPTS, ""], padding="max_length", max_length=8, return_tensors="pt").input_ids
        prompt_embeds = parts["text_encoder"](ids)[0]
    loss = _train_unet(parts["unet"], raw * scaling, labels, prompt_embeds, unet_steps, bar)
    bar.close()
    classifier, accuracy = _train_classifier(images, labels, classifier_steps)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler(**_betas(), steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    info = {
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "vae_recon_mse": round(recon_mse, 5),
        "vae_scaling_factor": round(scaling, 5),
        "unet_final_loss": round(loss, 5),
        "classifier_val_accuracy": round(accuracy, 4),
    }
    log.info("sd_digits: %s", info)
    return DigitsBuild(pipe, classifier), info


def build_empty() -> dict[str, Any]:
    """What validation sees: the pipeline's class (a pipeline is not one torch module; no weights built)."""
    return {"_class_name": "StableDiffusionPipeline", "zoo": NAME}


def load(directory: str) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        directory, safety_checker=None, feature_extractor=None, use_safetensors=True
    )
    pipe.set_progress_bar_config(leave=False)
    return pipe


def load_classifier(directory: str | Path) -> DigitClassifier:
    from safetensors.torch import load_model

    model = DigitClassifier()
    load_model(model, str(Path(directory) / CLASSIFIER_FILE))
    return model.eval()


@torch.no_grad()
def digit_scores(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean probability of the prompted digit for images ``[B, 1, H, W]`` in [0, 1] of any size.

    Each image is area-resized to the native 16x16 first: the score asks whether the whole picture is one
    well-formed digit of the prompted class (repeated or broken digits score low).
    """
    x = F.interpolate(images * 2 - 1, size=(NATIVE_PX, NATIVE_PX), mode="area")
    probs = classifier(x).softmax(dim=1)
    return {
        "accuracy": float((probs.argmax(1) == labels).float().mean()),
        "confidence": float(probs.gather(1, labels.view(-1, 1)).mean()),
    }


@torch.no_grad()
def digit_features(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's pooled last conv features (32 per image) of images ``[B, 1, H, W]`` in [0, 1], resized."""
    x = F.interpolate(images * 2 - 1, size=(NATIVE_PX, NATIVE_PX), mode="area")
    return classifier.features(x).mean(dim=(2, 3)).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``[n, d]`` (the FID formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + (cov_a + cov_b - 2 * root).trace())
