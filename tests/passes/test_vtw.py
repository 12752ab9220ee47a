"""vtw: exactness at K >= L, causality, cached decoding, padded batches, the KL search, LLaVA-NeXT, export."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE_KWARG, IMAGE_TOKEN, make_tiny_llava
from transformers.cache_utils import DynamicCache, StaticCache

import compressx
from compressx.errors import CompressxError, ConfigError
from compressx.hooks.flops import decoder_flops, layer_linear_params, withdrawal_flops
from compressx.hooks.token_withdrawal import TokenWithdrawal
from compressx.passes.vtw import VtwConfig, first_under, kl_divergence

N_VIS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(before=(1, 5, 6, 7), after=(8, 9, 10), images=1):
    ids = list(before)
    for i in range(images):
        ids += [IMAGE_TOKEN] * N_VIS + ([11, 12] if i < images - 1 else [])
    return torch.tensor([ids + list(after)])


def pixels(images=1, seed=1):
    return torch.randn(images, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(model, ids, pv, steps, **extra):
    """Greedy decoding by re-running the whole (withdrawn) prefill for every new token."""
    for _ in range(steps):
        mask = extra.get("attention_mask")
        logits = model(input_ids=ids, pixel_values=pv, use_cache=False, **extra).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            extra["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layer_at_or_beyond_depth_gives_the_original_logits(attn):
    model = make_tiny_llava(attn=attn)
    ids, pv = prompt(images=2), pixels(2)
    base = model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
    gen = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False)
    for layer in (4, 9):
        result = compressx.apply(model, [{"pass": "vtw", "config": {"layer": layer}}], progress=False)
        out = model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
        assert torch.equal(out.logits, base.logits)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, base.hidden_states, strict=True))
        assert torch.equal(model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False), gen)
        result.steps[0].handle.remove()
    assert torch.equal(model(input_ids=ids, pixel_values=pv).logits, base.logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_withdrawal_changes_only_what_follows_the_image_in_withdrawn_layers(attn):
    model = make_tiny_llava(attn=attn)
    ids, pv = prompt(), pixels()
    base = model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
    handle = TokenWithdrawal(model, 2)
    out = model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
    text = (ids[0] != IMAGE_TOKEN).nonzero().squeeze(1)
    assert out.logits.shape[1] == ids.shape[1] - N_VIS
    for index, (hidden, ref) in enumerate(zip(out.hidden_states, base.hidden_states, strict=True)):
        if index <= 2:  # the embeddings and the outputs of layers 0, 1: the whole sequence, untouched
            assert torch.equal(hidden, ref)
        else:
            ref = ref[:, text]
        torch.testing.assert_close(hidden[:, :4], ref[:, :4], atol=1e-6, rtol=0)  # before the image
    assert (out.logits[0, -1] - base.logits[0, -1]).abs().max() > 1e-4  # the image was withdrawn after all
    handle.remove()


def test_k_zero_equals_the_text_model_on_the_gapped_text_positions(tiny_llava):
    ids, pv = prompt(), pixels()
    handle = TokenWithdrawal(tiny_llava, 0)
    out = tiny_llava(input_ids=ids, pixel_values=pv).logits
    handle.remove()
    text = (ids[0] != IMAGE_TOKEN).nonzero().squeeze(1)
    embeds = tiny_llava.get_input_embeddings()(ids[:, text])
    hidden = tiny_llava.model.language_model(inputs_embeds=embeds, position_ids=text[None]).last_hidden_state
    torch.testing.assert_close(out, tiny_llava.lm_head(hidden), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_generation_without_cache(attn):
    model = make_tiny_llava(attn=attn)
    ids, pv = prompt(images=2), pixels(2)
    TokenWithdrawal(model, 2)
    cached = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(model, ids, pv, 6))


@pytest.mark.parametrize("decoder", ["mistral", "qwen2"])
def test_other_decoders(decoder):
    model = make_tiny_llava(attn="sdpa", decoder=decoder)
    assert model.config.text_config.model_type == decoder
    ids, pv = prompt(images=2), pixels(2)
    base = model(input_ids=ids, pixel_values=pv).logits
    handle = TokenWithdrawal(model, 4)
    assert torch.equal(model(input_ids=ids, pixel_values=pv).logits, base)
    handle.layer = 2
    assert model(input_ids=ids, pixel_values=pv).logits.shape[1] == ids.shape[1] - 2 * N_VIS
    cached = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(model, ids, pv, 5))


def make_tiny_qwen2_vl(attn: str):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope, pad_token_id=0,
                bos_token_id=1, eos_token_id=None)  # fmt: skip
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=101,
                           vision_start_token_id=102, vision_end_token_id=103)  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen2_vl_with_m_rope_positions(attn):
    model = make_tiny_qwen2_vl(attn)
    # an 8x8-patch image merged 2x2: 16 vision tokens between <|vision_start|> and <|vision_end|> (kept)
    ids = torch.tensor([[1, 5, 6, 102] + [IMAGE_TOKEN] * 16 + [103, 8, 9]])
    image = {"pixel_values": torch.randn(64, 24), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    types = (ids == IMAGE_TOKEN).long()
    base = model(input_ids=ids, mm_token_type_ids=types, **image).logits
    handle = TokenWithdrawal(model, 4)
    assert torch.equal(model(input_ids=ids, mm_token_type_ids=types, **image).logits, base)
    handle.layer = 2
    out = model(input_ids=ids, mm_token_type_ids=types, **image).logits
    assert out.shape[1] == ids.shape[1] - 16
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-6, rtol=0)
    cached = model.generate(input_ids=ids, mm_token_type_ids=types, **image, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        seq_types = torch.cat([types, torch.zeros(1, seq.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
        logits = model(input_ids=seq, mm_token_type_ids=seq_types, **image, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_sliding_window_decoder_is_refused():
    model = make_tiny_llava(decoder="mistral")
    model.config.text_config.sliding_window = 8
    with pytest.raises(CompressxError, match="sliding-window"):
        TokenWithdrawal(model, 2)


def test_cache_lengths_and_positions_follow_the_full_sequence(tiny_llava):
    ids, pv = prompt(), pixels()
    TokenWithdrawal(tiny_llava, 2)
    cache = DynamicCache(config=tiny_llava.config.text_config)
    tiny_llava(input_ids=ids, pixel_values=pv, use_cache=True, **{CACHE_KWARG: cache})
    n = ids.shape[1]
    assert [cache.get_seq_length(i) for i in range(4)] == [n, n, n - N_VIS, n - N_VIS]
    step = tiny_llava(input_ids=torch.tensor([[20]]), use_cache=True, **{CACHE_KWARG: cache}).logits
    assert cache.get_seq_length(0) == n + 1 and cache.get_seq_length(3) == n - N_VIS + 1
    full = tiny_llava(input_ids=torch.cat([ids, torch.tensor([[20]])], 1), pixel_values=pv, use_cache=False).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)


def left_pad(rows):
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_of_two_equals_two_single_runs(attn):
    model = make_tiny_llava(attn=attn)
    rows = [prompt(), prompt(before=(1, 5), after=(8, 9, 10, 13, 14, 15, 16))]  # 23 and 25 tokens
    pvs = [pixels(seed=1), pixels(seed=2)]
    ids, mask = left_pad(rows)
    TokenWithdrawal(model, 2)
    batch = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pvs)).logits[:, -1]
    gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pvs), max_new_tokens=5,
                         do_sample=False)  # fmt: skip
    for i, (row, pv) in enumerate(zip(rows, pvs, strict=True)):
        single = model(input_ids=row, pixel_values=pv).logits[:, -1]
        torch.testing.assert_close(batch[i], single[0], atol=1e-5, rtol=0)
        single_gen = model.generate(input_ids=row, pixel_values=pv, max_new_tokens=5, do_sample=False)
        assert torch.equal(gen[i, -5:], single_gen[0, -5:])


def test_kl_helper_and_first_layer_under_threshold():
    p, q = torch.randn(3, 50), torch.randn(3, 50)
    pp, qq = p.double().softmax(-1), q.double().softmax(-1)
    torch.testing.assert_close(kl_divergence(p, q), (pp * (pp.log() - qq.log())).sum(-1))
    assert torch.equal(kl_divergence(p, p), torch.zeros(3, dtype=torch.float64))
    mean_kl = {2: 0.5, 3: 0.001, 4: 0.01, 5: 0.0001}  # not monotone: the first one under wins
    assert first_under(mean_kl, 0.003, 6) == 3
    assert first_under(mean_kl, float("inf"), 6) == 2
    assert first_under(mean_kl, 1e-5, 6) == 6  # none: withdrawal off
    assert [first_under(mean_kl, eta, 6) for eta in (1e-5, 1e-4, 2e-3, 1)] == [6, 5, 3, 2]  # non-increasing in η


def test_kl_search_returns_the_first_layer_under_threshold_on_a_constructed_model():
    # Layers 2 and 3 are made identities (zero output projections): withdrawing before layer 2 or 3 changes
    # nothing, before layer 1 it does. The search must pick 2 for a tiny η, and report KL 0 for 2 and 3.
    model = make_tiny_llava(layers=4)
    with torch.no_grad():
        for layer in model.model.language_model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    data = [{"input_ids": prompt(), "pixel_values": pixels(seed=s)} for s in range(3)]
    steps = [{"pass": "vtw", "config": {"layer": "auto", "threshold": 1e-9, "search_start": 1}}]
    result = compressx.apply(model, steps, data, progress=False)
    report = result.steps[0].report
    assert report["layer"] == 2 and result.steps[0].reapply_config.layer == 2
    assert report["kl_per_layer"]["1"] > 1e-6
    assert report["kl_per_layer"]["2"] < 1e-9 and report["kl_per_layer"]["3"] < 1e-9
    assert report["calibration_prompts"] == 3
    assert report["changed_per_layer"]["2"] == report["changed_per_layer"]["3"] == 0  # identical logits


def test_kl_search_counts_the_prompts_whose_greedy_token_changes():
    # Counted against the argmax of each forward, prompt by prompt, with the hooks at K and without.
    model = make_tiny_llava(layers=3)
    data = [{"input_ids": prompt(), "pixel_values": pixels(seed=s)} for s in range(8)]
    with torch.no_grad():
        full = [model(**d).logits[0, -1].argmax() for d in data]
    expected = {}
    for k in (1, 2):
        handle = compressx.apply(model, [{"pass": "vtw", "config": {"layer": k}}], progress=False).steps[0].handle
        with torch.no_grad():
            withdrawn = [model(**d).logits[0, -1].argmax() for d in data]
        expected[str(k)] = sum(int(w != f) for w, f in zip(withdrawn, full, strict=True))
        handle.remove()
    steps = [{"pass": "vtw", "config": {"layer": "auto", "threshold": 0.0, "search_start": 1}}]
    report = compressx.apply(model, steps, data, progress=False).steps[0].report
    assert expected["1"] > 0 and report["changed_per_layer"] == expected


def test_max_changed_answers_picks_the_first_layer_by_the_changed_answer_curve():
    # One search, both curves: with max_changed_answers the pass reads the changed-answer curve, not the KL one.
    model = make_tiny_llava(layers=3)
    data = [{"input_ids": prompt(), "pixel_values": pixels(seed=s)} for s in range(8)]
    by_kl = compressx.apply(model, [{"pass": "vtw", "config": {"layer": "auto", "threshold": 0.0, "search_start": 0}}],
                            data, progress=False).steps[0]  # fmt: skip
    by_kl.handle.remove()
    changed = {int(d): n for d, n in by_kl.report["changed_per_layer"].items()}
    assert by_kl.report["criterion"] == "threshold" and by_kl.report["layer"] == 3  # KL never 0: off
    for most in sorted(set(changed.values())):
        steps = [{"pass": "vtw", "config": {"layer": "auto", "max_changed_answers": most, "search_start": 0}}]
        step = compressx.apply(model, steps, data, progress=False).steps[0]
        step.handle.remove()
        expected = min(d for d, n in changed.items() if n <= most)
        assert step.report["layer"] == expected == step.reapply_config.layer
        assert step.report["criterion"] == "max_changed_answers" and step.report["max_changed_answers"] == most
        assert step.report["changed_per_layer"] == by_kl.report["changed_per_layer"]
        assert step.report["kl_per_layer"] == by_kl.report["kl_per_layer"]  # both curves, whichever criterion
        assert "threshold" not in step.report
    assert changed[0] > 0  # the tiny model's answers do depend on the image at K = 0


def test_search_criterion_is_one_of_two_and_validated():
    assert VtwConfig().criterion == ("threshold", 0.003)  # the paper's η when nothing is said
    assert VtwConfig(threshold=0.03).criterion == ("threshold", 0.03)
    assert VtwConfig(max_changed_answers=0).criterion == ("max_changed_answers", 0)
    with pytest.raises(ConfigError, match="not both") as err:
        VtwConfig.from_dict({"threshold": 0.003, "max_changed_answers": 0})
    assert err.value.path == "max_changed_answers"
    with pytest.raises(ConfigError, match=">= 0"):
        VtwConfig.from_dict({"max_changed_answers": -1})
    with pytest.raises(ConfigError, match="max_changed_answers"):
        VtwConfig.from_dict({"max_changed_answers": 0.5})
    with pytest.raises(ConfigError, match="max_changed_answers"):
        VtwConfig.from_dict({"max_changed_answers": True})


def test_kl_search_with_no_layer_under_threshold_switches_withdrawal_off(tiny_llava):
    data = {"input_ids": prompt(), "pixel_values": pixels()}
    steps = [{"pass": "vtw", "config": {"layer": "auto", "threshold": 0.0, "search_start": 0}}]
    result = compressx.apply(tiny_llava, steps, data, progress=False)
    assert result.steps[0].report["layer"] == 4
    assert result.steps[0].report["flops"]["prefill_ratio"] == 1.0


def test_llava_next_variable_vision_tokens():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = make_tiny_llava(next_=True)
    grid = model.config.image_grid_pinpoints
    sizes = [(16, 16), (8, 16)]
    pvs = [torch.randn(1, image_size_to_num_patches(s, grid, 8), 3, 8, 8) for s in sizes]
    counts = [
        model.model.get_image_features(pixel_values=pv, image_sizes=torch.tensor([s])).pooler_output[0].shape[0]
        for pv, s in zip(pvs, sizes, strict=True)
    ]
    assert counts[0] != counts[1]
    TokenWithdrawal(model, 2)
    for pv, size, count in zip(pvs, sizes, counts, strict=True):
        ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * count + [8, 9]])
        out = model(input_ids=ids, pixel_values=pv, image_sizes=torch.tensor([size])).logits
        assert out.shape[1] == 5
        gen = model.generate(input_ids=ids, pixel_values=pv, image_sizes=torch.tensor([size]), max_new_tokens=4,
                             do_sample=False)  # fmt: skip
        ref = greedy_without_cache(model, ids, pv, 4, image_sizes=torch.tensor([size]))
        assert torch.equal(gen, ref)
    rows = [torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * c + [8, 9]]) for c in counts]
    ids, mask = left_pad(rows)
    with pytest.raises(CompressxError, match="different numbers of tokens"):
        padded = torch.cat([pvs[0], torch.cat([pvs[1], torch.zeros(1, 2, 3, 8, 8)], dim=1)])  # as the processor pads
        model(input_ids=ids, attention_mask=mask, pixel_values=padded, image_sizes=torch.tensor(sizes))


def test_refusals(tiny_llama, tiny_llava):
    with pytest.raises(CompressxError, match="LlavaForConditionalGeneration"):
        compressx.apply(tiny_llama, [{"pass": "vtw", "config": {"layer": 1}}], progress=False)
    with pytest.raises(CompressxError, match="needs calibration"):
        compressx.apply(tiny_llava, [{"pass": "vtw"}], progress=False)
    with pytest.raises(ConfigError, match="layer"):
        VtwConfig.from_dict({"layer": "first"})
    TokenWithdrawal(tiny_llava, 2)
    ids, pv = prompt(), pixels()
    static = StaticCache(config=tiny_llava.config.text_config, max_cache_len=64)
    with pytest.raises(CompressxError, match="DynamicCache"):
        tiny_llava(input_ids=ids, pixel_values=pv, use_cache=True, **{CACHE_KWARG: static})
    with pytest.raises(CompressxError, match="labels"):
        tiny_llava(input_ids=ids, pixel_values=pv, labels=ids)
    cache = DynamicCache(config=tiny_llava.config.text_config)
    tiny_llava(input_ids=torch.tensor([[1, 2]]), use_cache=True, **{CACHE_KWARG: cache})
    with pytest.raises(CompressxError, match="non-empty cache"):
        tiny_llava(input_ids=ids, pixel_values=pv, use_cache=True, **{CACHE_KWARG: cache})
    tiny_llava.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(CompressxError, match="attn_implementation"):
        tiny_llava(input_ids=ids, pixel_values=pv)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["past_key_values", "cache", "kv_store"])
def test_caches_are_found_under_any_argument_name(tiny_llava, name):
    """A cache is found by type, not by name (transformers 5.24 renamed ``past_key_values`` to ``cache``): a
    StaticCache under the old name, the new name or a name no version uses is refused, not run unseen."""
    TokenWithdrawal(tiny_llava, 2)
    ids, pv = prompt(), pixels()
    static = StaticCache(config=tiny_llava.config.text_config, max_cache_len=64)
    with pytest.raises(CompressxError, match="DynamicCache.*got StaticCache"):
        tiny_llava(input_ids=ids, pixel_values=pv, use_cache=True, **{name: static})


def test_two_caches_are_refused(tiny_llava):
    TokenWithdrawal(tiny_llava, 2)
    first, second = (DynamicCache(config=tiny_llava.config.text_config) for _ in range(2))
    with pytest.raises(CompressxError, match="more than one cache"):
        tiny_llava(input_ids=prompt(), pixel_values=pixels(), use_cache=True, kv_store=first, **{CACHE_KWARG: second})


def test_what_cannot_be_seen_into_is_refused(tiny_llava):
    TokenWithdrawal(tiny_llava, 2)
    ids, pv = prompt(), pixels()
    legacy = tuple((torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8)) for _ in range(4))
    with pytest.raises(CompressxError, match="past_key_values_legacy= as a tuple.*cannot see into"):
        tiny_llava(input_ids=ids, pixel_values=pv, past_key_values_legacy=legacy)

    class LooksLikeACache:
        def update(self, *args, **kwargs): ...

        def get_seq_length(self, layer=0):
            return 0

    with pytest.raises(CompressxError, match="DynamicCache.*got LooksLikeACache"):
        tiny_llava(input_ids=ids, pixel_values=pv, kv=LooksLikeACache())


def test_layers_that_do_not_receive_the_decoders_cache_are_refused(tiny_llava):
    TokenWithdrawal(tiny_llava, 2)

    def hide_cache(module, args, kwargs):  # as a decoder that handed its layers the cache some other way would
        return args, {k: v for k, v in kwargs.items() if k != CACHE_KWARG}

    tiny_llava.model.language_model.layers[2].register_forward_pre_hook(hide_cache, with_kwargs=True, prepend=True)
    cache = DynamicCache(config=tiny_llava.config.text_config)
    with pytest.raises(CompressxError, match="do not receive the cache the text decoder was given"):
        tiny_llava(input_ids=prompt(), pixel_values=pixels(), use_cache=True, **{CACHE_KWARG: cache})


def test_an_unknown_rotary_layout_is_refused(tiny_llava):
    """transformers 5.0-5.16 hand Qwen2-VL's layers ``(cos, sin)`` of shape [3, B, n, d]: refused by name."""
    TokenWithdrawal(tiny_llava, 0)
    rotary = tiny_llava.model.language_model.rotary_emb
    rotary.register_forward_hook(lambda module, args, out: tuple(t.expand(3, *t.shape) for t in out))
    with pytest.raises(CompressxError, match=r"rotary embeddings have shape \(3, 1, 23, 8\).*transformers >= 5.17"):
        tiny_llava(input_ids=prompt(), pixel_values=pixels())


