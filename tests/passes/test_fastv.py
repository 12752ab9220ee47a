"""fastv: which vision tokens it keeps, exactness at ratio 0, cached decoding, padded batches."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE_KWARG, IMAGE_TOKEN, make_tiny_llava
from transformers.cache_utils import DynamicCache

import compressx
from compressx.errors import ConfigError
from compressx.hooks.token_withdrawal import TokenWithdrawal, last_query_attention
from compressx.passes.fastv import FastvConfig, fastv_keep

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(before=(1, 5, 6, 7), after=(8, 9, 10)):
    return torch.tensor([list(before) + [IMAGE_TOKEN] * 16 + list(after)])


def test_keep_ranks_vision_tokens_by_attention_and_keeps_all_text():
    vision = torch.tensor([[False, True, True, True, True, False]])
    attention = torch.tensor([[0.0, 0.1, 0.4, 0.05, 0.3, 0.0]])
    assert fastv_keep(vision, attention, 0.5).tolist() == [[0, 2, 4, 5]]
    assert fastv_keep(vision, attention, 0.0).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert fastv_keep(vision, attention, 1.0).tolist() == [[0, 5]]
    with pytest.raises(ConfigError, match="ratio"):
        FastvConfig(ratio=1.5)


def test_recomputed_attention_equals_the_eager_attention_weights():
    model = make_tiny_llava(attn="eager")
    ids, pv = prompt(), torch.randn(1, 3, 8, 8)
    out = model(input_ids=ids, pixel_values=pv, output_attentions=True, output_hidden_states=True)
    attention = model.model.language_model.layers[1].self_attn
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    hook = attention.register_forward_pre_hook(grab, with_kwargs=True)
    model(input_ids=ids, pixel_values=pv)
    hook.remove()
    mine = last_query_attention(
        attention, captured["hidden_states"], captured["position_embeddings"], captured["attention_mask"]
    )
    torch.testing.assert_close(mine, out.attentions[1][:, :, -1].mean(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_drops_half_the_vision_tokens_and_decodes_with_cache(attn):
    model = make_tiny_llava(attn=attn)
    ids, pv = prompt(), torch.randn(1, 3, 8, 8)
    base = model(input_ids=ids, pixel_values=pv).logits
    result = compressx.apply(model, [{"pass": "fastv", "config": {"ratio": 0.0}}], progress=False)
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pv).logits, base, atol=1e-5, rtol=0)
    result.steps[0].handle.remove()
    result = compressx.apply(model, [{"pass": "fastv", "config": {"layer": 2, "ratio": 0.5}}], progress=False)
    assert result.steps[0].report["flops"]["prefill_ratio"] < 1
    assert model(input_ids=ids, pixel_values=pv).logits.shape[1] == ids.shape[1] - 8
    cache = DynamicCache(config=model.config.text_config)
    cached = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, do_sample=False, **{CACHE_KWARG: cache})
    prompt_keep, n = cache._compressx_withdrawal
    result.steps[0].handle.remove()
    # Reference without cache: the same vision tokens withdrawn (FastV ranks them once, at the prompt's last
    # position), the generated tokens kept.
    seq = ids
    for _ in range(5):
        extra = torch.arange(n, seq.shape[1])[None]
        handle = TokenWithdrawal(model, 2, select=lambda v, a, extra=extra: torch.cat([prompt_keep, extra], 1))
        logits = model(input_ids=seq, pixel_values=pv, use_cache=False).logits[:, -1]
        handle.remove()
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_padded_batch_equals_single_runs():
    model = make_tiny_llava(attn="sdpa")
    rows = [prompt(), prompt(before=(1, 5), after=(8, 9, 10, 13, 14, 15, 16))]  # 23 and 25 tokens
    pvs = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)]
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    compressx.apply(model, [{"pass": "fastv"}], progress=False)
    batch = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pvs)).logits[:, -1]
    for i, (row, pv) in enumerate(zip(rows, pvs, strict=True)):
        torch.testing.assert_close(batch[i], model(input_ids=row, pixel_values=pv).logits[0, -1], atol=1e-5, rtol=0)
