"""Every recipe error gives its message (file, path, allowed values, closest match) and exit status 2."""

import textwrap

import pytest

from compressx.cli import main
from compressx.errors import RecipeError
from compressx.recipe import load_recipe

GOOD = """
model: {source: zoo, id: llama_byte_1m}
steps:
  - pass: magnitude
    targets: ["re:.*mlp.*"]
    ignore: ["lm_head"]
    config: {sparsity: 0.5, pattern: unstructured}
eval:
  - metric: perplexity
    data: {source: stdlib_text, split: test, samples: 4, seq_len: 32}
export: {dir: EXPORT}
"""


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "recipe.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).replace("EXPORT", str(tmp_path / "out")))
        return str(path)

    return write


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_recipe_validates_without_building_the_model(write, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["validate", write(GOOD)], capsys)
    assert code == 0, err
    assert "ok (1 step(s): magnitude)" in out
    assert not (tmp_path / "cache").exists()  # the zoo model was not built: meta device only


def test_resolved_recipe_keeps_defaults(write):
    recipe = load_recipe(write(GOOD))
    assert recipe.steps[0].config.scope == "layer"
    assert recipe.to_dict()["steps"][0] == {
        "pass": "magnitude",
        "targets": ["re:.*mlp.*"],
        "ignore": ["lm_head"],
        "config": {"sparsity": 0.5, "pattern": "unstructured", "scope": "layer"},
    }


BAD = [
    # (edit of GOOD, expected fragments of the message)
    (
        ("sparsity: 0.5", "sparsty: 0.5"),
        [
            "steps[0].config.sparsty",
            "unknown key 'sparsty'",
            "allowed: pattern, scope, sparsity",
            "did you mean 'sparsity'?",
        ],
    ),
    (("pass: magnitude", "pass: magnitud"), ["steps[0].pass", "unknown pass 'magnitud'", "did you mean 'magnitude'?"]),
    (("    ignore:", "    ignor:"), ["steps[0].ignor", "unknown key 'ignor'", "did you mean 'ignore'?"]),
    (("model:", "modle:"), ["modle: unknown key 'modle'", "did you mean 'model'?"]),
    (("sparsity: 0.5", "sparsity: 1.5"), ["steps[0].config.sparsity", "[0, 1)"]),
    (("sparsity: 0.5", "sparsity: lots"), ["steps[0].config.sparsity", "got 'lots'; expected number or null"]),
    (("pattern: unstructured", "pattern: 2:4"), ["steps[0].config.pattern", "got 124", "quote it"]),
    (("source: zoo", "source: hub"), ["model.source", "allowed: hf, timm, diffusers, zoo"]),
    (
        ("metric: perplexity", "metric: perplexty"),
        [
            "eval[0].metric",
            "unknown metric 'perplexty'; allowed: lm_eval, perplexity, top1, vqa_accuracy; did you mean 'perplexity'?",
        ],
    ),
    (("split: test", "split: tests"), ["eval[0].data.split", "allowed: train, val, test"]),
    (("re:.*mlp.*", "re:.*mpl.*"), ["steps[0].targets[0]", "matches no module"]),
    (('ignore: ["lm_head"]', 'ignore: ["lm_haed"]'), ["steps[0].ignore[0]", "did you mean 'lm_head'?"]),
    (("id: llama_byte_1m", "id: llama_bytes"), ["model:", "unknown zoo model 'llama_bytes'", "did you mean"]),
    (
        ("export: {dir: EXPORT}", "export: {dir: EXPORT, sparse_format: zip}"),
        ["export.sparse_format", "got 'zip'; allowed: none, bitmask"],
    ),
]


@pytest.mark.parametrize("edit, fragments", BAD, ids=[b[0][1] for b in BAD])
def test_bad_recipe_names_the_problem_and_exits_2(write, capsys, edit, fragments):
    path = write(GOOD.replace(*edit))
    code, out, err = run_cli(["validate", path], capsys)
    assert code == 2
    assert path in err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err


def test_export_sparse_format(write):
    assert load_recipe(write(GOOD)).export.sparse_format == "none"
    recipe = load_recipe(write(GOOD), ["export.sparse_format=bitmask"])
    assert recipe.export.sparse_format == "bitmask" and recipe.to_dict()["export"]["sparse_format"] == "bitmask"


def test_several_problems_are_all_reported(write, capsys):
    path = write(GOOD.replace("sparsity: 0.5", "sparsty: 0.5").replace("metric: perplexity", "metric: bleu"))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "2 problem(s)" in err and "sparsty" in err and "bleu" in err


