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
        ({"source": "wikitext"}, "source", "allowed: stdlib_text, text_file"),
        ({"source": "stdlib_text", "split": "dev"}, "split", "allowed: train, val, test"),
        ({"source": "stdlib_text", "sampels": 3}, "sampels", "did you mean 'samples'?"),
        ({"source": "stdlib_text", "samples": 0}, "samples", "positive integer"),
        ({"source": "text_file"}, "path", "needs 'path'"),
        ({"source": "text_file", "path": "/no/such/file.txt"}, "path", "no such file"),
        ({"source": "stdlib_text", "path": "x"}, "path", "unknown key 'path'"),
    ],
)
def test_bad_data_blocks(block, path, fragment):
    with pytest.raises(ConfigError) as err:
        parse_data_spec(block)
    assert err.value.path == path and fragment in str(err.value)
