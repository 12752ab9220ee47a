import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_check_registry():
    spec = importlib.util.spec_from_file_location("check_registry", ROOT / "tools" / "check_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repository_is_consistent():
    assert _load_check_registry().problems() == []


def test_check_registry_reports_missing_pieces(tmp_path, monkeypatch):
    tool = _load_check_registry()
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    (tmp_path / "tests" / "passes").mkdir(parents=True)
    (tmp_path / "tests" / "passes" / "test_magnitude.py").write_text("")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.problems() == ["pass 'magnitude': docs/passes/magnitude.md is missing"]
    for recipe in (tmp_path / "recipes").rglob("*.yaml"):
        recipe.unlink()
    (tmp_path / "docs" / "passes").mkdir(parents=True)
    (tmp_path / "docs" / "passes" / "magnitude.md").write_text("")
    assert tool.problems() == ["pass 'magnitude': no recipe under recipes/ uses it"]
