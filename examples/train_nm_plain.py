"""LBC N:M sparsity learned inside a plain PyTorch training loop (digits, offline, about a minute on a CPU).

    python examples/train_nm_plain.py --pattern 2:4 --epochs 20

The three compressx calls are marked (1), (2), (3); everything else is an ordinary loop. Checkpoints hold the
model's state_dict (LBC's scores and alive candidates included), the optimizer's, the scheduler's, the handle's
state and the data order; --resume continues one. A checkpoint is one safetensors file (tensors as tensors, the
rest as JSON in its metadata: no pickle), replaced atomically, so a crash while writing keeps the previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import compressx
from compressx.images import digits_tensors, parse_image_data_spec
from compressx.zoo.resnet_digits import build_empty


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts and lists of tensors, numbers, strings) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach().cpu().clone().contiguous()
            return {"__tensor__": where}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: encode(v, f"{where}/{k}") for k, v in value.items()}
        if isinstance(value, dict):  # e.g. the optimizer's per-parameter state, keyed by int
            return {"__items__": [[k, encode(v, f"{where}/{k}")] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            return [encode(v, f"{where}/{i}") for i, v in enumerate(value)]
        return value

    skeleton = json.dumps(encode(state, "state"))
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"state": skeleton})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict[str, Any]:
    """The state ``save_checkpoint`` wrote."""
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        skeleton = json.loads(f.metadata()["state"])

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if isinstance(value, dict) and "__items__" in value:
            return {k: decode(v) for k, v in value["__items__"]}
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(skeleton)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--checkpoint", default=None, help="save model + handle state here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--export", default=None, help="export the finalised model to this directory")
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = digits_tensors(parse_image_data_spec({"source": "digits", "split": "train"}))
    test_images, test_labels = digits_tensors(parse_image_data_spec({"source": "digits", "split": "test"}))
    model = build_empty()
    # (1) prepare: LBC scores on every N:M layer; removal over the first half of training, as the paper does.
    handle = compressx.prepare(model, "lbc", {"pattern": args.pattern, "end_epoch": max(1, args.epochs // 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # after prepare
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    first_epoch = 0
    if args.resume:
        state = load_checkpoint(args.checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        handle.load_state_dict(state["handle"])
        first_epoch = handle.epoch + 1

    generator = torch.Generator().manual_seed(0)
    if args.resume:
        generator.set_state(state["shuffle"])  # the data order goes on where it stopped
    for epoch in range(first_epoch, args.epochs):
        handle.on_epoch_start(epoch)  # (2) the pass's schedule for this epoch
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        if args.checkpoint:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "handle": handle.state_dict(),
                     "shuffle": generator.get_state()}  # fmt: skip
            save_checkpoint(args.checkpoint, state)

    model = handle.finalize()  # (3) plain Conv2d / Linear modules whose weights hold the N:M zeros
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item() * 100
    print(f"{args.pattern} sparsity {handle.final_report['sparsity']:.4f}, test top-1 {accuracy:.2f}%")
    if args.export:
        compressx.save(model, args.export, overwrite=True, sparse_format="nm")
        print(f"exported to {args.export}")


if __name__ == "__main__":
    main()
