"""Does the VTW premise appear in a LLaVA trained here? The KL search at the paper's η on zoo-LLaVA variants.

VTW rests on an observation about LLaVA-1.5: the vision tokens hand their information to the text tokens in the
first layers, so the upper half of the decoder can run without them. This tool trains variants of the zoo LLaVA
(``llava_digits``) with two training recipes, several depths and seeds. For each, it runs the paper's KL search
and reports where it puts K and what that costs in accuracy. The two recipes:

* ``scratch``: the zoo builder's recipe. The vision tower is pretrained, then the projector and the decoder are
  trained from scratch on the questions (peak lr 3e-3).
* ``llava``: LLaVA-1.5's three stages, in small. The decoder is first pretrained as a causal LM on the same
  questions written in words, each image replaced by its digit word: the stand-in for a pretrained LLM. Then the
  projector alone is trained with the decoder frozen, on "which digit" (LLaVA's feature alignment). Then
  projector and decoder are tuned together at a tenth of the pretraining lr (LLaVA's visual instruction tuning,
  whose lr is far below the LLM's pretraining lr).

``scratch`` at 6 layers and seed 0 is the shipped zoo model; the tool checks that it rebuilds it bit for bit.
Results are in docs/results/vtw.md.

Run:  PYTHONPATH=. python tools/vtw_proxy_recipes.py --recipes scratch llava --layers 6 8 12 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
from vtw_proxy import flops_ratios  # tools/ is on sys.path when a tool runs

import compressx
from compressx.passes.vtw import first_under
from compressx.zoo import llava_digits as zoo

THRESHOLDS = (0.003, 0.03)


def text_prompts(task: str, labels: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The questions as text with each image written as its digit word, followed by the answer ``[b, n]``."""
    tok = zoo.WordTokenizer()
    rows = []
    for pick in picks.view(len(picks), -1):
        first, second = int(labels[pick[0]]), int(labels[pick[-1]])
        images = f" {first}" + (f" and {second}" if task in ("larger", "equal") else "")
        prompt = tok.encode(f"<bos> user :{images} {zoo.QUESTIONS[task]} assistant :")
        rows.append([*prompt, zoo.answer_id(task, first, second)])
    return torch.tensor(rows)


def answer_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[:, -1]
    return F.cross_entropy(logits, batch["answers"])


def run_stage(params: list, steps: int, lr: float, loss_at_step, hp: dict[str, Any], clip: bool = True) -> float:
    """AdamW with the zoo's warm-up + cosine schedule; returns the last loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=hp["weight_decay"])
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = zoo._lr_at(step, steps, lr, hp["warmup"])
        loss = loss_at_step(step)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def build(recipe: str, n_layers: int, seed: int, args: argparse.Namespace) -> Any:
    """One variant, trained deterministically from ``seed`` (the caller's RNG state is left alone)."""
    from transformers import LlavaForConditionalGeneration

    hp = dict(zoo.TRAINING, seed=seed, steps=args.tune_steps, vision_steps=args.vision_steps)
    images, labels = zoo.digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = zoo.config()
        config.text_config.num_hidden_layers = n_layers
        model = LlavaForConditionalGeneration(config).train()
        zoo._pretrain_vision(model, images, labels, hp)
        model.model.vision_tower.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)

        def question_batch(task: str) -> dict[str, Any]:
            return zoo.make_batch(task, images, labels, zoo.sample_picks(task, labels, hp["batch"], gen))

        tune_lr = hp["lr"]
        if recipe == "llava":
            decoder, head = model.model.language_model, model.lm_head

            def lm_loss(step: int) -> torch.Tensor:
                task = zoo.TASKS[step % len(zoo.TASKS)]
                ids = text_prompts(task, labels, zoo.sample_picks(task, labels, hp["batch"], gen))
                logits = head(decoder(input_ids=ids).last_hidden_state)[:, :-1]
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

            run_stage([*decoder.parameters(), *head.parameters()], args.text_steps, hp["lr"], lm_loss, hp)
            projector = list(model.model.multi_modal_projector.parameters())

            def align_loss(step: int) -> torch.Tensor:
                return answer_loss(model, question_batch("which"))

            run_stage(projector, args.align_steps, hp["lr"], align_loss, hp, clip=False)
            tune_lr = hp["lr"] * args.tune_lr_ratio

        def tune_loss(step: int) -> torch.Tensor:  # the zoo builder's loop: one question kind per step in turn
            return answer_loss(model, question_batch(zoo.TASKS[step % len(zoo.TASKS)]))

        run_stage([p for p in model.parameters() if p.requires_grad], hp["steps"], tune_lr, tune_loss, hp)
    return model.requires_grad_(True).eval()


