"""CutDiffusion vs MultiDiffusion vs direct generation on the zoo diffusion model (sd_digits, native 16x16 px).

For 2x area (16x32 px) and 4x area (32x32 px) and each method, in one process:

* UNet evaluations per image, in native-size units (a UNet call on V views of the native size counts V; CFG
  doubles the batch, not the count; direct generation counts its canvas area in native areas per call);
* time per image (batch 1, ``--clock``, wall by default): median and range of ``--repeats`` runs, methods
  interleaved so that load from other processes hits all of them alike (tools/benchlib.py); ratios taken round by
  round;
* peak memory: the largest total size of the live tensors created during one generation (weights excluded),
  tracked per aten op with a ``TorchDispatchMode`` (CPU allocators do not report a peak; this counts what the
  generation itself holds at once, which is what grows with the resolution);
* quality: the zoo digit classifier on each image area-resized to 16x16 (is the whole picture one well-formed
  digit of the prompted class?), over ``--per-digit`` images of each digit; and the Fréchet distance between
  the classifier's pooled features of those images and of the real digits.

Ratios: time and evaluations against MultiDiffusion at the same size; peak memory against a native generation.
Sample grids (rows: methods, columns: digits 0-9) go to ``docs/results/cutdiffusion/``.

Run: PYTHONPATH=. python tools/bench_cutdiffusion.py [--repeats 5] [--out docs/results/cutdiffusion.md]
"""

from __future__ import annotations

import argparse
import json
import weakref
from pathlib import Path

import benchlib
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from compressx.passes.cutdiffusion import CutdiffusionConfig, cutdiffusion_sample, multidiffusion_config
from compressx.zoo import cache_dir, get_member, load_zoo_model, sd_digits

SIZES = {"native": (16, 16), "2x area": (16, 32), "4x area": (32, 32)}


