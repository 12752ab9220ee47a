"""Nothing lost, nothing trusted blindly (issue 11): overwrite replaces only compressx exports, an interrupted or
failing export leaves the old one whole, the loader reads only files it verified (safetensors, never pickle), and
every malformed manifest is one ExportError."""

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressx
from compressx import cli
from compressx import export as export_mod
from compressx import manifest as manifest_mod
from compressx.errors import ExportError
from compressx.recipe import parse_recipe
from compressx.runner import check_export_target

ROOT = Path(__file__).resolve().parents[1]
KILLED = str(ROOT / "tests" / "scripts" / "export_killed.py")


def _linear(value: float = 1.0) -> torch.nn.Linear:
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def _weight(export) -> float:
    return float(compressx.load(export, model=torch.nn.Linear(8, 8)).weight[0, 0].detach())


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _export_spec(directory, overwrite=False):
    recipe = parse_recipe(
        {
            "model": {"source": "zoo", "id": "llama_byte_1m"},
            "steps": [{"pass": "magnitude"}],
            "export": {"dir": str(directory), "overwrite": overwrite},
        }  # fmt: skip
    )
    return recipe.export


# --- overwrite replaces only a compressx export -------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_an_export(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("three years of work")
    with pytest.raises(ExportError, match=r"replaces only a compressx export.*compressx.json is missing"):
        compressx.save(_linear(), thesis, overwrite=True)
    assert (thesis / "chapter1.tex").read_text() == "three years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_overwrite_refuses_a_plain_file_and_a_link(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ExportError, match=r"replaces only a compressx export, and .*notes.txt is a file"):
        compressx.save(_linear(), notes, overwrite=True)
    assert notes.read_text() == "keep me"
    real = Path(compressx.save(_linear(), tmp_path / "real"))
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ExportError, match="is a symbolic link"):
        compressx.save(_linear(2.0), tmp_path / "link", overwrite=True)
    assert _weight(real) == 1.0


def test_overwrite_refuses_an_export_holding_files_compressx_did_not_write(tmp_path):
    out = compressx.save(_linear(), tmp_path / "exp")
    (Path(out) / "my-notes.md").write_text("results of the ablation")
    (Path(out) / "plots").mkdir()
    (Path(out) / "plots" / "loss.png").write_bytes(b"png")
    with pytest.raises(ExportError, match=r"holds 2 file\(s\) its compressx.json does not list \(my-notes.md, plots/"):
        compressx.save(_linear(2.0), out, overwrite=True)
    assert (Path(out) / "my-notes.md").read_text() == "results of the ablation"
    assert _weight(out) == 1.0


def test_recipe_check_says_the_same_before_any_work(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "prune.yaml").write_text("model: {}\n")
    problem = check_export_target(_export_spec(recipe_dir), overwrite=True)  # the recipe's own folder
    assert problem == f"export.dir: {export_mod.overwrite_problem(recipe_dir)}"
    assert "replaces only a compressx export" in problem and (recipe_dir / "prune.yaml").is_file()
    out = compressx.save(_linear(), tmp_path / "exp")
    assert check_export_target(_export_spec(out), overwrite=True) is None
    assert "exists; pass --overwrite" in check_export_target(_export_spec(out))


