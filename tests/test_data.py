import pytest
import torch

from compressx.data import ByteTokenizer, load_tokens, parse_data_spec, sample_windows, split_of, stdlib_files
from compressx.errors import ConfigError


def test_stdlib_split_is_disjoint_and_by_file():
    splits = {s: stdlib_files(s) for s in ("train", "val", "test")}
    assert all(splits.values())
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["val"]) & set(splits["test"])
    assert len(splits["train"]) > 10 * len(splits["test"])
    assert not any("test" in p.parts[:-1] or "site-packages" in p.parts for p in splits["train"])
    assert split_of("json/decoder.py") == split_of("json/decoder.py")


def test_sample_windows_is_seeded():
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 4, 16, seed=3), sample_windows(ids, 4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert not torch.equal(a, sample_windows(ids, 4, 16, seed=4))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows


def test_text_file_source(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 50)
    spec = parse_data_spec({"source": "text_file", "path": str(path), "samples": 3, "seq_len": 8})
    tokens = load_tokens(spec, ByteTokenizer())
    assert tokens.shape == (3, 8) and tokens.max() < 256


@pytest.mark.parametrize(
    "block, path, fragment",
    [
        (
            {"source": "wikitext"},
            "source",
            "allowed: digits_vqa, hf_dataset, image_prompts, pydoc_text, stdlib_text, text_file, text_files",
        ),
        ({"source": "stdlib_text", "split": "dev"}, "split", "allowed: train, val, test"),
        ({"source": "stdlib_text", "sampels": 3}, "sampels", "did you mean 'samples'?"),
        ({"source": "stdlib_text", "samples": 0}, "samples", "positive integer"),
        ({"source": "text_file"}, "path", "needs 'path'"),
        ({"source": "text_file", "path": "/no/such/file.txt"}, "path", "no such file"),
        ({"source": "stdlib_text", "path": "x"}, "path", "unknown key 'path'"),
        ({"source": "text_files", "paths": ["/no/such/dir/*.txt"]}, "paths[0]", "matches no file"),
        ({"source": "text_files", "paths": []}, "paths", "expected a list"),
        ({"source": "hf_dataset", "path": "x", "split": 3}, "split", "expected a string"),
    ],
)
def test_bad_data_blocks(block, path, fragment):
    with pytest.raises(ConfigError) as err:
        parse_data_spec(block)
    assert err.value.path == path and fragment in str(err.value)


def test_text_files_join_globs_in_order(tmp_path):
    for name, text in [("b.txt", "bbbb" * 20), ("a.txt", "aaaa" * 20), ("c.md", "cccc" * 20)]:
        (tmp_path / name).write_text(text)
    spec = parse_data_spec({"source": "text_files", "paths": [str(tmp_path / "*.txt"), str(tmp_path / "c.md")],
                            "samples": 2, "seq_len": 4})  # fmt: skip
    from compressx.data import TEXT_SOURCES

    text = TEXT_SOURCES["text_files"][2](spec)
    assert text == "\n\n".join(["aaaa" * 20, "bbbb" * 20, "cccc" * 20])
    assert spec.to_dict()["paths"] == [str(tmp_path / "*.txt"), str(tmp_path / "c.md")]


def test_hf_dataset_from_disk_and_from_data_files(tmp_path):
    import json

    import datasets

    docs = [{"text": f"document {i} " * 30, "id": i} for i in range(40)]
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    from_disk = parse_data_spec({"source": "hf_dataset", "path": str(tmp_path / "saved"), "samples": 3, "seq_len": 16})
    from_files = parse_data_spec({"source": "hf_dataset", "path": "json", "data_files": str(tmp_path / "docs.jsonl"),
                                  "samples": 3, "seq_len": 16})  # fmt: skip
    a, b = load_tokens(from_disk, ByteTokenizer()), load_tokens(from_files, ByteTokenizer())
    assert a.shape == (3, 16) and torch.equal(a, b)  # same documents, same seed: same windows
    bad = parse_data_spec({"source": "hf_dataset", "path": str(tmp_path / "saved"), "text_field": "body"})
    with pytest.raises(ConfigError, match="no column 'body'; columns: text, id"):
        load_tokens(bad, ByteTokenizer())


def test_pydoc_text_is_split_by_topic_disjointly_and_deterministically():
    from pydoc_data.topics import topics

    from compressx.data import pydoc_fingerprint, pydoc_split_of, pydoc_text, pydoc_topics

    splits = {s: pydoc_topics(s) for s in ("train", "val", "test")}
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(topics)  # every topic, once
    assert all(splits.values()) and len(splits["train"]) > 4 * len(splits["test"])
    assert all(pydoc_split_of(name) == split for split, names in splits.items() for name in names)
    test = pydoc_text("test")
    assert test == pydoc_text("test") and topics[splits["test"][0]].strip() in test
    assert topics[splits["train"][0]].strip() not in test
    assert len(pydoc_fingerprint()) == 64 and pydoc_fingerprint() == pydoc_fingerprint()


def test_pydoc_text_source_gives_seeded_windows_of_english_prose():
    spec = parse_data_spec({"source": "pydoc_text", "split": "val", "samples": 3, "seq_len": 64, "seed": 1})
    tokens = load_tokens(spec, ByteTokenizer())
    assert tokens.shape == (3, 64) and torch.equal(tokens, load_tokens(spec, ByteTokenizer()))
    text = bytes(tokens.flatten().tolist()).decode("utf-8", errors="replace")
    assert sum(c.isalpha() or c == " " for c in text) > 0.7 * len(text)  # prose, not code
    with pytest.raises(ConfigError, match="split: got 'dev'; allowed: train, val, test"):
        parse_data_spec({"source": "pydoc_text", "split": "dev"})
    with pytest.raises(ConfigError, match="fewer than seq_len=1,000,000"):
        parse_data_spec({"source": "pydoc_text", "split": "test", "seq_len": 1_000_000})
