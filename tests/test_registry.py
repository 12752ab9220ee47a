import dataclasses
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import compressx
from compressx.config import PassConfig
from compressx.errors import RegistryError
from compressx.registry import (
    Need,
    PassResult,
    build_registry,
    get_pass,
    list_passes,
    register_pass,
    summarize_report,
)


@dataclasses.dataclass(frozen=True)
class NoopConfig(PassConfig):
    pass


class UndecoratedConfig(PassConfig):  # forgot @dataclass: its field would be invisible to from_dict
    x: int = 1


def _mark(name="noop", **kw):
    kw = {"config": NoopConfig, "kind": "weights", "paper": "p", "families": ("any",), **kw}
    return register_pass(name, **kw)


def test_builtin_magnitude_is_registered():
    spec = get_pass("magnitude")
    assert spec.kind == "weights" and spec.takes_targets
    assert "magnitude" in [s.name for s in list_passes()]


def test_unknown_pass_suggests_closest():
    with pytest.raises(RegistryError, match="unknown pass 'magnitde'.*did you mean 'magnitude'"):
        get_pass("magnitde")


@pytest.mark.parametrize("name", ["Magnitude", "my-pass", "_x", "a__b", "2x", ""])
def test_malformed_names_are_rejected(name):
    with pytest.raises(RegistryError, match="snake_case"):
        _mark(name)


def test_contract_checks():
    with pytest.raises(RegistryError, match="kind 'oneshot'"):
        _mark(kind="oneshot")
    with pytest.raises(RegistryError, match=r"decorate UndecoratedConfig with @dataclasses.dataclass\(frozen=True\)"):
        _mark(config=UndecoratedConfig)
    with pytest.raises(RegistryError, match="PassConfig dataclass"):
        _mark(config=dict)
    with pytest.raises(RegistryError, match="exactly \\(model, config, ctx\\)"):
        _mark()(lambda model, config: None)
    with pytest.raises(RegistryError, match="unknown needs"):
        _mark(needs=("gpu",))


def _write_plugin(root, module, body):
    (root / f"{module}.py").write_text(textwrap.dedent(body))


PLUGIN = """
import dataclasses
from compressx import PassConfig, PassResult, register_pass

@dataclasses.dataclass(frozen=True)
class ScaleConfig(PassConfig):
    factor: float = 2.0

@register_pass("{name}", config=ScaleConfig, kind="weights", paper="test", families=("any",))
def apply_scale(model, config, ctx):
    return PassResult(report={{}})
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("cx_plugin_")]:
        del sys.modules[name]


def ep(name, value):
    return importlib.metadata.EntryPoint(name=name, value=value, group="compressx.passes")


def test_plugin_function_and_module_entry_points(plugin_path):
    _write_plugin(plugin_path, "cx_plugin_ok", PLUGIN.format(name="scale_weights"))
    for value in ("cx_plugin_ok:apply_scale", "cx_plugin_ok"):
        registry = build_registry(["compressx.passes.magnitude"], [ep("scale_weights", value)])
        assert set(registry) == {"magnitude", "scale_weights"}
        assert registry["scale_weights"].config.__name__ == "ScaleConfig"


def test_plugin_import_failure_names_the_plugin(plugin_path):
    _write_plugin(plugin_path, "cx_plugin_broken", "import not_a_real_module_xyz\n")
    with pytest.raises(RegistryError, match=r"plugin 'broken' \(cx_plugin_broken:apply\) failed to import"):
        build_registry([], [ep("broken", "cx_plugin_broken:apply")])


def test_plugin_duplicate_of_builtin_is_an_error(plugin_path):
    _write_plugin(plugin_path, "cx_plugin_dup", PLUGIN.format(name="magnitude"))
    with pytest.raises(RegistryError, match="duplicate pass name 'magnitude'.*plugin 'magnitude'"):
        build_registry(["compressx.passes.magnitude"], [ep("magnitude", "cx_plugin_dup:apply_scale")])


def test_plugin_must_define_the_pass_it_declares(plugin_path):
    _write_plugin(plugin_path, "cx_plugin_other", PLUGIN.format(name="other_name"))
    with pytest.raises(RegistryError, match="must point at the pass 'declared', found 'other_name'"):
        build_registry([], [ep("declared", "cx_plugin_other:apply_scale")])
    with pytest.raises(RegistryError, match="not a snake_case pass name"):
        build_registry([], [ep("Bad-Name", "cx_plugin_other:apply_scale")])


def _install_dist(root, name, entry, module_body):
    """Make an installed distribution on disk (dist-info with entry_points.txt) that importlib discovers."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[compressx.passes]\n{entry}\n")
    (root / f"{name}.py").write_text(textwrap.dedent(module_body))


def _cli(args, path):
    env = dict(os.environ, PYTHONPATH=str(path))
    return subprocess.run([sys.executable, "-m", "compressx.cli", *args], capture_output=True, text=True, env=env)