def test_every_problem_of_one_step_config_is_reported(write, capsys):
    path = write(GOOD.replace("sparsity: 0.5, pattern: unstructured", "sparsty: 0.5, pattern: 2:4"))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "2 problem(s)" in err, err
    assert "steps[0].config.sparsty: unknown key 'sparsty'" in err and "did you mean 'sparsity'?" in err
    assert "steps[0].config.pattern: got 124 (int)" in err and 'quote it, "2:4"' in err


def test_overrides_are_applied_and_validated(write, capsys):
    recipe = load_recipe(write(GOOD), ["steps.0.config.sparsity=0.7", 'steps.0.config.pattern="unstructured"'])
    assert recipe.steps[0].config.sparsity == 0.7
    code, _, err = run_cli(["validate", write(GOOD), "steps.0.config.sparsty=0.6"], capsys)
    assert code == 2 and "did you mean 'sparsity'?" in err
    code, _, err = run_cli(["validate", write(GOOD), "steps.0.config.sparsity"], capsys)
    assert code == 2 and "not of the form key.path=value" in err


def test_existing_export_dir_is_reported_before_any_work(write, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(["validate", write(GOOD)], capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    assert run_cli(["validate", write(GOOD), "--overwrite"], capsys)[0] == 0


def test_unwritable_export_dir(write, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(["validate", write(GOOD.replace("EXPORT", str(blocker / "sub" / "x")))], capsys)
    assert code == 2 and f"{blocker} is a file, not a directory" in err


def test_missing_and_malformed_files(tmp_path, capsys):
    code, _, err = run_cli(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "no such recipe file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    code, _, err = run_cli(["validate", str(bad)], capsys)
    assert code == 2 and "cannot read YAML" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: {source: zoo, id: llama_byte_1m}\n")
    code, _, err = run_cli(["validate", str(empty)], capsys)
    assert code == 2 and "non-empty list of steps" in err


def test_nm_on_an_indivisible_layer_is_caught_by_validate(write, capsys):
    # every Linear of the zoo model has an input dim divisible by 4, but not by 256
    path = write(GOOD.replace("pattern: unstructured", 'pattern: "1:256"').replace("sparsity: 0.5", "sparsity: null"))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "not divisible by M=256" in err


def test_parse_error_type():
    from compressx.recipe import parse_recipe

    with pytest.raises(RecipeError) as err:
        parse_recipe({"steps": [{"pass": "magnitude", "config": {"sparsity": 2}}]}, "x.yaml")
    assert err.value.problems == ["steps[0].config.sparsity: got 2.0; sparsity must be in [0, 1)"]


TRAINING = """
model: {source: zoo, id: resnet_digits, pretrained: false}
steps:
  - pass: lbc
    config: {pattern: "2:4", end_epoch: 2}
train:
  data: {source: digits, split: train, train_images: 200}
  epochs: 4
  optimizer: {name: sgd, lr: 0.05}
eval:
  - metric: top1
    data: {source: digits, split: test}
export: {dir: EXPORT, sparse_format: nm}
"""

MAGNITUDE_STEP = "  - pass: magnitude\n    config: {sparsity: 0.5}\n"


def test_training_recipe_validates_on_the_meta_model(write, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSX_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["validate", write(TRAINING)], capsys)
    assert code == 0, err
    assert "ok (1 step(s): lbc)" in out
    assert not (tmp_path / "cache").exists()
    # The N:M layer rules are checked on the meta model too: layer1 of resnet_digits has 16 input channels.
    overrides = ['steps.0.config.pattern="1:32"', "steps.0.config.incompatible=error"]
    code, _, err = run_cli(["validate", write(TRAINING), *overrides], capsys)
    assert code == 2 and "steps[0]" in err and "layer1.conv1" in err and "not divisible by M=32" in err, err


def test_training_recipe_round_trips_through_to_dict(write):
    from compressx.recipe import parse_recipe

    recipe = load_recipe(write(TRAINING))
    resolved = recipe.to_dict()
    assert resolved["train"]["data"] == {
        "source": "digits",
        "split": "train",
        "train_images": 200,
        "noise": 0.0,
        "seed": 0,
    }
    assert resolved["train"]["optimizer"]["name"] == "sgd" and resolved["train"]["optimizer"]["lr"] == 0.05
    assert resolved["train"]["schedule"] == {"name": "cosine", "warmup_epochs": 0}
    assert resolved["model"] == {"source": "zoo", "id": "resnet_digits", "dtype": "float32", "pretrained": False}
    again = parse_recipe(resolved, recipe.source)
    assert again == recipe
    assert again.to_dict() == resolved


@pytest.mark.parametrize(
    "edit, fragment",
    [
        # two training steps
        (("steps:\n", "steps:\n  - pass: sr_ste\n"), "steps: a recipe takes one training pass, as its last step"),
        # a training step that is not the last one
        (("export:", "XX"), "steps: a recipe takes one training pass, as its last step; got training steps [0]"),
        # a training step without a train block
        (("train:\n", "unused:\n"), "train: steps[0] is a training pass ('lbc'); add a train block"),
    ],
    ids=["two-training-steps", "training-step-not-last", "no-train-block"],
)
def test_train_block_rules(write, capsys, edit, fragment):
    text = TRAINING.replace(*edit)
    if edit[1] == "XX":  # a weights pass after the training pass
        text = TRAINING.replace(
            'config: {pattern: "2:4", end_epoch: 2}\n', 'config: {pattern: "2:4", end_epoch: 2}\n' + MAGNITUDE_STEP
        )
    if edit[1] == "unused:\n":  # drop the whole train block
        text = "\n".join(
            line
            for line in TRAINING.splitlines()
            if not line.startswith(("train:", "  data:", "  epochs:", "  optimizer:"))
        )
    code, _, err = run_cli(["validate", write(text)], capsys)
    assert code == 2 and fragment in err, err
    assert "Traceback" not in err


def test_train_block_without_a_training_step(write, capsys):
    text = TRAINING.replace('  - pass: lbc\n    config: {pattern: "2:4", end_epoch: 2}\n', MAGNITUDE_STEP)
    code, _, err = run_cli(["validate", write(text)], capsys)
    assert code == 2 and "train: the train block drives a training pass (lbc, spre, ...), but no step is one" in err


def test_null_train_block_with_a_training_step_is_an_error(write, capsys):
    # `train:` present but empty (or `train=null` as an override) leaves the training step without a trainer:
    # it must be reported like a missing block, not run as a recipe whose handle is never driven nor finalized.
    code, _, err = run_cli(["validate", write(TRAINING), "train=null"], capsys)
    assert code == 2 and "add a train block" in err, err


def test_bad_train_block_names_its_path(write, capsys):
    code, _, err = run_cli(["validate", write(TRAINING), "train.optimizer.lrr=0.1"], capsys)
    assert code == 2 and "train.optimizer.lrr: unknown key 'lrr'" in err and "did you mean 'lr'?" in err
    code, _, err = run_cli(["validate", write(TRAINING), "train.schedule.warmup_epochs=4"], capsys)
    assert code == 2 and "train.schedule.warmup_epochs: got 4; must be < epochs (4)" in err
    code, _, err = run_cli(["validate", write(TRAINING), "train.data.split=val"], capsys)
    assert code == 2 and "train.data.split" in err


def test_unknown_top_level_train_key_path_has_one_dot(write, capsys):
    code, _, err = run_cli(["validate", write(TRAINING), "train.epoch=3"], capsys)
    assert code == 2 and "train.epoch: unknown key 'epoch'" in err, err  # not "train..epoch"


def test_top1_and_perplexity_apply_to_their_model_families(write, capsys):
    llm_with_top1 = GOOD.replace(
        "  - metric: perplexity\n    data: {source: stdlib_text, split: test, samples: 4, seq_len: 32}",
        "  - metric: top1\n    data: {source: digits, split: test}",
    )
    code, _, err = run_cli(["validate", write(llm_with_top1)], capsys)
    assert code == 2 and "eval[0]: metric 'top1' applies to cnn, vit, any models, not to this llm model" in err, err
    cnn_with_perplexity = TRAINING.replace(
        "  - metric: top1\n    data: {source: digits, split: test}",
        "  - metric: perplexity\n    data: {source: stdlib_text, split: test, samples: 4, seq_len: 32}",
    )
    code, _, err = run_cli(["validate", write(cnn_with_perplexity)], capsys)
    assert code == 2 and "eval[0]: metric 'perplexity' applies to llm models, not to this cnn model" in err, err
    code, _, err = run_cli(["validate", write(TRAINING), "eval.0.data.split=val"], capsys)
    assert code == 2 and "eval[0].data.split: got 'val'; allowed: train, test" in err, err
