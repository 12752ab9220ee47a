"""``compressx push`` / ``compressx.push_to_hub`` and ``export.push_to_hub``, against a local fake Hub
(tests/fake_hub.py) that the real huggingface_hub client talks to: what it receives, and every failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants

import compressx
from compressx import cli
from compressx.errors import ExportError, PushError, RecipeError
from compressx.push import repo_id_problem

push_to_hub = compressx.push_to_hub

PRUNE = [{"pass": "magnitude", "config": {"sparsity": 0.5, "pattern": "2:4"}}]


@pytest.fixture
def export(tmp_path, tiny_llama):
    result = compressx.apply(tiny_llama, PRUNE)
    evals = {
        "before": {"perplexity (stdlib_text/test, 8x32)": 60.0},
        "after": {"perplexity (stdlib_text/test, 8x32)": 61.5},
    }
    return Path(compressx.save(tiny_llama, tmp_path / "exp", result, eval_results=evals))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub as huggingface_hub's endpoint, a token in HF_TOKEN, and uploads on the LFS path: hf_xet is
    installed, and huggingface_hub uploads LFS files through it unless HF_HUB_DISABLE_XET is set (read into
    ``constants`` at import, and by ``is_xet_available()`` at each upload)."""
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
        yield fake


def _no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_uploads_the_verified_export_in_one_commit(export, hub):
    (export / "notes.txt").write_text("mine, not the export's")  # unlisted: never published
    pushed = push_to_hub(export, "alice/tiny-2of4", private=True, commit_message="first")
    manifest = json.loads((export / "compressx.json").read_text())
    expected = {name: (export / name).read_bytes() for name in [*manifest["files"], "compressx.json"]}
    assert hub.files("alice/tiny-2of4") == expected  # byte for byte, and nothing else
    assert len(hub.commits) == 1 and hub.commits[0]["message"] == "first"
    assert hub.repos["alice/tiny-2of4"]["private"] is True
    assert set(hub.lfs.values()) == {expected["model.safetensors"]}  # the weights went the LFS way, not xet
    assert any(method == "PUT" for method, _ in hub.requests)
    assert set(hub.tokens) == {"Bearer hf_fake_token"}
    assert hub.cards == [expected["README.md"].decode()] * len(hub.cards) and hub.cards  # validated by the Hub
    assert pushed.commit_url.startswith(hub.url) and set(pushed.files) == set(expected)
    assert pushed.skipped == ("notes.txt",)
    assert pushed.card["library_name"] == "transformers" and "2:4" in pushed.card["tags"]
    # what was pushed loads back with compressx (the hashes hold)
    download = export.parent / "download"
    download.mkdir()
    for name, data in hub.files("alice/tiny-2of4").items():
        (download / name).write_bytes(data)
    compressx.load(download)


def test_push_to_a_branch_and_into_an_existing_repo(export, hub):
    push_to_hub(export, "alice/tiny")
    push_to_hub(export, "alice/tiny", revision="pruned")  # the repo exists: create_repo(exist_ok) passes
    assert set(hub.repos["alice/tiny"]["branches"]) == {"main", "pruned"}
    assert [c["revision"] for c in hub.commits] == ["main", "pruned"]