def test_entry_point_discovery_end_to_end(tmp_path):
    _install_dist(
        tmp_path, "cx_plugin_dist", "scale_weights = cx_plugin_dist:apply_scale", PLUGIN.format(name="scale_weights")
    )
    out = _cli(["list"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "scale_weights" in out.stdout and "magnitude" in out.stdout


def test_broken_installed_plugin_fails_loudly(tmp_path):
    _install_dist(tmp_path, "cx_plugin_bad", "bad_pass = cx_plugin_bad:apply", "raise RuntimeError('boom')\n")
    out = _cli(["list"], tmp_path)
    assert out.returncode == 2
    assert (
        "plugin 'bad_pass' (cx_plugin_bad:apply, from cx_plugin_bad 1.0) failed to import: RuntimeError: boom"
        in out.stderr
    )


def test_user_function_pass_runs_through_apply(tiny_llama):
    import compressx

    seen = {}

    @register_pass(
        "count_modules",
        config=NoopConfig,
        kind="weights",
        paper="test",
        families=("any",),
        target_types=(nn.Linear,),
    )
    def apply_count(model, config, ctx):
        seen["n"] = len(ctx.targets)
        return PassResult(report={"n": len(ctx.targets)})

    result = compressx.apply(tiny_llama, [{"pass": apply_count, "ignore": ["lm_head"]}])
    assert seen["n"] == 14 and result.steps[0].report == {"n": 14}


def test_the_report_line_names_the_modules_left_out_and_why(tiny_cnn):
    """'lbc on 4 module(s) … modules=2' says which two stay dense and why (a name → reason mapping is shown)."""
    result = compressx.apply(tiny_cnn, [{"pass": "lbc", "config": {"pattern": "2:4"}}], progress=False)
    line = summarize_report(result.steps[0].report)
    assert "modules=2" in line
    assert "dense_modules={stem: stem (skip_stem), head: classifier (skip_classifier)}" in line
    assert summarize_report({"sparsity": 0.5, "flops": {"ratio": 0.4}, "per_module": [1]}) == "sparsity=0.5"


@dataclasses.dataclass(frozen=True)
class RefineConfig(PassConfig):
    previous: bool = False


@dataclasses.dataclass(frozen=True)
class OldStyleConfig(RefineConfig):
    @property
    def needs_original_weights(self) -> bool:  # the attribute compressx read before needs= declared it
        return True


def test_needs_are_validated_strictly():
    with pytest.raises(RegistryError, match=r"unknown needs \['gpu'\]; allowed: calibration, original_weights"):
        _mark(needs=("gpu",))
    with pytest.raises(RegistryError, match="need 'calibration' declared twice"):
        _mark(needs=("calibration", "calibration"))
    with pytest.raises(RegistryError, match=r"needs is a tuple, e.g. needs=\('calibration',\)"):
        _mark(needs="calibration")
    with pytest.raises(RegistryError, match="takes a function of the config"):
        _mark(needs=(Need("original_weights", when=True),), target_types=(nn.Linear,))
    with pytest.raises(RegistryError, match="a pass without target_types has none"):
        _mark(needs=("original_weights",))
    with pytest.raises(RegistryError, match=r"OldStyleConfig.needs_original_weights is not read; declare"):
        _mark(config=OldStyleConfig, target_types=(nn.Linear,))


def test_original_weights_are_given_where_the_declared_condition_holds(tiny_llama):
    seen = []

    @_mark(
        "refine_test", config=RefineConfig, target_types=(nn.Linear,),
        needs=(Need("original_weights", when=lambda config: config.previous),),
    )  # fmt: skip
    def apply_refine_test(model, config, ctx):
        seen.append(ctx.original_weights)
        return PassResult(report={})

    spec = get_pass(apply_refine_test)
    assert spec.needs == ("original_weights",)
    assert spec.needs_for(RefineConfig(previous=True)) == ("original_weights",)
    assert spec.needs_for(RefineConfig(previous=False)) == ()
    dense = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().clone()
    prune = {"pass": "magnitude", "config": {"sparsity": 0.5}, "targets": ["model.layers.0.mlp.up_proj"]}
    step = {"pass": apply_refine_test, "targets": ["model.layers.0.mlp.up_proj"]}
    compressx.apply(tiny_llama, [prune, {**step, "config": {"previous": True}}, {**step, "config": {}}])
    assert list(seen[0]) == ["model.layers.0.mlp.up_proj"]
    assert torch.equal(seen[0]["model.layers.0.mlp.up_proj"], dense)  # copied before the first step pruned it
    assert seen[1] is None


def test_dsnot_needs_the_dense_weights_only_to_refine_the_previous_mask():
    spec = get_pass("dsnot")
    assert spec.needs_for(spec.config.from_dict({"init": "previous"})) == ("calibration", "original_weights")
    assert spec.needs_for(spec.config.from_dict({"init": "wanda", "sparsity": 0.5})) == ("calibration",)
