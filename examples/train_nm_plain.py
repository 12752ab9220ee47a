"""LBC N:M sparsity learned inside a plain PyTorch training loop (digits, offline, about a minute on a CPU).

    python examples/train_nm_plain.py --pattern 2:4 --epochs 20

The three compressx calls are marked (1), (2), (3); everything else is an ordinary loop. Checkpoints hold the
model's state_dict (LBC's scores and alive candidates included) and the handle's state; --resume continues one.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import compressx
from compressx.images import digits_tensors, parse_image_data_spec
from compressx.zoo.resnet_digits import build_empty


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
        state = torch.load(args.checkpoint, weights_only=False)
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
            torch.save(state, args.checkpoint)

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
