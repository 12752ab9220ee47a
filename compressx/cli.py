"""The ``compressx`` command: ``apply``, ``validate``, ``list``, ``show``, ``verify``, ``load``, ``push``, ``report``.

It parses arguments and calls the Python API, nothing else. User errors print one message and exit with 2;
Ctrl-C (SIGINT) and SIGTERM stop the run, remove its temporary files and exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from compressx.errors import CompressxError, ConfigError
from compressx.registry import summarize_report

log = logging.getLogger("compressx")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _eval_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = []
    for label in after:
        b, a = before.get(label, math.nan), after[label]
        rows.append([label, f"{b:.4f}", f"{a:.4f}", f"{(a - b) / b * 100:+.2f}%" if b else "n/a"])
    return _table(rows, ["metric", "before", "after", "change"])


def _cmd_apply(args: argparse.Namespace) -> int:
    from compressx.recipe import load_recipe
    from compressx.runner import is_main_process, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run = run_recipe(
        recipe, overwrite=args.overwrite, progress=not args.no_progress, export=not args.no_export, resume=args.resume
    )
    if not is_main_process():  # under `accelerate launch`, one process reports
        return 0
    for i, step in enumerate(run.result.steps):
        summary = summarize_report(step.report)
        print(f"step {i}: {step.pass_name} ({step.kind}) on {len(step.targets)} module(s): {summary}")
    if run.eval_after:
        print()
        print(_eval_table(run.eval_before, run.eval_after))
    if run.export_dir:
        from compressx.manifest import MANIFEST, manifest_digest

        print(f"\nexported to {run.export_dir}  (reload: compressx.load({run.export_dir!r}))")
        digest = manifest_digest(run.export_dir)
        print(f"{MANIFEST} sha256 {digest}  (check a copy with: compressx verify DIR --expect {digest})")
    if run.pushed is not None:
        print(f"pushed to the Hub: {run.pushed.repo_id} {run.pushed.commit_url}")
    if run.report:
        print(f"report: {run.report}  (Markdown: {run.report.removesuffix('.html')}.md)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from compressx.recipe import load_recipe
    from compressx.runner import check_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_recipe(recipe, overwrite=args.overwrite)
    print(f"{args.recipe}: ok ({len(recipe.steps)} step(s): {', '.join(s.pass_name for s in recipe.steps)})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from compressx.registry import list_passes

    specs = list_passes()
    if args.json:
        print(json.dumps([{"name": s.name, "kind": s.kind, "paper": s.paper, "families": s.families} for s in specs]))
        return 0
    rows = [[s.name, s.kind, ", ".join(s.families), s.paper] for s in specs]
    print(_table(rows, ["pass", "kind", "families", "paper"]))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from compressx.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def _show_manifest(directory: str, manifest: dict[str, Any]) -> str:
    out = [f"compressx export {directory}  (format {manifest['format_version']}, created {manifest.get('created')})"]
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    model = manifest["model"]
    source = manifest.get("source") or {}
    out.append(
        f"model: {model['class']} ({model['format']})"
        + (f" from {source.get('source')}:{source.get('id')}" if source else "")
    )
    for i, step in enumerate(manifest["steps"]):
        out.append(f"step {i}: {step['pass']} ({step['kind']}) config={json.dumps(step['config'])}")
        out.append(f"  {len(step['targets'])} module(s); {summarize_report(step['report'])}")
        per_module = step["report"].get("per_module")
        if isinstance(per_module, dict):
            rows = [[name, f"{value}"] for name, value in list(per_module.items())[:12]]
            more = len(per_module) - len(rows)
            out.append("  " + _table(rows, ["module", "value"]).replace("\n", "\n  "))
            if more > 0:
                out.append(f"  … and {more} more")
    if manifest.get("reapply"):
        out.append("re-applied on load: " + ", ".join(e["pass"] for e in manifest["reapply"]))
    record = manifest.get("sparsity")
    if record is not None:  # exports written before the sparsity record have none
        line = "sparsity: no weight tensor has exact zeros"
        if record:
            patterns: dict[str, int] = {}
            for entry in record.values():
                patterns[entry["pattern"]] = patterns.get(entry["pattern"], 0) + 1
            fractions = sorted(entry["sparsity"] for entry in record.values())
            spread = f"{fractions[0]}" + (f"–{fractions[-1]}" if fractions[-1] != fractions[0] else "")
            kinds = ", ".join(f"{pattern} ×{count}" for pattern, count in sorted(patterns.items()))
            line = f"sparsity: {len(record)} weight tensor(s) with zeros ({kinds}), zero fraction {spread}"
        packed = manifest.get("sparse_format")
        if packed:
            ratio = f"{packed['ratio']:.3f}" if packed.get("ratio") is not None else "-"
            line += (
                f"; packed ({packed['format']}): {packed['file']} {packed['bytes']:,} bytes vs "
                f"{packed['dense_bytes']:,} dense (ratio {ratio})"
            )
        out.append(line)
    ev = manifest.get("eval") or {}
    if ev.get("after"):
        out += ["", _eval_table(ev.get("before", {}), ev["after"])]
    out += ["", "files:"] + [f"  {name}  sha256 {digest[:16]}…" for name, digest in manifest["files"].items()]
    return "\n".join(out)


def _cmd_show(args: argparse.Namespace) -> int:
    from compressx.manifest import read_manifest

    print(_show_manifest(args.dir, read_manifest(args.dir)))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Check the manifest (and its digest with --expect) and every file's SHA-256; name the files it ignores."""
    from compressx.manifest import MANIFEST, manifest_digest, unlisted_files, verify

    manifest = verify(args.dir, expect=args.expect)
    digest = manifest_digest(args.dir)
    print(f"{args.dir}: {len(manifest['files'])} file(s) match their SHA-256; {MANIFEST} sha256 {digest}")
    if args.expect is None:
        print(f"(the digest is not checked: pass --expect <sha256 of {MANIFEST}> obtained from the export's author)")
    unlisted = unlisted_files(args.dir)
    if unlisted:
        print(f"not in the manifest, so never read by load: {', '.join(unlisted)}")
    return 0


