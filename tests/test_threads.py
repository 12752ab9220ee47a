"""compressx.threads: the tiny-model thread count, its overrides, and zoo builds that do not depend on it."""

from __future__ import annotations

import pytest
import torch

from compressx.errors import CompressxError
from compressx.threads import TINY_MODEL_THREADS, tiny_model_thread_count, tiny_model_threads
from compressx.zoo import llama_byte


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv("COMPRESSX_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.fixture
def callers_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_count_and_its_overrides(no_thread_env, monkeypatch):
    assert tiny_model_thread_count() == TINY_MODEL_THREADS == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert tiny_model_thread_count() == 3
    monkeypatch.setenv("COMPRESSX_NUM_THREADS", "2")  # compressx's own variable wins
    assert tiny_model_thread_count() == 2
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("COMPRESSX_NUM_THREADS", bad)
        with pytest.raises(CompressxError, match=f"COMPRESSX_NUM_THREADS='{bad}'.*whole number"):
            tiny_model_thread_count()


def test_the_callers_setting_is_restored(no_thread_env, callers_threads, monkeypatch):
    torch.set_num_threads(2)
    with tiny_model_threads() as count:
        assert count == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("COMPRESSX_NUM_THREADS", "3")
    with pytest.raises(RuntimeError, match="boom"), tiny_model_threads():
        assert torch.get_num_threads() == 3
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.slow  # two training steps of llama_byte_1m: about a second idle, a minute on a loaded 2-core machine
def test_a_zoo_build_does_not_depend_on_the_callers_thread_count(no_thread_env, callers_threads):
    torch.set_num_threads(2)
    a, info = llama_byte.train(steps=1, progress=False)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    b, _ = llama_byte.train(steps=1, progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert info["torch_threads"] == 1
