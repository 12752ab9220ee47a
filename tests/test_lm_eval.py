"""The lm_eval metric: EleutherAI's lm-evaluation-harness on a local task, run from a recipe through the CLI."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_hf_llama

import compressx
from compressx.cli import main

# A tiny multiple-choice task: (question, choices, index of the answer)
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Rome", "Berlin"], 0),
    ("Two plus two is", ["three", "four", "five"], 1),
    ("The opposite of hot is", ["cold", "warm", "red"], 0),
    ("A cat says", ["woof", "meow", "moo"], 1),
    ("Python is a programming", ["language", "snake", "river"], 0),
    ("The sky on a clear day is", ["green", "blue", "black"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "miles"], 0),
    ("The first letter of the alphabet is", ["z", "a", "q"], 1),
]
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""


def write_task(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "tiny_mc.yaml").write_text(TASK_YAML)
    lines = [json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS]
    (folder / "tiny_mc.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe_tokenizer):
    """A local transformers checkpoint whose tokenizer has an EOS token (the harness's prefix for empty contexts)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|eos|>")
    return save_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", tokenizer, layers=2)


def write_recipe(folder: Path, model_dir: Path, task_dir: str = "tasks") -> Path:
    recipe = {
        "model": {"source": "hf", "id": str(model_dir)},
        "steps": [{"pass": "magnitude", "config": {"sparsity": 0.6}, "ignore": ["lm_head"]}],
        "eval": [{"metric": "lm_eval", "tasks": ["tiny_mc"], "task_dir": task_dir, "batch_size": 4}],
        "export": {"dir": str(folder / "out")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@torch.no_grad()
def accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy computed here, as the harness defines it: the choice of highest log-likelihood
    after the context, the continuation being the tokens that ``context + " " + choice`` adds to ``context``."""
    model.eval()
    correct = 0
    for question, choices, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            logprobs = model(input_ids=torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole))))
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
    return correct / len(QUESTIONS)


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_from_a_recipe_and_records_it(tmp_path, llama_dir, monkeypatch, capsys):
    """~20 s: importing the harness takes most of it."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_task(tmp_path / "tasks")
    recipe = write_recipe(tmp_path, llama_dir)
    monkeypatch.chdir(tmp_path.parent)  # task_dir is read from the recipe's folder, not the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(recipe)]) == 0
    assert main(["apply", str(recipe), "--no-progress"]) == 0, capsys.readouterr().err[-3000:]

    evals = compressx.read_manifest(tmp_path / "out")["eval"]
    assert set(evals["before"]) == set(evals["after"]) == {"lm_eval tiny_mc acc"}
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    pruned = compressx.load(tmp_path / "out")
    assert evals["before"]["lm_eval tiny_mc acc"] == accuracy(dense, tokenizer)
    assert evals["after"]["lm_eval tiny_mc acc"] == accuracy(pruned, tokenizer)  # the pruned model was measured
    # the export's recipe records the task folder absolutely, so `load --eval` re-runs the harness on the export
    assert main(["load", str(tmp_path / "out"), "--eval", "--no-progress"]) == 0
    assert "reproduces the recorded metrics exactly" in capsys.readouterr().out


def test_validate_names_a_missing_task_dir_and_the_missing_extra(tmp_path, llama_dir, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, llama_dir, task_dir="no_such_tasks")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"eval[0]: task_dir {tmp_path / 'no_such_tasks'}: no such folder" in err

    write_task(tmp_path / "tasks")
    recipe = write_recipe(tmp_path, llama_dir)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees
    assert main(["validate", str(recipe)]) == 2
    assert "eval[0]: metric 'lm_eval' needs EleutherAI's lm-evaluation-harness" in capsys.readouterr().err
    assert main(["apply", str(recipe), "--no-progress"]) == 2  # refused before any work
    assert "pip install 'compressx[lm_eval]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"tasks": [], "task_dir": "t"}, "eval[0].tasks: got []; expected a non-empty list of task names"),
        ({"tasks": ["x"]}, "eval[0].task_dir: got None; expected the folder of the harness's task YAML files"),
        ({"tasks": ["x"], "task_dir": "t", "limit": 0}, "eval[0].limit: got 0; expected an integer >= 1"),
        ({"tasks": ["x"], "task_dir": "t", "shots": 5}, "eval[0].shots: unknown key"),
    ],
)
def test_lm_eval_entry_errors_name_the_key(tmp_path, entry, message):
    from compressx.errors import RecipeError
    from compressx.recipe import parse_recipe

    raw = {"steps": [{"pass": "magnitude", "config": {"sparsity": 0.5}}], "eval": [{"metric": "lm_eval", **entry}]}
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, str(tmp_path / "r.yaml"))
    assert message in str(err.value)
