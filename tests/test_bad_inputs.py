"""Every bad input gets one clean error: exit 2 and one line from the CLI, a ``CompressxError`` from the API.

Table-driven: bad recipes, bad overrides and bad exports through ``compressx validate`` / ``show`` / ``load``
(in-process, the model checked on the meta device as validate does), then bad API inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compressx
from compressx.cli import main
from compressx.data import sample_windows, stdlib_files
from compressx.errors import CompressxError, ConfigError, DataError

BASE = """
model: {source: zoo, id: llama_byte_1m, dtype: float32}
data: {calibration: {source: stdlib_text, split: train, samples: 4, seq_len: 64, seed: 0}}
steps:
  - pass: magnitude
    targets: ["re:.*mlp.*"]
    config: {sparsity: 0.5}
eval:
  - metric: perplexity
    data: {source: stdlib_text, split: test, samples: 4, seq_len: 64}
export: {dir: EXPORT}
"""


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(["-q", *args])
    return code, capsys.readouterr().err


def assert_one_clean_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def recipe(tmp_path):
    """Write BASE with replacements (``old -> new`` pairs) or raw bytes; returns the path."""

    def write(*replacements: tuple[str, str], text: str | None = None, raw: bytes | None = None) -> str:
        body = textwrap.dedent(BASE if text is None else text)
        for old, new in replacements:
            assert old in body, old
            body = body.replace(old, new)
        body = body.replace("EXPORT", str(tmp_path / "out"))
        path = tmp_path / "recipe.yaml"
        path.write_bytes(raw if raw is not None else body.encode())
        return str(path)

    return write


def test_base_recipe_validates(recipe, capsys):
    code, err = run_cli(["validate", recipe()], capsys)
    assert code == 0, err


# (id, replacements in BASE, expected fragments of the one error line)
BAD_VALUES = [
    ("dtype-list", [("dtype: float32", "dtype: [float32]")], ["model.dtype: got ['float32']", "allowed: float32"]),
    ("dtype-dict", [("dtype: float32", "dtype: {a: 1}")], ["model.dtype: got {'a': 1}"]),
    ("metric-list", [("metric: perplexity", "metric: [perplexity]")], ["eval[0].metric: unknown metric"]),
    ("source-list", [("source: stdlib_text, split: train", "source: [stdlib_text], split: train")],
     ["data.calibration.source: unknown data source"]),
    ("eval-source-dict", [("source: stdlib_text, split: test", "source: {a: b}, split: test")],
     ["eval[0].data.source: unknown data source"]),
    ("pass-list", [("pass: magnitude", "pass: [magnitude]")],
     ["steps[0].pass: got ['magnitude']; expected a pass name"]),
    ("class-list", [("source: zoo, id: llama_byte_1m", "source: hf, id: x, class: [LlamaForCausalLM]")],
     ["model.class: got ['LlamaForCausalLM']"]),
    ("samples-huge", [("samples: 4, seq_len: 64, seed: 0", "samples: 1000000000000, seq_len: 64, seed: 0")],
     ["data.calibration.samples: got 1000000000000", "<= 1,000,000"]),
    ("seq-len-huge", [("samples: 4, seq_len: 64, seed: 0", "samples: 4, seq_len: 100000000000, seed: 0")],
     ["data.calibration.seq_len", "<= 1,048,576"]),
    ("tokens-huge", [("samples: 4, seq_len: 64, seed: 0", "samples: 1000000, seq_len: 1000, seed: 0")],
     ["data.calibration.samples", "at most 268,435,456"]),
    ("seed-huge", [("seed: 0", "seed: 100000000000000000000000000000")],
     ["data.calibration.seed", "<= 4294967295"]),
    ("eval-seed-negative", [("split: test, samples: 4", "split: test, seed: -1, samples: 4")],
     ["eval[0].data.seed", ">= 0"]),
    ("export-dir-empty", [("dir: EXPORT", "dir: ''")], ["export: expected {dir: <directory>}, got {'dir': ''}"]),
    ("targets-empty", [('targets: ["re:.*mlp.*"]', "targets: []")],
     ["steps[0].targets: an empty list selects nothing; omit the key"]),
    ("zoo-kwargs", [("dtype: float32", "dtype: float32, kwargs: {attn_implementation: eager}")],
     ["model.kwargs: a zoo model takes no keyword arguments"]),
    ("interpolation-missing", [("dtype: float32", 'dtype: "${nope}"')],
     ["model.dtype: Interpolation key 'nope' not found"]),
    ("interpolation-env", [("dtype: float32", 'dtype: "${oc.env:COMPRESSX_SURELY_UNSET}"')],
     ["model.dtype: cannot resolve", "COMPRESSX_SURELY_UNSET"]),
    ("resolver-unknown", [("dtype: float32", 'dtype: "${nope:1}"')],
     ["model.dtype: Unsupported interpolation type nope; resolvers: oc.env"]),
    ("interpolation-recursive", [("dtype: float32", 'dtype: "${model.dtype}"')], ["model.dtype: cannot resolve"]),
    ("yaml-syntax", [("dtype: float32", "dtype: ${nope}")],
     ["cannot read YAML: line 2, column 49: did not find expected ',' or '}' (while parsing a flow mapping"]),
]  # fmt: skip


@pytest.mark.parametrize("replacements, fragments", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_recipe_value(recipe, capsys, replacements, fragments):
    assert_one_clean_error(*run_cli(["validate", recipe(*replacements)], capsys), *fragments)


def test_train_seed_out_of_range(capsys, tmp_path):
    path = Path(__file__).resolve().parents[1] / "recipes" / "cnn" / "sr_ste_resnet_digits.yaml"
    code, err = run_cli(["validate", str(path), f"export.dir={tmp_path / 'out'}", f"train.seed={10**29}"], capsys)
    assert_one_clean_error(code, err, "train.seed", "<= 4294967295")


def test_non_utf8_recipe(recipe, capsys):
    path = recipe(raw=textwrap.dedent(BASE).encode() + b"# caf\xe9\n")
    assert_one_clean_error(*run_cli(["validate", path], capsys), "line 12, column 6: byte 0xe9 is not UTF-8")


def test_oversized_recipe_is_refused_unparsed(recipe, capsys):
    path = recipe(raw=textwrap.dedent(BASE).encode() + b"# " + b"x" * (2 << 20) + b"\n")
    assert_one_clean_error(*run_cli(["validate", path], capsys), "larger than 1 MiB")


def test_many_values_are_not_called_an_alias_expansion(recipe, capsys):
    many = "[" + ", ".join(['"re:.*mlp.*"'] * 12_000) + "]"
    code, err = run_cli(["validate", recipe(('["re:.*mlp.*"]', many))], capsys)
    assert_one_clean_error(code, err, "more than 10000 values")
    assert "alias" not in err


def test_alias_bomb_is_refused(recipe, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdef", "bcdefg")
    )
    code, err = run_cli(["validate", recipe(text=BASE + bomb)], capsys)
    assert_one_clean_error(code, err, "YAML aliases (*name) expand the recipe to more than 10000 values")


@pytest.mark.parametrize(
    "depth, fragment",
    # 40 levels: refused by compressx's own bound; 1000: PyYAML >= 6.0.4 refuses it first, in its own words
    [(40, "nested more than 32 levels deep"), (1000, "nest")],
)
def test_deep_nesting_is_refused(recipe, capsys, depth, fragment):
    code, err = run_cli(["validate", recipe(text=BASE + "x: " + "[" * depth + "]" * depth + "\n")], capsys)
    assert_one_clean_error(code, err, fragment)


def test_empty_calibration_file(recipe, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    path = recipe(("source: stdlib_text, split: train", f"source: text_file, path: {tmp_path / 'empty.txt'}"))
    assert_one_clean_error(*run_cli(["validate", path], capsys), "data.calibration.path", "empty")


def test_seq_len_longer_than_the_text_file(recipe, capsys, tmp_path):
    (tmp_path / "short.txt").write_text("just forty bytes of text, nothing more.\n")
    path = recipe(("source: stdlib_text, split: train", f"source: text_file, path: {tmp_path / 'short.txt'}"))
    assert_one_clean_error(*run_cli(["validate", path], capsys), "data.calibration.path", "fewer than seq_len=64")


def test_seq_len_longer_than_the_stdlib_split(recipe, capsys):
    files = stdlib_files("test")
    seq_len = sum(f.stat().st_size for f in files) + len(files)  # the split joined with newlines, plus one
    if seq_len > 1 << 20:
        pytest.skip("this Python's stdlib test split is longer than the largest seq_len allowed")
    path = recipe(("split: test, samples: 4, seq_len: 64", f"split: test, samples: 4, seq_len: {seq_len}"))
    assert_one_clean_error(
        *run_cli(["validate", path], capsys), "eval[0].data.split", f"fewer than seq_len={seq_len:,}"
    )


def test_text_shorter_than_seq_len_at_load_time_is_a_data_error():
    with pytest.raises(DataError, match="fewer than seq_len=8"):
        sample_windows(torch.arange(5), samples=2, seq_len=8, seed=0)


BAD_OVERRIDES = [
    ("list-by-name", "steps.x.pass=magnitude", ["steps is a list of 1 item(s)", "e.g. steps.0.pass"]),
    ("list-by-name-brackets", "eval[x].metric=perplexity", ["eval is a list of 1 item(s)", "e.g. eval.0.metric"]),
    ("list-past-end", "steps.3.config.sparsity=0.1", ["steps is a list of 1 item(s), indexed by number (0 to 0)"]),
    ("unsupported-value", "model.dtype=2020-01-01", ["override 'model.dtype=2020-01-01'", "date"]),
    ("deep-value", "model.kwargs=" + "[" * 200 + "]" * 200, ["nested more than 32 levels deep"]),
    ("dtype-list", "model.dtype=[float32]", ["model.dtype: got ['float32']"]),
    ("no-equals", "steps.0.pass", ["not of the form key.path=value"]),
]


@pytest.mark.parametrize("override, fragments", [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_override(recipe, capsys, override, fragments):
    assert_one_clean_error(*run_cli(["validate", recipe(), override], capsys), *fragments)


def test_validate_runs_no_code_shipped_with_a_model(tmp_path, capsys):
    model_dir, marker = tmp_path / "custom_model", tmp_path / "code-ran"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "cx_custom", "auto_map": {"AutoConfig": "configuration_cx.CxConfig"}})
    )
    (model_dir / "configuration_cx.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CxConfig(PretrainedConfig):\n    model_type = 'cx_custom'\n"
    )
    text = BASE.replace(
        "source: zoo, id: llama_byte_1m", f"source: hf, id: {model_dir}, kwargs: {{trust_remote_code: true}}"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("EXPORT", str(tmp_path / "out")))
    code, err = run_cli(["validate", str(path)], capsys)
    assert not marker.exists(), "validate ran the model directory's Python code"
    assert_one_clean_error(code, err, "model.kwargs.trust_remote_code: validate never runs Python code")


def test_pathological_target_regex_is_bounded(tmp_path):
    # Python's re backtracks for hours on these and cannot be interrupted: run in a child with a time limit.
    script = textwrap.dedent(
        """
        import torch.nn as nn
        from compressx.errors import TargetError
        from compressx.targets import select_targets

        model = nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList(
            nn.ModuleDict({"mlp": nn.ModuleDict({"down_proj": nn.Linear(2, 2)})}) for _ in range(2))})})
        for pattern in ["re:(.*.*.*.*)*(.*.*.*)*(x+x+)+y", "re:(.|.)*y"]:
            try:
                select_targets(model, [pattern], None, (nn.Linear,))
            except TargetError as err:
                print(err)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(compressx.__file__).resolve().parents[1]))  # the code under test
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert "matches no module" in first
    assert "backtracks without bound" in second and "write a simpler one" in second


