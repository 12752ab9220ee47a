"""The zoo's digits ViT (the ViT PTQ proxy) and image calibration data in recipes."""

from pathlib import Path

import pytest
import torch

from compressx import zoo
from compressx.data import load_calibration, parse_calibration_spec
from compressx.errors import ConfigError
from compressx.images import ImageDataSpec, parse_image_data_spec
from compressx.ops.vit_quant import find_layout

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "vit"


def test_vit_digits_is_registered_and_its_vit_is_found():
    from compressx.models import build_model, parse_model_spec
    from compressx.zoo import vit_digits

    member = zoo.get_member(vit_digits.NAME)
    assert member.family == "vit" and member.tokenizer() is None
    loaded = build_model(parse_model_spec({"source": "zoo", "id": "vit_digits"}), meta=True)
    assert type(loaded.model) is vit_digits.ViTDigits and loaded.family == "vit"
    torch.manual_seed(0)
    model = vit_digits.build_empty().eval()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    layout = find_layout(model)
    assert layout.family == "timm_vit" and len(layout.blocks) == 4
    assert layout.post_layernorm[0] == ("vit.blocks.0.norm1", ["vit.blocks.0.attn.qkv"])
    assert layout.head == "vit.head" and layout.patch_embed == "vit.patch_embed.proj"


def test_image_calibration_block_gives_a_dataset():
    spec = parse_calibration_spec({"source": "digits", "split": "train", "noise": 0.3})
    assert isinstance(spec, ImageDataSpec)
    data = load_calibration(spec, None)
    image, label = data[0]
    assert image.shape == (1, 8, 8) and len(data) == 1257
    with pytest.raises(ConfigError, match="unknown key 'samples'"):
        parse_calibration_spec({"source": "digits", "samples": 10})
    assert parse_calibration_spec({"source": "stdlib_text", "samples": 2, "seq_len": 8}).samples == 2


def test_image_folder_augment_key():
    spec = parse_image_data_spec({"source": "image_folder", "path": "/x", "split": "train", "augment": False})
    assert spec.augment is False and spec.to_dict()["augment"] is False
    assert "augment" not in parse_image_data_spec({"source": "image_folder", "path": "/x"}).to_dict()
    with pytest.raises(ConfigError, match="true or false"):
        parse_image_data_spec({"source": "image_folder", "path": "/x", "augment": "no"})


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_zoo_recipe_runs_exports_and_reloads(zoo_cache, monkeypatch, tmp_path):
    """The offline recipe end to end (builds vit_digits on first use: a few minutes of one thread)."""
    import compressx
    from compressx.api import run_recipe
    from compressx.evaluate import evaluate
    from compressx.recipe import load_recipe

    monkeypatch.setenv("COMPRESSX_CACHE", zoo_cache)
    recipe = load_recipe(RECIPES / "repq_vit_vit_digits.yaml", [f"export.dir={tmp_path / 'out'}"])
    run = run_recipe(recipe, progress=False)
    label = next(iter(run.eval_after))
    assert run.eval_before[label] > 70
    reloaded = compressx.load(run.export_dir)
    assert evaluate(reloaded, None, list(recipe.eval), progress=False) == run.eval_after