def test_every_file_but_the_manifest_is_hashed(tiny_llama, bpe_tokenizer, tmp_path):
    recipe = parse_recipe({"model": {"source": "hf", "id": "x"}, "steps": [{"pass": "magnitude"}]})
    out = Path(compressx.save(tiny_llama, tmp_path / "exp", recipe=recipe, tokenizer=bpe_tokenizer))
    files = compressx.read_manifest(out)["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(files) == [name for name in on_disk if name != "compressx.json"]
    assert {"README.md", "recipe.yaml", "tokenizer.json", "model.safetensors"} <= set(files)
    for name, digest in files.items():
        assert _sha(out / name) == digest, name


# --- interruption and kills ----------------------------------------------------------------------------------


def _killed(target, stage, value, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, KILLED, str(target), stage, str(value), *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # a subprocess: imports torch and transformers
@pytest.mark.parametrize(
    ("stage", "flags"),
    [
        ("writing", ["--overwrite"]),
        ("before-commit", ["--overwrite"]),
        ("after-exchange", ["--overwrite"]),
        ("before-commit", ["--overwrite", "--no-exchange"]),
        ("moved-aside", ["--overwrite", "--no-exchange"]),
        ("after-move", ["--overwrite", "--no-exchange"]),
    ],
)
def test_a_kill_at_any_stage_of_an_overwrite_leaves_a_complete_export(tmp_path, caplog, stage, flags):
    target = tmp_path / "exp"
    compressx.save(_linear(1.0), target)
    killed = _killed(target, stage, 2.0, *flags)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if stage != "moved-aside":  # the one moment without exchange support when the target is empty (documented)
        export_mod.verify(target)
        assert _weight(target) in (1.0, 2.0)
    # The next run on the target finds what the killed one left, puts the old export back if needed, and says so.
    with caplog.at_level(logging.WARNING, logger="compressx.export"):
        assert check_export_target(_export_spec(target), overwrite=True) is None
    export_mod.verify(target)
    expected = {"after-exchange": 2.0, "after-move": 2.0}.get(stage, 1.0)
    assert _weight(target) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    if stage == "moved-aside":
        assert "restored the export" in caplog.text


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_a_kill_before_a_first_export_is_moved_in_leaves_nothing(tmp_path, caplog):
    target = tmp_path / "exp"
    assert _killed(target, "before-commit", 1.0).returncode == -signal.SIGKILL
    assert not target.exists() and any(p.name.startswith(".exp.partial-") for p in tmp_path.iterdir())
    with caplog.at_level(logging.WARNING, logger="compressx.export"):
        compressx.save(_linear(3.0), target)
    assert "left by an interrupted run" in caplog.text
    assert _weight(target) == 3.0 and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_an_exception_between_the_two_renames_puts_the_old_export_back(tmp_path, monkeypatch):
    out = compressx.save(_linear(), tmp_path / "exp")
    monkeypatch.setattr(export_mod, "exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "rename_noreplace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compressx.save(_linear(2.0), out, overwrite=True)
    assert _weight(out) == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_a_target_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "exp"
    real_card = export_mod._model_card

    def someone_else_creates_it(manifest):
        target.mkdir()  # another process (or a user) creates the directory while the export is being written
        return real_card(manifest)

    monkeypatch.setattr(export_mod, "_model_card", someone_else_creates_it)
    with pytest.raises(ExportError, match="appeared while the export was being written"):
        compressx.save(_linear(), target)
    assert target.is_dir() and list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_a_second_writer_of_the_same_target_fails(tmp_path):
    from compressx import atomic

    target = tmp_path / "exp"
    with atomic.target_lock(target, wait=False):  # what a first run holds while it writes
        with pytest.raises(ExportError, match="another compressx run is writing"):
            compressx.save(_linear(), target)
        with pytest.raises(ExportError, match="another compressx run is writing"):
            compressx.save(_linear(), target, overwrite=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_two_concurrent_writers_one_wins(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = [
        subprocess.Popen(
            [sys.executable, KILLED, str(tmp_path / "exp"), "none", str(v)], env=env, text=True, stderr=subprocess.PIPE
        )  # fmt: skip
        for v in (1.0, 2.0)
    ]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    (loser,) = [err for code, err in outcomes if code]
    assert re.search(r"ExportError: .*(another compressx run is writing|exists; pass overwrite)", loser)
    export_mod.verify(tmp_path / "exp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


# --- write errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", ["ENOSPC", "SafetensorError", "EACCES at the commit"])
def test_a_write_error_is_one_export_error_and_the_old_export_is_intact(tmp_path, monkeypatch, error):
    from safetensors import SafetensorError

    out = compressx.save(_linear(), tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    real_write = export_mod._write_weights

    def failing_write(model, directory, source):
        entry = real_write(model, directory, source)
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        if error == "SafetensorError":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return entry

    def refused(a, b):
        raise PermissionError(errno.EACCES, "Permission denied", str(a))

    monkeypatch.setattr(export_mod, "_write_weights", failing_write)
    if error.startswith("EACCES"):
        monkeypatch.setattr(export_mod, "exchange", refused)
    with pytest.raises(ExportError, match="writing the export to .* failed, nothing was changed there"):
        compressx.save(_linear(2.0), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in Path(out).iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_a_file_size_limit_is_one_export_error(tmp_path):
    # RLIMIT_FSIZE makes write() fail with EFBIG (Python ignores SIGXFSZ), inside safetensors' Rust writer.
    script = f"""
import resource, sys, torch, compressx
out = compressx.save(torch.nn.Linear(8, 8), {str(tmp_path / "exp")!r})
model = torch.nn.Linear(512, 512)  # 1 MB of weights
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    compressx.save(model, out, overwrite=True)
except compressx.ExportError as err:
    print("ExportError:", err)
    sys.exit(2)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ExportError: writing the export to" in done.stdout and "Traceback" not in done.stderr
    assert compressx.load(tmp_path / "exp", model=torch.nn.Linear(8, 8)).weight.shape == (8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    script = f"""
import os, signal, sys, time, torch, compressx
from compressx import cli, export
def card(manifest):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
export._model_card = card
cli._cmd_show = lambda args: compressx.save(torch.nn.Linear(8, 8), {str(tmp_path / "exp")!r}) and 0
sys.exit(cli.main(["show", "x"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("terminated") and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- the loader reads only what it verified ------------------------------------------------------------------


def _edit_manifest(out, change):
    path = Path(out) / "compressx.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_load_never_falls_back_to_a_pickle(tiny_llama, tmp_path):
    out = compressx.save(tiny_llama, tmp_path / "exp")
    os.remove(Path(out) / "model.safetensors")
    torch.save(tiny_llama.state_dict(), Path(out) / "pytorch_model.bin")  # the file an attacker would plant
    _edit_manifest(out, lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(ExportError, match="cannot rebuild the model"):
        compressx.load(out)


def test_a_listed_pickle_is_refused(tiny_llama, tmp_path):
    out = compressx.save(tiny_llama, tmp_path / "exp")
    torch.save(tiny_llama.state_dict(), Path(out) / "pytorch_model.bin")
    _edit_manifest(out, lambda m: m["files"].update({"pytorch_model.bin": _sha(Path(out) / "pytorch_model.bin")}))
    with pytest.raises(ExportError, match="'pytorch_model.bin', which is not a safetensors, JSON or text file"):
        compressx.load(out)


def test_load_tokenizer_reads_only_verified_files(tiny_llama, bpe_tokenizer, tmp_path):
    out = compressx.save(tiny_llama, tmp_path / "exp", tokenizer=bpe_tokenizer)
    assert export_mod.load_tokenizer(out)("def f").input_ids == bpe_tokenizer("def f").input_ids
    tokenizer_json = Path(out) / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text() + " ")  # still valid JSON: only the hash notices
    with pytest.raises(ExportError, match="'tokenizer.json' is corrupt"):
        export_mod.load_tokenizer(out)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname.json", "a/../../outside.json", "./config.json"])
def test_file_entries_must_stay_inside_the_export(tmp_path, name):
    out = compressx.save(_linear(), tmp_path / "exp")
    (tmp_path / "outside.json").write_text("{}")
    _edit_manifest(out, lambda m: m["files"].update({name: _sha(tmp_path / "outside.json")}))
    with pytest.raises(ExportError, match=r"not a plain relative path inside the export"):
        compressx.load(out, model=torch.nn.Linear(8, 8))


def test_a_link_leaving_the_export_is_refused_before_reading(tmp_path, monkeypatch):
    out = compressx.save(_linear(), tmp_path / "exp")
    (tmp_path / "secret.json").write_text('{"token": "x"}')
    (Path(out) / "extra.json").symlink_to(tmp_path / "secret.json")
    _edit_manifest(out, lambda m: m["files"].update({"extra.json": _sha(tmp_path / "secret.json")}))
    read = []
    monkeypatch.setattr(manifest_mod, "_sha256", lambda path: read.append(path) or "0" * 64)
    with pytest.raises(ExportError, match="file 'extra.json' listed in compressx.json leads outside the export"):
        compressx.load(out, model=torch.nn.Linear(8, 8))
    assert read == []  # refused before any file was read


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (lambda m: m.pop("files"), "files is missing"),
        (lambda m: m.update(files=["model.safetensors"]), "files must be an object, not list"),
        (lambda m: m["files"].update({"model.safetensors": 7}), "files.model.safetensors must be str, not int"),
        (lambda m: m["files"].update({"model.safetensors": "abc"}), "is not a SHA-256"),
        (lambda m: m.pop("model"), "model is missing"),
        (lambda m: m["model"].update({"class": 3}), "model.class must be str, not int"),
        (lambda m: m.update(steps={"0": {}}), "steps must be a list, not dict"),
        (lambda m: m.update(steps=[{"pass": "magnitude"}]), r"steps\[0\].kind is missing"),
        (lambda m: m.update(eval={"after": {"ppl": "low"}}), "eval.after.ppl must be a number, not str"),
        (lambda m: m.update(versions=None), "versions must be an object, not NoneType"),
        (lambda m: m.update(format_version=1.0), "unknown format_version 1.0"),
        (lambda m: m.update(format_version=True), "unknown format_version True"),
        (lambda m: m.update(format_version="1"), "unknown format_version '1'"),
        (b"\xff\xfe{}", "not a UTF-8 JSON document"),
        (DEEP.encode(), "not a UTF-8 JSON document \\(too deeply nested\\)"),
        (b"[1, 2]", "unknown format_version None"),
    ],
)
def test_a_malformed_manifest_is_one_error_from_load_show_and_verify(tmp_path, capsys, manifest, message):
    out = compressx.save(_linear(), tmp_path / "exp")
    if isinstance(manifest, bytes):
        (Path(out) / "compressx.json").write_bytes(manifest)
    else:
        _edit_manifest(out, manifest)
    with pytest.raises(ExportError, match=message):
        compressx.load(out, model=torch.nn.Linear(8, 8))
    for command in (["show", out], ["verify", out], ["load", out]):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert re.search(message, err) and err.startswith("error: ") and "Traceback" not in err, err


def test_verify_expect_and_the_digest_printed_at_export(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="compressx.export"):
        out = compressx.save(_linear(), tmp_path / "exp")
    digest = _sha(Path(out) / "compressx.json")
    assert f"compressx.json SHA-256 {digest}" in caplog.text
    assert cli.main(["verify", out, "--expect", digest]) == 0
    assert f"3 file(s) match their SHA-256; compressx.json sha256 {digest}" in capsys.readouterr().out
    (Path(out) / "notes.txt").write_text("mine")
    assert cli.main(["verify", out]) == 0
    assert "not in the manifest, so never read by load: notes.txt" in capsys.readouterr().out
    _edit_manifest(out, lambda m: m.update(created="2020-01-01T00:00:00+00:00"))  # a changed manifest
    assert cli.main(["verify", out, "--expect", digest]) == 2
    assert "not the expected" in capsys.readouterr().err
    with pytest.raises(ExportError, match="not the expected"):
        compressx.load(out, model=torch.nn.Linear(8, 8), expect=digest)


# --- the zoo cache and the example's checkpoints ---------------------------------------------------------------


@pytest.mark.slow
def test_zoo_cache_detects_corruption_and_survives_a_killed_build(tmp_path, monkeypatch, caplog):
    from compressx import zoo
    from compressx.zoo import llama_byte

    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path))
    calls = []

    def quick_train(progress=True):
        calls.append(1)
        return llama_byte.train(steps=1, progress=False)

    member = dataclasses.replace(zoo.MEMBERS[llama_byte.NAME], train=quick_train)
    monkeypatch.setitem(zoo.MEMBERS, llama_byte.NAME, member)
    key_dir = zoo.cache_dir(member)
    key_dir.parent.mkdir(parents=True)
    (key_dir.parent / f".{key_dir.name}.build-killed").mkdir()  # what a killed build leaves
    first, _ = zoo.load_zoo_model(llama_byte.NAME, progress=False)
    assert calls == [1] and (key_dir / "sha256.json").is_file()
    assert [p.name for p in key_dir.parent.iterdir()] == [key_dir.name]
    weights = key_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte deep in a tensor: the file still parses
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="compressx.zoo"):
        again, _ = zoo.load_zoo_model(llama_byte.NAME, progress=False)
    assert calls == [1, 1] and "'model.safetensors' is corrupt" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(first.lm_head.weight, again.lm_head.weight)  # the build is deterministic
    os.remove(key_dir / "sha256.json")  # a build killed before its hashes were written
    zoo.load_zoo_model(llama_byte.NAME, progress=False)
    assert calls == [1, 1, 1] and "has no sha256.json" in caplog.text


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_nm_plain", ROOT / "examples" / "train_nm_plain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_checkpoint_is_safetensors_and_atomic(tmp_path, monkeypatch):
    example = _example()
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    path = str(tmp_path / "ckpt.safetensors")
    example.save_checkpoint(path, state)
    loaded = example.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["weight"], model.weight)
    momentum = optimizer.state[model.weight]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)  # int keys survive
    optimizer.load_state_dict(loaded["optimizer"])

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(example, "save_file", full_disk)
    with pytest.raises(OSError):
        example.save_checkpoint(path, dict(state, epoch=4))
    assert example.load_checkpoint(path)["epoch"] == 3  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_no_pickle_in_the_code():
    pattern = re.compile(r"torch\.load\(|import pickle|weights_only\s*=\s*False|from pickle")
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("compressx", "examples", "tools")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_a_model_directory_with_only_a_pickle_is_refused(tiny_llama, tmp_path):
    from compressx.errors import CompressxError
    from compressx.models import build_model, parse_model_spec

    tiny_llama.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save(tiny_llama.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    spec = parse_model_spec({"source": "hf", "id": str(tmp_path / "hf"), "kwargs": {"use_safetensors": False}})
    with pytest.raises(CompressxError, match="cannot build model hf:"):
        build_model(spec)


def test_overwrite_may_replace_an_empty_directory(tmp_path):
    (tmp_path / "exp").mkdir()
    compressx.save(_linear(), tmp_path / "exp", overwrite=True)
    assert _weight(tmp_path / "exp") == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
