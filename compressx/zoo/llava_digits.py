"""``llava_digits``: a tiny LLaVA (CLIP vision tower + Llama decoder) trained on visual questions about digits.

A real ``transformers.LlavaForConditionalGeneration``: a 2-layer CLIP vision tower on scikit-learn's 8x8 digit
images (patch 2: 16 vision tokens per image), a 2-layer MLP projector and a 6-layer Llama decoder (hidden 64,
GQA 4/2 heads), trained from a fixed seed on four question kinds with a word-level vocabulary:

* one image: ``which digit is it ?`` → ``0`` … ``9``; ``is it even ?`` → ``yes`` / ``no``;
* two images: ``is the first larger ?`` and ``are they equal ?`` → ``yes`` / ``no``.

A prompt reads ``<bos> user : <image>×16 [and <image>×16] <question> assistant :`` and the answer is the next
token. The images are split by a seeded permutation into train (70%), val (10%, calibration) and test (20%).
It stands in for LLaVA-1.5 where no weights can be downloaded: vision tokens are most of the prompt, and the
answer needs them, so withdrawing them too early costs accuracy.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.threads import tiny_model_threads

NAME = "llava_digits"
BUILDER_VERSION = 2  # 2: built with a fixed torch thread count (compressx.threads)
N_VIS = 16
TRAINING = {"seed": 0, "vision_steps": 200, "steps": 600, "batch": 64, "lr": 3e-3, "warmup": 60, "weight_decay": 0.05}
WORDS = (
    *("<pad>", "<bos>", "<image>", "user", ":", "assistant", "and", "which", "digit", "is", "it", "?", "even"),
    *("the", "first", "larger", "are", "they", "equal", "yes", "no"),
    *(str(d) for d in range(10)),
)
TASKS = ("which", "even", "larger", "equal")
QUESTIONS = {
    "which": "which digit is it ?",
    "even": "is it even ?",
    "larger": "is the first larger ?",
    "equal": "are they equal ?",
}
SPLIT_FRACTIONS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}


class WordTokenizer:
    """Whitespace-separated words of ``WORDS`` as token ids (the zoo LLaVA's tokenizer)."""

    name = "llava_digits_words"
    vocab = WORDS
    pad_token_id, bos_token_id, image_token_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [WORDS.index(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(WORDS[i] for i in ids)

    def as_transformers(self) -> Any:
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (saved as ``tokenizer.json`` in an
        export, so ``AutoTokenizer`` loads it): whitespace-separated words, id = index in ``WORDS``."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(WORDS)}))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=WORDS[self.pad_token_id])


def config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    vision = CLIPVisionConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=WordTokenizer.image_token_id,
        image_seq_length=N_VIS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_empty() -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(config())


def load(directory: str) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory, use_safetensors=True).eval()


def cache_salt() -> str:
    return "sklearn-digits"


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``[n, 1, 8, 8]`` (scaled to [-1, 1]) and labels of a split (fixed seeded permutation)."""
    from sklearn.datasets import load_digits

    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLIT_FRACTIONS)}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    lo, hi = SPLIT_FRACTIONS[split]
    chosen = order[int(lo * len(order)) : int(hi * len(order))]
    return images[chosen], labels[chosen]


def prompt_ids(task: str) -> list[int]:
    tok = WordTokenizer()
    images = " <image>" * N_VIS + ((" and" + " <image>" * N_VIS) if task in ("larger", "equal") else "")
    return tok.encode(f"<bos> user :{images} {QUESTIONS[task]} assistant :")


def answer_id(task: str, first: int, second: int) -> int:
    tok = WordTokenizer()
    if task == "which":
        return tok.encode(str(first))[0]
    truth = {"even": first % 2 == 0, "larger": first > second, "equal": first == second}[task]
    return tok.encode("yes" if truth else "no")[0]


def make_batch(task: str, images: torch.Tensor, labels: torch.Tensor, picks: torch.Tensor) -> dict[str, Any]:
    """One task's prompts for image indices ``picks`` ``[b]`` or ``[b, 2]``: model inputs plus ``answers``."""
    picks = picks.view(len(picks), -1)
    ids = torch.tensor(prompt_ids(task)).expand(len(picks), -1).clone()
    two = task in ("larger", "equal")
    chosen = picks[:, :2] if two else picks[:, :1]
    pixel_values = images[chosen.reshape(-1)]
    first = labels[chosen[:, 0]]
    second = labels[chosen[:, -1]]
    answers = torch.tensor([answer_id(task, int(a), int(b)) for a, b in zip(first, second, strict=True)])
    return {"input_ids": ids, "pixel_values": pixel_values, "answers": answers}


def sample_picks(task: str, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Image indices for ``n`` questions; for ``equal``, half the pairs show the same digit (balanced yes/no)."""
    first = torch.randint(0, len(labels), (n,), generator=gen)
    if task not in ("larger", "equal"):
        return first
    second = torch.randint(0, len(labels), (n,), generator=gen)
    if task == "equal":
        by_digit = [torch.nonzero(labels == d).squeeze(1) for d in range(10)]
        same = torch.rand(n, generator=gen) < 0.5
        for i in torch.nonzero(same).squeeze(1).tolist():
            pool = by_digit[int(labels[first[i]])]
            second[i] = pool[torch.randint(0, len(pool), (1,), generator=gen)]
    return torch.stack([first, second], dim=1)


def vqa_batches(split: str, per_task: int, seed: int, batch_size: int = 64) -> list[dict[str, Any]]:
    """Question batches of a split: ``per_task`` questions of each task, in batches of one task each."""
    images, labels = digits(split)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for task in TASKS:
        picks = sample_picks(task, labels, per_task, gen)
        for start in range(0, per_task, batch_size):
            batches.append(make_batch(task, images, labels, picks[start : start + batch_size]))
    return batches


def calibration_prompts(split: str, samples: int, seed: int) -> list[dict[str, Any]]:
    """``samples`` single prompts (model inputs, no answers), the four question kinds in turn."""
    per_task = -(-samples // len(TASKS))
    by_task = [vqa_batches(split, per_task, seed + i, batch_size=1)[i * per_task : (i + 1) * per_task]
               for i in range(len(TASKS))]  # fmt: skip
    prompts = [by_task[i % len(TASKS)][i // len(TASKS)] for i in range(samples)]
    return [{"input_ids": p["input_ids"], "pixel_values": p["pixel_values"]} for p in prompts]


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[dict[str, Any]]) -> float:
    """Fraction of questions whose greedy next token is the answer."""
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), pixel_values=batch["pixel_values"].to(device)).logits
        right += int((logits[:, -1].argmax(-1).cpu() == batch["answers"]).sum())
        total += len(batch["answers"])
    return right / total


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def _pretrain_vision(
    model: Any, images: torch.Tensor, labels: torch.Tensor, hp: dict[str, Any], progress: bool = False, desc: str = ""
) -> None:
    """Stage 1: the vision tower alone learns the digits through a linear probe on its mean patch feature (LLaVA
    starts from a pretrained CLIP the same way)."""
    tower = model.model.vision_tower
    probe = torch.nn.Linear(tower.config.hidden_size, 10)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=hp["lr"], weight_decay=0.05)
    gen = torch.Generator().manual_seed(hp["seed"] + 1)
    for _ in tqdm(range(hp["vision_steps"]), desc=desc, disable=not progress, unit="step"):
        picks = torch.randint(0, len(labels), (128,), generator=gen)
        features = tower(pixel_values=images[picks]).last_hidden_state[:, 1:].mean(1)
        F.cross_entropy(probe(features), labels[picks]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@tiny_model_threads()
def train(
    steps: int | None = None, progress: bool = True, vision_steps: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Train from scratch, deterministically: the vision tower first, then the projector and decoder with the
    tower frozen, one question kind per step in turn. ``steps`` / ``vision_steps`` override the defaults (tests)."""
    hp = dict(TRAINING, steps=steps if steps is not None else TRAINING["steps"])
    if vision_steps is not None:
        hp["vision_steps"] = vision_steps
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state is left alone
        torch.manual_seed(hp["seed"])
        return _train(hp, progress)


def _train(hp: dict[str, Any], progress: bool) -> tuple[Any, dict[str, Any]]:
    images, labels = digits("train")
    start = time.perf_counter()
    model = build_empty()
    model.train()
    _pretrain_vision(model, images, labels, hp)
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp["lr"], weight_decay=hp["weight_decay"])
    gen = torch.Generator().manual_seed(hp["seed"])
    bar = tqdm(range(hp["steps"]), desc=f"building zoo model {NAME}", disable=not progress, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, hp["steps"], hp["lr"], hp["warmup"])
        task = TASKS[step % len(TASKS)]
        batch = make_batch(task, images, labels, sample_picks(task, labels, hp["batch"], gen))
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[:, -1]
        loss = F.cross_entropy(logits, batch["answers"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.requires_grad_(True)
    model.eval()
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "training": hp,
        "data": "sklearn digits (train split), four question kinds",
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_accuracy": round(accuracy(model, vqa_batches("val", 100, 1)), 4),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, info