def test_flops_match_the_closed_form(tiny_llava):
    config = tiny_llava.config.text_config
    per_layer = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64
    assert layer_linear_params(config) == per_layer
    flops = withdrawal_flops(config, n_text=10, n_vis=16, n_kept_vis=0, layer=1)
    full = 4 * (2 * 26 * per_layer + 4 * 26 * 26 * 32) + 2 * 32 * 128
    cut = (2 * 26 * per_layer + 4 * 26 * 26 * 32) + 3 * (2 * 10 * per_layer + 4 * 10 * 10 * 32) + 2 * 32 * 128
    assert flops["prefill_flops_full"] == full and flops["prefill_flops"] == cut
    decode_cut = (2 * per_layer + 4 * 27 * 32) + 3 * (2 * per_layer + 4 * 11 * 32) + 2 * 32 * 128
    assert flops["decode_flops_per_token"] == decode_cut
    assert decoder_flops(config, [1] * 4, [27] * 4) == flops["decode_flops_per_token_full"]


@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava_next"])
def test_recipe_export_reload_generate(tmp_path, next_):
    from compressx.api import run_recipe
    from compressx.recipe import parse_recipe

    model = make_tiny_llava(next_=next_, attn="sdpa")
    model.save_pretrained(tmp_path / "base")
    cls = type(model).__name__
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": str(tmp_path / "base"), "class": cls},
            "steps": [{"pass": "vtw", "config": {"layer": 2}}],
            "export": {"dir": str(tmp_path / "out")},
        }
    )
    run = run_recipe(recipe, progress=False)
    reloaded = compressx.load(run.export_dir)
    manifest = compressx.export.read_manifest(run.export_dir)
    assert manifest["reapply"][0]["pass"] == "vtw" and manifest["reapply"][0]["config"]["layer"] == 2
    if next_:
        inputs = {"pixel_values": torch.randn(1, 5, 3, 8, 8), "image_sizes": torch.tensor([[16, 16]])}
        count = model.model.get_image_features(**inputs).pooler_output[0].shape[0]
    else:
        inputs, count = {"pixel_values": pixels()}, N_VIS
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * count + [8, 9]])
    assert reloaded(input_ids=ids, **inputs).logits.shape[1] == 5  # withdrawn after reload
    gen = reloaded.generate(input_ids=ids, **inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, run.model.generate(input_ids=ids, **inputs, max_new_tokens=4, do_sample=False))


