"""SpRe N:M training with Hugging Face accelerate: one script for CPU, one GPU, or DDP on several GPUs.

    python examples/train_nm_accelerate.py --epochs 10                      # CPU or one GPU
    accelerate launch --num_processes 4 examples/train_nm_accelerate.py     # DDP

Prepare the compressx pass *before* ``accelerator.prepare`` (the pass adds modules and parameters that DDP must
see), drive the handle from every process (the schedule is deterministic and the gradients are all-reduced, so
the processes stay in sync), and finalise the unwrapped model.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

import compressx
from compressx.images import digits_tensors, parse_image_data_spec
from compressx.zoo.resnet_digits import build_empty


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(0)
    train = torch.utils.data.TensorDataset(*digits_tensors(parse_image_data_spec({"source": "digits"})))
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = build_empty()
    handle = compressx.prepare(model, "spre", {"pattern": args.pattern})  # before accelerator.prepare
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    for epoch in range(args.epochs):
        handle.on_epoch_start(epoch)
        wrapped.train()
        for images, labels in loader:
            loss = F.cross_entropy(wrapped(images), labels)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")

    accelerator.wait_for_everyone()
    model = handle.finalize()  # folds every extra branch: the plain resnet_digits architecture, N:M weights
    if accelerator.is_main_process:
        test_images, test_labels = digits_tensors(parse_image_data_spec({"source": "digits", "split": "test"}))
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_images.to(accelerator.device)).argmax(1).cpu() == test_labels).float().mean()
        print(f"{args.pattern} sparsity {handle.final_report['sparsity']:.4f}, test top-1 {accuracy * 100:.2f}%")


if __name__ == "__main__":
    main()