BAD_EXPORTS = [
    ("no-manifest", None, ["is not a compressx export"]),
    ("manifest-a-list", b"[]", ["compressx.json"]),
    ("format-version-string", b'{"format_version": "1.0"}', ["format_version"]),
    ("non-utf8", b'{"a": "\xe9"}', ["compressx.json"]),
    ("format-version-true", b'{"format_version": true, "files": {}}', ["format_version"]),
]  # fmt: skip


@pytest.mark.parametrize("command", ["show", "load"])
@pytest.mark.parametrize("name, manifest, fragments", BAD_EXPORTS)
def test_bad_export(tmp_path, capsys, command, name, manifest, fragments):
    export = tmp_path / name
    export.mkdir()
    if manifest is not None:
        (export / "compressx.json").write_bytes(manifest)
    assert_one_clean_error(*run_cli([command, str(export)], capsys), *fragments)


@pytest.mark.parametrize(
    "recipe_yaml",
    [b"eval: [\n", b"eval: \xe9\n", b"eval: {metric: perplexity}\n", b"- just a list\n", b"eval: [{metric: [x]}]\n"],
    ids=["yaml-syntax", "non-utf8", "eval-not-a-list", "not-a-mapping", "metric-list"],
)
def test_bad_recipe_in_an_export_is_one_error_from_load_eval(tiny_llama, tmp_path, capsys, recipe_yaml):
    export = compressx.save(tiny_llama, tmp_path / "exp")
    (Path(export) / "recipe.yaml").write_bytes(recipe_yaml)
    # Listed with its hash, as if compressx had written it: load --eval reads only verified files.
    manifest = json.loads((Path(export) / "compressx.json").read_text())
    manifest["files"]["recipe.yaml"] = hashlib.sha256(recipe_yaml).hexdigest()
    (Path(export) / "compressx.json").write_text(json.dumps(manifest))
    capsys.readouterr()  # the export's own progress output
    code, err = run_cli(["load", export, "--eval", "--no-progress"], capsys)
    if recipe_yaml.startswith(b"- "):  # no eval recorded: nothing to re-run
        assert_one_clean_error(code, err, "records no eval to re-run")
    else:
        assert_one_clean_error(code, err, "recipe.yaml" if b"metric: [" not in recipe_yaml else "metric")


