"""Shared fixtures: tiny real architectures built from small configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from compressx.pipelines import original_class


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class TinyCNN(nn.Module):
    """A plain torch module with Conv and Linear layers (the 'plain module' export path)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def one_thread():
    """One torch thread: tiny training steps are ~100x slower with two OpenMP threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_hf_llama(directory, tokenizer, layers: int = 2):
    """A local transformers checkpoint in ``directory``: a tiny Llama (seed 0) and ``tokenizer``."""
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> str:
    """A cache directory shared by the tests that need a built zoo model (built once per session).

    Set COMPRESSX_TEST_CACHE to reuse a cache across runs while developing.
    """
    import os

    return os.environ.get("COMPRESSX_TEST_CACHE") or str(tmp_path_factory.mktemp("compressx-cache"))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here on stdlib text (no download), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compressx.data import stdlib_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text("val")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


IMAGE_TOKEN = 100


def _cache_kwarg() -> str:
    """The name the installed transformers takes a KV cache under: ``cache`` from 5.24, ``past_key_values`` before
    (5.24 still accepts ``past_key_values`` with a FutureWarning)."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg()


def make_tiny_llava(next_: bool = False, attn: str = "eager", seed: int = 0, layers: int = 4, decoder: str = "llama"):
    """A tiny LLaVA-1.5 (8x8 images → 16 vision tokens) or LLaVA-NeXT (any-res: 8x16 / 16x16 grids) with a GQA
    decoder (``llama``, ``mistral`` without sliding window, or ``qwen2``); image token id 100, pad id 0."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
        Qwen2Config,
    )

    text_config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[decoder]
    text = text_config_class(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    if decoder == "mistral":
        text.sliding_window = None
    vision = CLIPVisionConfig(
        image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    common = dict(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, image_seq_length=16)
    if next_:
        config = LlavaNextConfig(**common, vision_feature_layer=-1, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]])
        cls = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**common, vision_feature_layer=-1)
        cls = LlavaForConditionalGeneration
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture
def tiny_llava() -> nn.Module:
    return make_tiny_llava()


def make_tiny_sd_pipeline(xl: bool = False, seed: int = 0, scheduler: str = "euler"):
    """A StableDiffusion(XL)Pipeline from tiny configs: native 16 px (latent 8, VAE factor 2), no text encoder
    (pass prompt embeddings of width 16; SDXL also pooled embeddings of width 16)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
        **(
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 4,
                "projection_class_embeddings_input_dim": 40,
            }
            if xl
            else {}
        ),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    sched = (
        EulerDiscreteScheduler(**betas, steps_offset=1)
        if scheduler == "euler"
        else DDIMScheduler(**betas, clip_sample=False, steps_offset=1)
    )
    if xl:
        pipe = StableDiffusionXLPipeline(vae, None, None, None, None, unet, sched)
    else:
        pipe = StableDiffusionPipeline(vae, None, None, unet, sched, None, None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(xl: bool, batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random prompt embeddings (and pooled ones for SDXL) for ``make_tiny_sd_pipeline``."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "prompt_embeds": torch.randn(batch, 5, 16, generator=g),
        "negative_prompt_embeds": torch.randn(batch, 5, 16, generator=g),
    }
    if xl:
        out["pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return out


def plain(pipe, height, width, xl=False, seed=0, steps=6, **kw):
    """The unpatched pipeline's latents at (height, width), from prompt embeddings (``embeds``)."""
    base = original_class(pipe)
    gen = torch.Generator().manual_seed(seed)
    args = dict(height=height, width=width, num_inference_steps=steps, generator=gen, output_type="latent")
    return base.__call__(pipe, **embeds(xl), **args, **kw).images


def pointwise_unet(pipe):
    """Replace the UNet's forward by an element-wise function of (x, t, prompt): no spatial mixing."""

    def forward(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True, **kw):
        alpha = 0.3 + 0.2 * torch.cos(timestep.float() / 300)
        beta = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            beta = beta + added_cond_kwargs["text_embeds"].mean(dim=1).view(-1, 1, 1, 1)
        return (alpha * sample + beta + 0.1 * sample**2,)

    pipe.unet.forward = forward


# --- tiny vision transformers for the ViT quantization passes -----------------------------------------------

VIT_PTQ_PASSES = {
    "ptq_minmax": {},
    "repq_vit": {},
    "isvit": {"preset": "fast", "iterations": 3, "calibration_images": 32, "batch_size": 16},
}


def tiny_timm_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2
    ).eval()


def tiny_timm_swin(seed=0):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer(
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
        window_size=4,
    ).eval()  # fmt: skip


def tiny_hf_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


def tiny_hf_deit(seed=0):
    from transformers import DeiTConfig, DeiTForImageClassification

    config = DeiTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(seed)
    return DeiTForImageClassification(config).eval()


def logits(model, images):
    out = model(images)
    return getattr(out, "logits", out)


def randomise_layernorms(model, generator):
    """Non-trivial LayerNorm affines, so that per-channel post-LN ranges differ (fresh inits have gamma = 1)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 3 + 0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))


def with_random_experts(model):
    """Fused expert parameters drawn from N(0, 0.05): transformers leaves them at a zero-variance init in some
    versions, and pruning needs distinct magnitudes."""
    from compressx.targets import FusedExperts

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FusedExperts):
                for param in module.parameters(recurse=False):
                    param.normal_(0, 0.05)
    return model