def tiny_processor():
    """A LLaVA processor built here: a word-level tokenizer with ``<image>`` = 100 and an 8x8 CLIP image
    processor (16 vision tokens per image)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "USER:": 2, "ASSISTANT:": 3, "what": 4, "is": 5, "this": 6, "?": 7}
    words = Tokenizer(models.WordLevel({**vocab, "<image>": IMAGE_TOKEN}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=2, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


def test_recipe_with_image_prompts_and_the_kl_search(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from compressx.api import run_recipe
    from compressx.recipe import parse_recipe

    make_tiny_llava(attn="sdpa").save_pretrained(tmp_path / "base")
    tiny_processor().save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": "USER: <image> what is this ? ASSISTANT:"}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": str(tmp_path / "base"), "class": "LlavaForConditionalGeneration"},
            "data": {"calibration": {"source": "image_prompts", "path": str(tmp_path / "prompts.jsonl")}},
            "steps": [{"pass": "vtw", "config": {"layer": "auto", "threshold": 1e9, "search_start": 1}}],
            "export": {"dir": str(tmp_path / "out")},
        }
    )
    run = run_recipe(recipe, progress=False)
    report = run.result.steps[0].report
    assert report["calibration_prompts"] == 3 and report["layer"] == 1  # every KL passes: the first candidate
    assert set(report["kl_per_layer"]) == {"1", "2", "3"} and all(v > 0 for v in report["kl_per_layer"].values())
    assert report["flops"]["text_tokens"] == 6 and report["flops"]["vision_tokens"] == N_VIS
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(run.export_dir)  # the export holds the processor
    inputs = processor(
        images=Image.open(tmp_path / "0.png"), text="USER: <image> what is ASSISTANT:", return_tensors="pt"
    )
    reloaded = compressx.load(run.export_dir)
    gen = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, run.model.generate(**inputs, max_new_tokens=3, do_sample=False))
    assert reloaded(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - N_VIS