def _cmd_load(args: argparse.Namespace) -> int:
    """Load an export (hashes verified, runtime passes re-applied); with --eval, re-run its recorded metrics."""
    import torch
    import yaml

    from compressx.evaluate import evaluate, parse_eval_spec
    from compressx.export import load, load_tokenizer
    from compressx.manifest import read_manifest

    model = load(args.dir, expect=args.expect)
    manifest = read_manifest(args.dir)
    # A diffusers pipeline is not a module: count the parameters of its module components.
    modules = [model] if isinstance(model, torch.nn.Module) else list(getattr(model, "components", {}).values())
    params = sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())
    print(f"loaded {type(model).__name__} ({params:,} parameters) from {args.dir}; all file hashes match")
    if not args.eval:
        return 0
    recorded = (manifest.get("eval") or {}).get("after") or {}
    specs = []
    if "recipe.yaml" in manifest["files"]:  # verified by load; an unlisted recipe.yaml is never read
        try:
            with open(f"{args.dir}/recipe.yaml", encoding="utf-8") as f:
                recorded_recipe = yaml.safe_load(f) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CompressxError(f"{args.dir}/recipe.yaml: cannot read it: {' '.join(str(err).split())}") from err
        evals = recorded_recipe.get("eval") if isinstance(recorded_recipe, dict) else None
        if not isinstance(evals, list | None):
            raise CompressxError(f"{args.dir}/recipe.yaml: eval is not a list of metrics")
        for i, entry in enumerate(evals or []):
            try:
                specs.append(parse_eval_spec(entry))
            except ConfigError as err:  # all its problems on the one error line
                raise CompressxError(f"{args.dir}/recipe.yaml: {'; '.join(err.under(f'eval[{i}]').lines())}") from err
    if not specs:
        raise CompressxError(f"{args.dir} records no eval to re-run (it has no recipe.yaml with an eval list)")
    values = evaluate(model, load_tokenizer(args.dir), specs, progress=not args.no_progress)
    rows, same = [], True
    for label, value in values.items():
        expected = recorded.get(label)
        same &= expected == value
        rows.append([label, f"{expected:.6f}" if expected is not None else "-", f"{value:.6f}"])
    print(_table(rows, ["metric", "recorded after", "reloaded"]))
    print("reloaded model reproduces the recorded metrics exactly" if same else "MISMATCH with the recorded metrics")
    return 0 if same else 1