def measure(model: Any, questions: int, calibration: int) -> dict[str, Any]:
    """Accuracy at every K, the KL search (search_start 1) and the K each η picks."""
    n_layers = model.config.text_config.num_hidden_layers
    test = zoo.vqa_batches("test", questions // len(zoo.TASKS), seed=0)
    calib = zoo.calibration_prompts("val", calibration, seed=0)
    step = compressx.apply(
        model, [{"pass": "vtw", "config": {"layer": "auto", "search_start": 1}}], calib, progress=False
    ).steps[0]
    step.handle.remove()
    mean_kl = {int(d): kl for d, kl in step.report["kl_per_layer"].items()}
    accuracy = {}
    for k in range(n_layers + 1):
        handle = compressx.apply(model, [{"pass": "vtw", "config": {"layer": k}}], progress=False).steps[0].handle
        accuracy[k] = zoo.accuracy(model, test)
        handle.remove()
    full = accuracy[n_layers]
    within_1 = min(k for k in accuracy if accuracy[k] >= full - 0.01)
    chosen = {eta: first_under(mean_kl, eta, n_layers) for eta in THRESHOLDS}
    return {
        "layers": n_layers,
        "full_accuracy": full,
        "kl_per_layer": mean_kl,
        "accuracy_per_layer": accuracy,
        "cheapest_k_within_1_point": within_1,
        "chosen": {
            str(eta): {
                "k": k,
                "delta_points": 100 * (accuracy[k] - full),
                "prefill_ratio": flops_ratios(model.config.text_config, k)[0],
            }
            for eta, k in chosen.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["scratch", "llava"], choices=["scratch", "llava"])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 8, 12], help="decoder depths")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text-steps", type=int, default=600, help="llava: decoder LM pretraining steps")
    parser.add_argument("--align-steps", type=int, default=600, help="llava: projector-only alignment steps")
    parser.add_argument("--tune-lr-ratio", type=float, default=0.1, help="llava: tuning lr / pretraining lr")
    parser.add_argument("--tune-steps", type=int, default=zoo.TRAINING["steps"], help="question-tuning steps")
    parser.add_argument("--vision-steps", type=int, default=zoo.TRAINING["vision_steps"], help="vision pretraining")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=20)
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        parser.error(f"--json {args.json}: its folder does not exist or is not writable")  # before an hour of work
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| recipe | layers | seed | full acc % | K (η=0.003) | Δ pts | prefill | K (η=0.03) | Δ pts | prefill "
          "| cheapest K within 1 pt | build s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for recipe in args.recipes:
        for n_layers in args.layers:
            for seed in args.seeds:
                start = time.perf_counter()
                model = build(recipe, n_layers, seed, args)
                seconds = time.perf_counter() - start
                if (recipe, n_layers, seed, args.tune_steps, args.vision_steps) == ("scratch", 6, 0, 600, 200):
                    shipped, _ = zoo.train(progress=False)
                    pairs = zip(model.state_dict().values(), shipped.state_dict().values(), strict=True)
                    same = all(torch.equal(a, b) for a, b in pairs)
                    print(f"<!-- scratch/6/0 equals the shipped zoo model: {same} -->")
                m = measure(model, args.questions, args.calibration)
                m.update(recipe=recipe, seed=seed, build_seconds=round(seconds, 1))
                results.append(m)
                cells = []
                for eta in THRESHOLDS:
                    c = m["chosen"][str(eta)]
                    k = f"{c['k']}" + (" (off)" if c["k"] == n_layers else "")
                    cells += [k, f"{c['delta_points']:+.1f}", f"{c['prefill_ratio']:.3f}"]
                print(f"| {recipe} | {n_layers} | {seed} | {100 * m['full_accuracy']:.1f} | {' | '.join(cells)} | "
                      f"{m['cheapest_k_within_1_point']} | {seconds:.0f} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
