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
    from compressx.registry import list_passes

    tool = _load_check_registry()
    names = [spec.name for spec in list_passes() if spec.origin.startswith("compressx.passes.")]
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for folder, pattern in (("tests/passes", "test_{}.py"), ("docs/passes", "{}.md")):
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / folder / pattern.format(name)).write_text("")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.problems() == []
    (tmp_path / "docs" / "passes" / "magnitude.md").unlink()
    assert tool.problems() == ["pass 'magnitude': docs/passes/magnitude.md is missing"]
    for recipe in (tmp_path / "recipes").rglob("*.yaml"):
        if "pass: wanda" in recipe.read_text():
            recipe.unlink()
    assert tool.problems() == [
        "pass 'magnitude': docs/passes/magnitude.md is missing",
        "pass 'wanda': no recipe under recipes/ uses it",
    ]
