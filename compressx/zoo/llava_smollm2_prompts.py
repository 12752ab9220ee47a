"""The questions of ``llava_smollm2_digits`` (one chat-format question about a digit image, answered by one token),
apart from its builder: ``digits_vqa`` data and the ``vqa_accuracy`` metric read them without the zoo's cache
machinery (which imports the data module)."""

from __future__ import annotations

from typing import Any

import torch

from compressx.zoo import llava_digits

NAME = "llava_smollm2_digits"
N_VIS = llava_digits.N_VIS
IMAGE_TOKEN = "<empty_output>"  # an unused special token of SmolLM2's vocabulary, standing for <image>
QUESTION = "Which digit is this?"


def _image_token_id() -> int:
    # SmolLM2's tokenizer: id 16 is <empty_output> (checked against the tokenizer in tests/zoo)
    return 16


def prompt_ids(tokenizer: Any) -> list[int]:
    """``Which digit is this?`` after ``N_VIS`` image placeholders, as one user turn of SmolLM2's chat format (its
    template's ``<|im_start|>`` / ``<|im_end|>`` markers, without the default system prompt), then the assistant's
    turn: the answer is the next token."""
    text = f"<|im_start|>user\n{IMAGE_TOKEN * N_VIS}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if sum(i == _image_token_id() for i in ids) != N_VIS:
        raise ValueError(f"{NAME}: the tokenizer does not keep {N_VIS} image placeholders")
    return list(ids)


def answer_ids(tokenizer: Any) -> list[int]:
    """The token ids of the answers ``0`` … ``9`` (one token each in SmolLM2's vocabulary)."""
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{NAME}: the digits are not single tokens: {ids}")
    return [i[0] for i in ids]


def make_batch(tokenizer: Any, images: torch.Tensor, labels: torch.Tensor, picks: torch.Tensor) -> dict[str, Any]:
    """Questions about the images ``picks`` ``[b]``: model inputs plus ``answers`` (token ids)."""
    ids = torch.tensor(prompt_ids(tokenizer)).expand(len(picks), -1).clone()
    answers = torch.tensor(answer_ids(tokenizer))[labels[picks]]
    return {"input_ids": ids, "pixel_values": images[picks], "answers": answers}


def vqa_batches(tokenizer: Any, split: str, questions: int, seed: int, batch_size: int = 50) -> list[dict[str, Any]]:
    """``questions`` questions on images of ``split`` drawn with ``seed``, in batches."""
    images, labels = llava_digits.digits(split)
    picks = torch.randint(0, len(labels), (questions,), generator=torch.Generator().manual_seed(seed))
    return [make_batch(tokenizer, images, labels, picks[s : s + batch_size]) for s in range(0, questions, batch_size)]


def calibration_prompts(tokenizer: Any, split: str, samples: int, seed: int) -> list[dict[str, Any]]:
    """``samples`` single prompts (model inputs, no answers)."""
    batches = vqa_batches(tokenizer, split, samples, seed, batch_size=1)
    return [{"input_ids": b["input_ids"], "pixel_values": b["pixel_values"]} for b in batches]


def is_its_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is this member's (SmolLM2's, with the image placeholder): how ``digits_vqa`` data
    and the ``vqa_accuracy`` metric tell this member's prompts from ``llava_digits``' word prompts."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    return callable(convert) and convert(IMAGE_TOKEN) == _image_token_id() and len(tokenizer) == 49152


def _logits_last(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "pixel_values": batch["pixel_values"].to(device)}
    return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].cpu()


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[dict[str, Any]]) -> float:
    """Fraction of questions whose greedy next token is the answer."""
    model.eval()
    right = total = 0
    for batch in batches:
        right += int((_logits_last(model, batch).argmax(-1) == batch["answers"]).sum())
        total += len(batch["answers"])
    return right / total