class PeakTensorBytes(TorchDispatchMode):
    """Peak total bytes of the storages of tensors created by aten ops while active (``skip``: storages ignored)."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.live, self.current, self.peak = skip, {}, 0, 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.skip:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [size, 1]
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def generate(pipe, method: str, prompts: list[str], size: tuple[int, int], steps: int, seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    args = dict(num_inference_steps=steps, guidance_scale=scale, generator=gen, output_type="pt")
    if method == "direct" or size == SIZES["native"]:
        return type(pipe).__call__(pipe, prompts, height=size[0], width=size[1], **args).images
    config = CutdiffusionConfig() if method == "cutdiffusion" else multidiffusion_config()
    return cutdiffusion_sample(pipe, config, prompts, size[0], size[1], progress=False, **args).images


def grid_png(rows: list[torch.Tensor], path: Path, zoom: int = 4) -> None:
    """Rows of images [10, 1, H, W] in [0, 1] → one PNG (2 px gaps), each pixel a zoom x zoom block."""
    from PIL import Image

    h, w = rows[0].shape[-2:]
    canvas = torch.ones(len(rows) * (h + 2), 10 * (w + 2))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image[0]
    array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array, mode="L").resize((array.shape[1] * zoom, array.shape[0] * zoom), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--per-digit", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=4.0)
    benchlib.add_arguments(parser, out="docs/results/cutdiffusion.md", repeats=5, clock="wall")
    args = parser.parse_args()
    run = benchlib.start(args)
    pipe, _ = load_zoo_model("sd_digits")
    pipe.set_progress_bar_config(disable=True)
    classifier = sd_digits.load_classifier(cache_dir(get_member("sd_digits")))
    real_images, _ = sd_digits.digit_images()
    real_features = sd_digits.digit_features(classifier, (real_images + 1) / 2)
    half = len(real_features) // 2
    real_floor = sd_digits.frechet_distance(real_features[:half], real_features[half:])
    evals = {"n": 0}
    native_area = pipe.unet.config.sample_size**2

    def count(module, inputs, output):
        sample = inputs[0]
        evals["n"] += sample.shape[0] // 2 * (sample.shape[-2] * sample.shape[-1]) // native_area

    pipe.unet.register_forward_hook(count)
    methods = ["direct", "multidiffusion", "cutdiffusion"]
    cases = [("native", "plain")] + [(s, m) for s in ("2x area", "4x area") for m in methods]
    weights = {
        p.untyped_storage().data_ptr()
        for c in pipe.components.values()
        if hasattr(c, "parameters")
        for p in c.parameters()
    }

    results: dict[tuple[str, str], dict[str, float]] = {}
    for size_name, method in cases:
        evals["n"] = 0
        generate(pipe, method, ["digit 3"], SIZES[size_name], args.steps, 0, args.guidance)
        row = {"evals": evals["n"]}
        with PeakTensorBytes(weights) as tracker:
            generate(pipe, method, ["digit 3"], SIZES[size_name], args.steps, 0, args.guidance)
        row["peak_bytes"] = tracker.peak
        labels = torch.arange(10).repeat(args.per_digit)
        images = generate(
            pipe, method, [f"digit {d}" for d in labels.tolist()], SIZES[size_name], args.steps, 1, args.guidance
        )
        row.update(sd_digits.digit_scores(classifier, images, labels))
        row["fd"] = sd_digits.frechet_distance(sd_digits.digit_features(classifier, images), real_features)
        row["grid"] = images[:10]
        results[(size_name, method)] = row
        print(size_name, method, {k: v for k, v in row.items() if k != "grid"}, flush=True)
    # the first generations above warmed every case up; seed 0 for all (the cost does not depend on it)
    times = benchlib.interleaved(
        {key: (lambda key=key: generate(pipe, key[1], ["digit 3"], SIZES[key[0]], args.steps, 0, args.guidance))
         for key in cases},
        args.repeats, warmup=0, clock=args.clock,
    )  # fmt: skip
    for key, row in results.items():
        row["time"] = times[key]

    grid_dir = Path(args.out).with_suffix("")
    grid_dir.mkdir(parents=True, exist_ok=True)
    grid_png([results[("native", "plain")]["grid"]], grid_dir / "native.png")
    for size_name in ("2x area", "4x area"):
        name = size_name.replace(" ", "_")
        grid_png([results[(size_name, m)]["grid"] for m in methods], grid_dir / f"{name}.png")
    build_info = json.loads((cache_dir(get_member("sd_digits")) / "build.json").read_text())
    write_report(results, args, run, args.out, grid_dir, build_info, real_floor)


def write_report(results, args, run, out: Path, grid_dir: Path, build_info: dict, real_floor: float) -> None:
    native = results[("native", "plain")]
    rel = grid_dir.relative_to(out.parent)
    lines = [
        "# CutDiffusion on the zoo diffusion model (sd_digits)",
        "",
        *run.header(),
        "",
        f"Settings: {args.steps} steps, CFG {args.guidance}, {args.per_digit} images per digit; times: "
        f"{args.clock} seconds, median (range) of {args.repeats} interleaved repeats, ratios to MultiDiffusion taken "
        "round by round (the evaluation counts do not depend on load).",
        "",
        f"Zoo build (`build.json`): {json.dumps(build_info)}.",
        "",
        "Model: `sd_digits` (native 16x16 px, latent 8x8; [docs/zoo.md](../zoo.md)), Euler, "
        f"{args.steps} steps, CFG {args.guidance}. CutDiffusion at its defaults (proportion 0.5, shuffle, "
        "window 8 latent px, stride 4, jitter 1, view batch 1); MultiDiffusion: the same windows at every step, no "
        "jitter; direct: the plain pipeline at the target size.",
        "",
        "| size | method | UNet evals / image | evals vs Multi | time / image (s) | time vs Multi, per round "
        "| peak tensor memory (KiB) | memory vs native | digit accuracy | prompted-digit confidence "
        "| FD to real digits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size_name, method), row in results.items():
        multi = results.get((size_name, "multidiffusion"), row)
        lines.append(
            f"| {size_name} {SIZES[size_name][0]}x{SIZES[size_name][1]} | {method} | {row['evals']} "
            f"| {row['evals'] / multi['evals']:.2f} | {row['time'].format(3)} "
            f"| {benchlib.ratio(row['time'], multi['time']).format(2)} "
            f"| {row['peak_bytes'] / 1024:.0f} | {row['peak_bytes'] / native['peak_bytes']:.2f} "
            f"| {row['accuracy']:.2f} | {row['confidence']:.3f} | {row['fd']:.3g} |"
        )
    lines += [
        "",
        "Peak memory: the largest total size of live tensors created during one generation (batch 1, weights "
        "excluded), tracked per aten op; the allocator's own overhead and the weights are not included.",
        f"Quality: the zoo digit classifier on {10 * args.per_digit} images per row ({args.per_digit} per digit, "
        "prompt `digit N`), each area-resized to 16x16: accuracy = the prompted digit is the top class; confidence = "
        "its mean probability. FD: Fréchet distance between Gaussians fitted to the classifier's pooled conv "
        f"features (32-d) of these images and of the 1797 real digits (lower is closer; two halves of the real "
        f"digits: {real_floor:.3g}; with {10 * args.per_digit} samples the estimate is biased upwards, compare rows).",
        "",
        "UNet evaluations are in native-size units: a call on V native-size views counts V (CFG doubles the batch, "
        "not the count); direct generation counts the canvas area in native areas per call (2 at 2x, 4 at 4x).",
        f"Sample grids (native: the plain pipeline; larger: rows direct, MultiDiffusion, CutDiffusion; columns: "
        f"digits 0-9; seed 1): "
        f"[native]({rel}/native.png), [2x area]({rel}/2x_area.png), [4x area]({rel}/4x_area.png).",
        "",
    ]
    benchlib.write(out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
