"""Every recipe shipped under recipes/ validates (meta device: no weights, no zoo build)."""

from pathlib import Path

import pytest

from compressx.recipe import load_recipe
from compressx.runner import check_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
OFFLINE = [p for p in RECIPES if "Not validated offline" not in p.read_text()]


@pytest.mark.parametrize("path", OFFLINE, ids=lambda p: p.name)
def test_shipped_recipe_validates(path, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path))
    recipe = load_recipe(path, [f"export.dir={tmp_path / 'out'}"])
    check_recipe(recipe)
    assert not any(tmp_path.iterdir())  # validation built nothing


@pytest.mark.parametrize("path", sorted(set(RECIPES) - set(OFFLINE)), ids=lambda p: p.name)
def test_hub_recipe_parses(path, tmp_path):
    recipe = load_recipe(path, [f"export.dir={tmp_path / 'out'}"])
    assert recipe.model.source in ("hf", "diffusers") and recipe.steps