def test_dry_run_sends_nothing_and_the_cli_prints_files_and_card(export, hub, capsys):
    (export / "notes.txt").write_text("mine")
    assert cli.main(["push", str(export), "--repo-id", "alice/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == []
    assert "dry run: would upload 5 file(s)" in out and "model.safetensors" in out
    assert "not uploaded (the manifest does not list them): notes.txt" in out
    assert "library_name: transformers" in out and "pipeline_tag: text-generation" in out


def test_the_cli_pushes(export, hub, capsys):
    args = ["push", str(export), "--repo-id", "alice/cli", "--private", "--revision", "dev", "--commit-message", "m"]
    assert cli.main(args) == 0
    assert "pushed 5 file(s)" in capsys.readouterr().out
    assert hub.commits[0]["revision"] == "dev" and hub.commits[0]["message"] == "m"


def test_a_corrupt_export_is_never_published(export, hub):
    data = bytearray((export / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (export / "model.safetensors").write_bytes(data)
    with pytest.raises(ExportError, match="model.safetensors' is corrupt"):
        push_to_hub(export, "alice/tiny")
    assert hub.requests == []


@pytest.mark.parametrize(
    "repo_id", ["alice", "alice/", "/x", "a/b/c", "alice/-x", "alice/x.git", "alice/a--b", "alice/sp ace", 3]
)
def test_bad_repo_ids_are_refused(export, hub, repo_id, capsys):
    assert repo_id_problem(repo_id)
    with pytest.raises(PushError, match="repo_id"):
        push_to_hub(export, repo_id)
    assert hub.requests == []


def test_no_token_is_one_clear_error(export, hub, monkeypatch, tmp_path, capsys):
    _no_token(monkeypatch, tmp_path)
    assert cli.main(["push", str(export), "--repo-id", "alice/tiny"]) == 2
    err = capsys.readouterr().err
    assert "no" in err and "token" in err and "hf auth login" in err and "Traceback" not in err
    assert hub.requests == []


def test_offline_mode_is_one_clear_error(export, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(export, "alice/tiny")
    assert hub.requests == []


@pytest.mark.parametrize(
    ("endpoint", "status", "expected"),
    [
        ("create", 401, "refused the token \\(HTTP 401.*hf auth login"),
        ("create", 403, "may not write to alice/tiny \\(HTTP 403.*write access"),
        ("create", 500, "the Hub failed \\(HTTP 500.*run the push again"),
        ("preupload", 403, "may not write to alice/tiny \\(HTTP 403"),
    ],
)
def test_http_failures_are_clear_errors_and_the_push_can_be_rerun(export, hub, endpoint, status, expected, capsys):
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    hub.fail[endpoint] = status
    assert cli.main(["push", str(export), "--repo-id", "alice/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(PushError, match=expected):
        push_to_hub(export, "alice/tiny")
    assert hub.commits == []
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before  # nothing local changed
    hub.fail.clear()
    push_to_hub(export, "alice/tiny")  # the same push, run again, goes through
    assert len(hub.commits) == 1


def test_commit_failure_publishes_nothing_and_can_be_rerun(export, hub):
    hub.fail["commit"] = 500
    with pytest.raises(PushError, match="HTTP 500"):
        push_to_hub(export, "alice/tiny")
    assert hub.files("alice/tiny") == {}
    hub.fail.clear()
    push_to_hub(export, "alice/tiny")
    assert "model.safetensors" in hub.files("alice/tiny")


def test_connection_refused_is_one_clear_error(export, hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PushError, match="cannot reach the Hub at http://127.0.0.1.*check the network"):
        push_to_hub(export, "alice/tiny")


def _recipe(tmp_path, push, **export):
    return {
        "model": {"source": "zoo", "id": "llama_byte_1m"},
        "steps": [{"pass": "magnitude", "ignore": ["lm_head"], "config": {"sparsity": 0.5}}],
        "export": {"dir": str(tmp_path / "out"), "push_to_hub": push, **export},
    }


@pytest.mark.parametrize(
    ("push", "expected"),
    [
        ({"repo_id": "not-a-repo"}, "export.push_to_hub.repo_id: repo_id 'not-a-repo' is not of the form USER/NAME"),
        ({"repo_id": "a/b", "private": "yes"}, "export.push_to_hub.private: got 'yes'; expected true or false"),
        ({"repo_id": "a/b", "branch": "x"}, "export.push_to_hub.branch: unknown key"),
        ("alice/x", "export.push_to_hub: expected a mapping"),
    ],
)
def test_recipe_push_block_errors(tmp_path, push, expected):
    from compressx.recipe import parse_recipe

    with pytest.raises(RecipeError) as err:
        parse_recipe(_recipe(tmp_path, push))
    assert expected in str(err.value)


def test_validate_checks_the_token_when_pushing_is_asked(tmp_path, monkeypatch, capsys, zoo_cache):
    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    _no_token(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, {"repo_id": "alice/x", "private": True})))
    assert cli.main(["validate", str(path)]) == 2
    assert "export.push_to_hub: pushing needs a Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert cli.main(["validate", str(path)]) == 0


@pytest.mark.slow  # builds (or reads from the cache) the zoo's llama_byte_1m and runs the recipe
def test_a_zoo_recipe_with_push_to_hub_pushes_after_the_export(tmp_path, hub, monkeypatch, zoo_cache, capsys):
    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llm" / "magnitude_llama_byte.yaml"
    overrides = [
        f"export.dir={tmp_path / 'out'}",
        "export.push_to_hub.repo_id=alice/llama-byte-pruned",
        "export.push_to_hub.private=true",
        "export.push_to_hub.commit_message=zoo",
        "eval.0.data.samples=4",
    ]
    assert cli.main(["apply", str(recipe), *overrides, "--no-progress"]) == 0
    assert "pushed to the Hub: alice/llama-byte-pruned" in capsys.readouterr().out
    out = tmp_path / "out"
    manifest = compressx.read_manifest(out)
    files = hub.files("alice/llama-byte-pruned")
    assert set(files) == {*manifest["files"], "compressx.json"}
    assert "tokenizer.json" in files  # the zoo's byte tokenizer, loadable with AutoTokenizer
    assert all(files[name] == (out / name).read_bytes() for name in files)
    assert hub.commits[0]["message"] == "zoo" and hub.repos["alice/llama-byte-pruned"]["private"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.eval_results
    assert "push_to_hub" in files["recipe.yaml"].decode()


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_push_reads_hf_endpoint_and_hf_token_from_the_environment(export, tmp_path):
    """The CLI in a fresh process: the endpoint and token come from the usual environment variables."""
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_env", "HF_HUB_DISABLE_XET": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        run = subprocess.run(
            [sys.executable, "-m", "compressx", "push", str(export), "--repo-id", "bob/tiny"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert set(hub.tokens) == {"Bearer hf_env"} and "model.safetensors" in hub.files("bob/tiny")