# --- the Python API ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fragment",
    [
        (torch.zeros(0, 8, dtype=torch.long), "is empty"),
        (torch.rand(2, 8), "must hold integer token ids"),
        (torch.full((2, 8), 64), "token ids from 64 to 64; the model's vocabulary is 0 to 63"),
        (torch.full((2, 8), -1), "token ids from -1 to -1"),
        (torch.zeros(16, dtype=torch.long), "expected [samples, seq_len] token ids"),
        ([], "empty list"),
        ("some text", "expected a token tensor, model-input mappings or a dataset, got str"),
    ],
    ids=["empty", "float", "past-vocabulary", "negative", "1-d", "empty-list", "text"],
)
def test_bad_calibration_data_is_a_data_error(tiny_llama, data, fragment):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(DataError) as caught:
        compressx.apply(tiny_llama, [{"pass": "wanda", "config": {"sparsity": 0.5}}], data=data, progress=False)
    assert isinstance(caught.value, CompressxError) and fragment in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())  # nothing was changed


def test_good_calibration_data_still_runs(tiny_llama):
    data = torch.randint(0, 64, (2, 8))
    result = compressx.apply(tiny_llama, [{"pass": "wanda", "config": {"sparsity": 0.5}}], data=data, progress=False)
    assert result.steps[0].report["sparsity"] > 0


@pytest.mark.parametrize("by", ["name", "function"])
def test_empty_targets_in_the_api_is_an_error(tiny_llama, by):
    from compressx.passes.magnitude import apply_magnitude

    step = {"pass": "magnitude" if by == "name" else apply_magnitude, "targets": [], "config": {"sparsity": 0.5}}
    with pytest.raises(ConfigError, match=r"steps\[0\]\.targets: an empty list selects nothing"):
        compressx.apply(tiny_llama, [step], progress=False)
    assert all((p != 0).all() for p in tiny_llama.parameters())  # not the whole model pruned