def _cmd_push(args: argparse.Namespace) -> int:
    """Verify an export and upload it to a Hub model repo in one commit (--dry-run: show what would be sent)."""
    from compressx.push import push_to_hub

    pushed = push_to_hub(
        args.dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    print(_push_summary(pushed))
    return 0


def _push_summary(pushed: Any) -> str:
    """What ``push`` sent (or, dry run, would send): the files and sizes, and the card's metadata."""
    import yaml

    size = sum(pushed.files.values())
    where = pushed.repo_id + (f" (branch {pushed.revision})" if pushed.revision else "")
    head = (
        f"dry run: would upload {len(pushed.files)} file(s), {size:,} bytes, to {where}"
        if pushed.dry_run
        else (f"pushed {len(pushed.files)} file(s), {size:,} bytes, to {where}: {pushed.commit_url}")
    )
    rows = [[name, f"{n:,}"] for name, n in pushed.files.items()]
    card = yaml.safe_dump(pushed.card, sort_keys=False).rstrip() if pushed.card else "(no model card)"
    skipped = [f"not uploaded (the manifest does not list them): {', '.join(pushed.skipped)}"] * bool(pushed.skipped)
    return "\n".join([head, "", _table(rows, ["file", "bytes"]), *skipped, "", "model card metadata:", card])


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML + Markdown report of a verified export beside it (or to --out)."""
    from compressx.report import write_report

    page = write_report(args.dir, args.out, sample_prompts=args.samples, sample_steps=args.sample_steps)
    print(f"report of {args.dir} written to {page} (and {page.with_suffix('.md').name} beside it)")
    return 0


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that, as with Ctrl-C, every ``finally`` / cleanup runs."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    from compressx._version import __version__

    parser = argparse.ArgumentParser(prog="compressx", description="Apply compression recipes to PyTorch models.")
    parser.add_argument("--version", action="version", version=f"compressx {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("apply", help="run a recipe: build, evaluate, compress, evaluate, export")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. steps.0.config.sparsity=0.6")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    p.add_argument("--no-export", action="store_true", help="skip the export block")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints (train.checkpoint, checkpoint) an interrupted run of the recipe left",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(fn=_cmd_apply)

    p = sub.add_parser("validate", help="check a recipe against the registry and the model's architecture")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--overwrite", action="store_true", help="do not report an existing export directory")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("list", help="list the registered passes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_list)

    p = sub.add_parser("schema", help="print the JSON Schema of a recipe (for editors: docs/recipes.md)")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("show", help="print an export's manifest")
    p.add_argument("dir")
    p.set_defaults(fn=_cmd_show)

    p = sub.add_parser("verify", help="check an export's manifest and every file's SHA-256")
    p.add_argument("dir")
    p.add_argument("--expect", metavar="SHA256", help="the SHA-256 compressx.json must have (printed at export time)")
    p.set_defaults(fn=_cmd_verify)

    p = sub.add_parser("load", help="load an export (verifying hashes); --eval re-runs its recorded metrics")
    p.add_argument("dir")
    p.add_argument("--expect", metavar="SHA256", help="the SHA-256 compressx.json must have (printed at export time)")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_load)

    p = sub.add_parser("push", help="verify an export and upload it to a Hugging Face Hub model repo in one commit")
    p.add_argument("dir")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="the model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing); default main")
    p.add_argument("--commit-message", metavar="TEXT")
    p.add_argument("--dry-run", action="store_true", help="print the card's metadata and the files; send nothing")
    p.set_defaults(fn=_cmd_push)
    p = sub.add_parser("report", help="write an HTML + Markdown report of an export (figures embedded)")
    p.add_argument("dir")
    p.add_argument(
        "--out", metavar="DIR", help="the report directory (default: DIR.report beside the export, never inside it)"
    )
    p.add_argument(
        "--samples",
        nargs="+",
        metavar="PROMPT",
        help="pipeline exports (cutdiffusion, multidiffusion): load the pipeline and add a grid of these prompts "
        "at the native size, 2x and 4x its area",
    )
    p.add_argument("--sample-steps", type=int, default=30, metavar="N", help="denoising steps of --samples")
    p.set_defaults(fn=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "no_progress", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.fn(args)
    except CompressxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
