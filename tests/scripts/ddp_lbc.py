"""Run by tests/test_builtin_trainer.py under torchrun (2 CPU processes): LBC through
compressx.builtin_trainer.train with DDP.

Every rank prints one line ``RESULT <json>``: its rank, the number of processes, accelerate's distributed type,
and hashes of the finalised parameters and of the zero masks of the N:M layers. The ranks start from different
initialisations (seeded by rank): DDP must broadcast rank 0's weights, and all-reduce the gradients (LBC's scores
included) so that every rank removes the same candidates.
"""

import hashlib
import json
import os

import torch
from accelerate import PartialState

import compressx
from compressx.builtin_trainer import parse_train_spec, train
from compressx.zoo.resnet_digits import build_empty


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)
    # Seeded by rank, so the ranks start apart. (No PartialState before train(): created first, without the
    # ACCELERATE_USE_CPU flag Accelerator reads, it would pin the shared state to a non-distributed one.)
    torch.manual_seed(100 + int(os.environ.get("RANK", "0")))
    model = build_empty()
    handle = compressx.prepare(model, "lbc", {"pattern": "2:4", "end_epoch": 1})
    spec = parse_train_spec(
        {
            "data": {"source": "digits", "split": "train", "train_images": 200},
            "epochs": 2,
            "batch_size": 32,
            "optimizer": {"name": "sgd", "lr": 0.05},
        }
    )
    summary = train(model, spec, [handle], progress=False)
    handle.finalize()
    state = PartialState()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    result = {
        "rank": state.process_index,
        "processes": summary["processes"],
        "distributed_type": str(state.distributed_type),
        "epochs": [h["epoch"] for h in summary["history"]],
        "schedule": handle.history,
        "sparsity": handle.final_report["sparsity"],
        "params": digest(model.parameters()),
        "masks": digest(m.weight == 0 for m in layers),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
