"""The layer-by-layer calibration driver: statistics, capture, equivalence with a direct computation."""

import types

import pytest
import torch
import torch.nn as nn

from compressx.errors import CompressxError
from compressx.layerwise import LinearStats, calibrate_layers, capture_layer_inputs, decoder_layers
from compressx.passes.magnitude import MagnitudeConfig, magnitude_mask


def test_linear_stats_match_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.0, 1.0, -1.0, 2.0])
    stats = LinearStats(4, with_hessian=True)
    stats.add(x[:2])
    stats.add(x[2:])
    flat = x.reshape(-1, 4)
    assert torch.allclose(stats.mean, flat.mean(0), atol=1e-6)
    within = torch.stack([x[i].var(0, unbiased=False) for i in range(3)]).mean(0)
    assert torch.allclose(stats.var, within, atol=1e-5)
    assert not torch.allclose(stats.var, flat.var(0, unbiased=False), atol=1e-3)  # not the pooled variance
    assert torch.allclose(stats.sq_norm, flat.pow(2).sum(0) / 3, atol=1e-5)
    assert torch.allclose(stats.hessian, 2 * flat.T @ flat / 15, atol=1e-5)


def test_capture_gets_the_first_layer_inputs(tiny_llama):
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    hiddens, kwargs = capture_layer_inputs(tiny_llama, tokens, batch_size=2)
    assert len(hiddens) == 2 and hiddens[0].shape == (2, 16, 32)
    assert torch.equal(hiddens[1], tiny_llama.model.embed_tokens(tokens[2:]))
    assert "position_embeddings" in kwargs[0]


def test_layer_by_layer_equals_direct_whole_model_computation(tiny_llama):
    """Magnitude needs no data: driven layer by layer it must give exactly the direct result."""
    from conftest import make_tiny_llama

    config = MagnitudeConfig(sparsity=0.5, scope="row")
    direct = make_tiny_llama()
    targets = {n: m for n, m in direct.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for module in targets.values():
        module.weight.data.mul_(magnitude_mask(module.weight, config))
    seen = []
    layered_targets = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for layer in calibrate_layers(tiny_llama, tokens, layered_targets, progress=False):
        seen.append((layer.index, sorted(layer.linears)))
        for linear in layer.linears.values():
            linear.weight.data.mul_(magnitude_mask(linear.weight, config))
    assert [i for i, _ in seen] == [0, 1]
    assert seen[0][1] == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])  # fmt: skip
    for (name, a), (_, b) in zip(direct.state_dict().items(), tiny_llama.state_dict().items()):
        assert torch.equal(a, b), name


def test_second_layer_is_calibrated_on_pruned_outputs(tiny_llama):
    """Layer 1's statistics come from layer 0 *after* pruning (not from the dense model)."""
    from conftest import make_tiny_llama

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    recorded = {}
    targets = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for layer in calibrate_layers(tiny_llama, tokens, targets, progress=False):
        recorded[layer.index] = layer.stats["self_attn.q_proj"].mean.clone()
        for linear in layer.linears.values():
            linear.weight.data.zero_()  # an extreme pruning makes the difference obvious
    dense = make_tiny_llama()
    captured = []
    hook = dense.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        dense(input_ids=tokens)
    hook.remove()
    dense_mean = captured[0].reshape(-1, 32).mean(0)
    assert not torch.allclose(recorded[1], dense_mean, atol=1e-3)


def test_targets_outside_decoder_layers_are_refused(tiny_llama):
    with pytest.raises(CompressxError, match="lm_head is outside: add to ignore"):
        calibrate_layers(tiny_llama, torch.zeros(1, 4, dtype=torch.long), {"lm_head": tiny_llama.lm_head})


def test_gpt_neox_decoder_layers_are_found_without_a_table():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=64))  # fmt: skip
    path, layers = decoder_layers(model)
    assert path == "gpt_neox.layers" and layers is model.gpt_neox.layers


class _NoLayers(torch.nn.Module):
    """A model with a config but no list of repeated blocks."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy_lm", use_cache=False)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, input_ids, **kwargs):
        return self.fc(torch.nn.functional.one_hot(input_ids, 8).float())


def test_model_without_decoder_layers_gets_one_clear_error():
    with pytest.raises(CompressxError) as err:
        decoder_layers(_NoLayers())
    message = str(err.value)
    assert "cannot find the decoder layers of _NoLayers (model_type 'toy_lm')" in message
    assert "in the step's config, e.g. `config: {layers: model.layers}`" in message


def test_layers_option_names_the_decoder_layers(tiny_llama):
    assert decoder_layers(tiny_llama, "model.layers")[0] == "model.layers"
    with pytest.raises(CompressxError, match="'model.norm' of LlamaForCausalLM is a LlamaRMSNorm, not a ModuleList"):
        decoder_layers(tiny_llama, "model.norm")
    with pytest.raises(CompressxError, match="has no module 'model.blocks'; .*its ModuleLists: model.layers"):
        decoder_layers(tiny_llama, "model.blocks")


class _Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, width), torch.nn.Linear(width, 8)

    def forward(self, hidden, **kwargs):
        return hidden + self.down(torch.relu(self.up(hidden)))


class _WideBlock(_Block):  # another class: the search wants a list of identical blocks
    pass


class _MixedBlocksLM(torch.nn.Module):
    """A toy LM whose decoder layers are of two classes, so the search finds no list of repeated blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = types.SimpleNamespace(model_type="mixed_lm", use_cache=False)
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList([_Block(16), _WideBlock(32)])
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids, **kwargs):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


def test_a_step_with_wrong_layers_is_refused_before_any_work(tiny_llama):
    import compressx

    before = tiny_llama.model.layers[0].mlp.up_proj.weight.clone()
    step = {"pass": "sparsegpt", "config": {"sparsity": 0.5, "layers": "model.norm"}}
    message = r"steps\[0\]: layers: 'model.norm' of LlamaForCausalLM is a LlamaRMSNorm"
    with pytest.raises(CompressxError, match=message):
        compressx.apply(tiny_llama, [step], torch.randint(0, 64, (2, 8)), progress=False)
    assert torch.equal(tiny_llama.model.layers[0].mlp.up_proj.weight, before)


def test_layers_option_calibrates_a_model_the_search_cannot_read():
    model = _MixedBlocksLM()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    tokens = torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompressxError, match="cannot find the decoder layers of _MixedBlocksLM .*ModuleLists: blocks"):
        calibrate_layers(model, tokens, targets)
    from compressx.passes.wanda import wanda_mask

    calibration = calibrate_layers(model, tokens, targets, layers="blocks", progress=False)
    with torch.no_grad():
        for layer in calibration:
            for key, weight in layer.matrices.items():
                weight.masked_fill_(~wanda_mask(weight, layer.stats[key].sq_norm, 0.5, None), 0.0)
    assert {n: z / t for n, (z, t) in calibration.counts.items()} == {n: 0.5 for n in targets}


def _whole_model_reference(model, tokens, batch_size, with_hessian, prune_linear):
    """Layer-by-layer calibration written the plain way, without ``calibrate_layers``: layer i's statistics come
    from forwards of the whole model (layers < i already pruned) with hooks on layer i's Linears."""
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats = {n: LinearStats(m.in_features, with_hessian) for n, m in linears.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.add(inp[0])) for n, m in linears.items()]
        with torch.no_grad():
            for start in range(0, len(tokens), batch_size):
                model(input_ids=tokens[start : start + batch_size], use_cache=False)
            for hook in hooks:
                hook.remove()
            for name, linear in linears.items():
                prune_linear(name, linear.weight, stats[name])


def _prune_like(step):
    """One Linear's pruning as the pass does it, from its public math."""
    from compressx.ops.pruning_scores import sparsegpt_prune
    from compressx.passes.dsnot import REFERENCE_SEQ_LEN, DsnotConfig, dsnot_refine, initial_mask
    from compressx.passes.sparsegpt import SparsegptConfig
    from compressx.passes.wanda import WandaConfig, wanda_mask

    name = step["pass"]
    config = {"wanda": WandaConfig, "sparsegpt": SparsegptConfig, "dsnot": DsnotConfig}[name](**step["config"])

    def prune(_, weight, s):
        if name == "wanda":
            weight.masked_fill_(~wanda_mask(weight, s.sq_norm, config.sparsity, config.nm), 0.0)
        elif name == "sparsegpt":
            weight.copy_(sparsegpt_prune(weight, s.hessian, config.sparsity, config.nm)[0])
        else:
            current, keep, score = initial_mask(weight, s, config)
            result = dsnot_refine(
                weight, current, keep, s.mean, s.var, s.sq_norm, max_cycles=config.max_cycles,
                threshold=config.update_threshold / REFERENCE_SEQ_LEN, var_power=config.var_power,
                same_sign=config.same_sign, nm=config.nm, init_score=score,
            )  # fmt: skip
            weight.copy_(result.weight)

    return prune


REFERENCE_STEPS = [
    {"pass": "wanda", "config": {"sparsity": 0.5, "batch_size": 2}},
    {"pass": "wanda", "config": {"pattern": "2:4", "batch_size": 2}},
    {"pass": "sparsegpt", "config": {"sparsity": 0.5, "batch_size": 2}},
    {"pass": "sparsegpt", "config": {"pattern": "2:4", "batch_size": 2}},
    {"pass": "dsnot", "config": {"sparsity": 0.5, "refine_mlp": True, "batch_size": 2}},
    {"pass": "dsnot", "config": {"pattern": "2:4", "refine_mlp": True, "batch_size": 2}},
]


@pytest.mark.parametrize("step", REFERENCE_STEPS, ids=lambda s: f"{s['pass']}-{s['config'].get('pattern', '50%')}")
def test_passes_over_the_iterator_equal_a_whole_model_reference_bit_for_bit(step):
    from conftest import make_tiny_llama

    import compressx

    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = make_tiny_llama()
    _whole_model_reference(reference, tokens, 2, step["pass"] == "sparsegpt", _prune_like(step))
    model = make_tiny_llama()
    compressx.apply(model, [step], data=tokens, progress=False)
    changed = 0
    for (name, expected), (_, got) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(expected, got), name
        changed += int((got == 0).sum())
    assert changed > 0  # the pruning did happen


def test_linears_fed_the_same_tensor_share_its_statistics_computed_once(tiny_llama, monkeypatch):
    """q/k/v (and gate/up) get the very same input tensor: its batch terms are computed once per forward, and each
    Linear's statistics are exactly those computed from its own inputs."""
    computed = []
    terms = LinearStats.terms

    def counting_terms(self, x):
        computed.append(self.columns)
        return terms(self, x)

    monkeypatch.setattr(LinearStats, "terms", counting_terms)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    targets = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and ".layers.0." in n}
    k_inputs, seen = [], {}
    handle = tiny_llama.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda m, i, o: k_inputs.append(i[0].clone())
    )
    for layer in calibrate_layers(tiny_llama, tokens, targets, with_hessian=True, batch_size=2, progress=False):
        seen.update(layer.stats)
    handle.remove()
    assert len(computed) == 2 * 4  # 2 batches x (q/k/v, o_proj, gate/up, down_proj)
    own = LinearStats(32, with_hessian=True)
    for x in k_inputs[:2]:  # the calibration forwards (the next two are the layer's output forwards)
        own.add(x)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        for field in ("sum_x", "sum_x2", "sum_var", "xxt"):
            assert torch.equal(getattr(seen[name], field), getattr(own, field)), (name, field)
        assert (seen[name].n_seq, seen[name].n_tok) == (own.n_seq, own.n_tok)


def test_variance_is_only_collected_when_asked(tiny_llama, monkeypatch):
    """Wanda and SparseGPT never read the variance (DSnoT does): its per-sequence reduction is skipped for them."""
    import compressx

    calls = []
    var = torch.Tensor.var
    monkeypatch.setattr(torch.Tensor, "var", lambda self, *a, **k: calls.append(1) or var(self, *a, **k))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in ({"pass": "wanda", "config": {"sparsity": 0.5}}, {"pass": "sparsegpt", "config": {"sparsity": 0.5}}):
        compressx.apply(tiny_llama, [step], data=tokens, progress=False)
    assert not calls
    stats = LinearStats(4, with_variance=False)
    stats.add(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="without the variance"):
        _ = stats.var
    compressx.apply(tiny_llama, [{"pass": "dsnot", "config": {"sparsity": 0.5}}], data=tokens, progress=False)
    assert calls


# ---- fused MoE experts: statistics of the tokens routed to each expert ------------------------------------------


def _moe_targets(model):
    from compressx.layerwise import LAYERWISE_TYPES

    return {n: m for n, m in model.named_modules() if isinstance(m, LAYERWISE_TYPES) and ".layers." in n}


def _routed_inputs(model, tokens, layer=0):
    """By hand: the inputs of layer ``layer``'s experts on the dense model, the router run on them, and for every
    expert ``(token indices, gate_up_proj input rows, down_proj input rows)``."""
    moe = model.model.layers[layer].mlp
    seen = []
    hook = moe.experts.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    hook.remove()
    hidden = seen[0]
    with torch.no_grad():
        _, _, index = moe.gate(hidden)
        routed = {}
        for e in range(4):
            token = torch.where(index == e)[0]
            x = hidden[token]
            gate, up = (x @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            routed[e] = (token, x, moe.experts.act_fn(gate) * up)
    return hidden, routed


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    from test_llm_architectures import make_moe

    model = make_moe("mixtral")
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden, routed = _routed_inputs(model, tokens)
    for layer in calibrate_layers(model, tokens, _moe_targets(model), with_hessian=True, batch_size=2, progress=False):
        stats = layer.stats
        break
    for e, (token, x, intermediate) in routed.items():
        for param, inputs in (("gate_up_proj", x), ("down_proj", intermediate)):
            s = stats[f"mlp.experts.{param}[{e}]"]
            assert s.n_tok == len(token) and 0 < len(token) < len(hidden)
            assert torch.allclose(s.sq_norm, inputs.pow(2).sum(0) / 4, rtol=1e-5, atol=1e-7)
            assert torch.allclose(s.hessian, 2 * inputs.T @ inputs / len(token), rtol=1e-4, atol=1e-6)
            assert torch.allclose(s.mean, inputs.mean(0), rtol=1e-4, atol=1e-6)
            # the within-sequence variance over each sequence's routed tokens (sequences of 16 tokens)
            sequence = token // 16
            within = sum(
                inputs[sequence == b].var(0, unbiased=False) * int((sequence == b).sum())
                for b in range(4)
                if (sequence == b).any()
            )
            assert torch.allclose(s.var, within / len(token), rtol=1e-4, atol=1e-6)
        # not the statistics of every token: the test fails if the experts saw all of them
        assert not torch.allclose(stats[f"mlp.experts.gate_up_proj[{e}]"].sq_norm, hidden.pow(2).sum(0) / 4, rtol=0.05)
    # the attention's Linears keep their all-token statistics
    assert stats["self_attn.q_proj"].n_tok == 64


def test_wanda_prunes_each_expert_with_its_routed_norms():
    from test_llm_architectures import make_moe

    import compressx
    from compressx.passes.wanda import wanda_mask

    model = make_moe("mixtral")
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    _, routed = _routed_inputs(model, tokens)
    dense = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    dense_down = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    compressx.apply(model, [{"pass": "wanda", "config": {"sparsity": 0.5}}], tokens, progress=False)
    experts = model.model.layers[0].mlp.experts
    for e, (_, x, intermediate) in routed.items():
        for got, weight, inputs in ((experts.gate_up_proj[e], dense[e], x), (experts.down_proj[e], dense_down[e],
                                                                              intermediate)):  # fmt: skip
            keep = wanda_mask(weight, inputs.pow(2).sum(0) / 4, 0.5, None)
            assert torch.equal(got, weight * keep), e
            all_tokens = wanda_mask(weight, torch.ones(weight.shape[1]), 0.5, None)
            assert not torch.equal(keep, all_tokens)  # the routed norms do matter


def _never_route_to_expert_3(model):
    """A router that never chooses expert 3 (its logit set to -inf before the top-k)."""

    def exclude(module, args, output):
        logits = output[0].clone()
        logits[:, 3] = float("-inf")
        top, index = torch.topk(logits.float().softmax(dim=-1), module.top_k, dim=-1)
        return output[0], top / top.sum(dim=-1, keepdim=True), index

    return [layer.mlp.gate.register_forward_hook(exclude) for layer in model.model.layers]


@pytest.mark.parametrize("step", [
    {"pass": "wanda", "config": {"sparsity": 0.5}},
    {"pass": "sparsegpt", "config": {"sparsity": 0.5}},
    {"pass": "dsnot", "config": {"pattern": "2:4", "refine_mlp": True}},
], ids=["wanda", "sparsegpt", "dsnot-2:4"])  # fmt: skip
def test_an_expert_no_token_reaches_is_pruned_by_magnitude_not_zeroed(step):
    from test_llm_architectures import make_moe

    import compressx
    from compressx.ops.sparsity import nm_mask, topk_mask

    model = make_moe("mixtral")
    _never_route_to_expert_3(model)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    report = compressx.apply(model, [step], tokens, progress=False).steps[0].report
    names = [f"model.layers.{i}.mlp.experts.{p}[3]" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert report["uncalibrated_experts"] == names
    for name in names:
        param, e = name[: -len("[3]")], 3
        weight, original = model.get_parameter(param)[e], dense[param][e]
        scores = original.abs()
        keep = nm_mask(scores, 2, 4) if "pattern" in step["config"] else topk_mask(scores, 0.5, dim=1)
        assert torch.equal(weight, original * keep), name  # magnitude per row / per N:M block, values unchanged
        assert report["per_module"][name] == 0.5
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_experts_whose_output_is_not_the_recomputed_mixture_are_one_clear_error():
    from test_llm_architectures import make_moe

    import compressx

    model = make_moe("mixtral")
    model.model.layers[0].mlp.experts.register_forward_hook(lambda module, args, output: output * 2)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompressxError, match="MixtralExperts.*cannot calibrate that experts layout.*magnitude"):
        compressx.apply(model, [{"pass": "wanda", "config": {"sparsity": 0.5}}], tokens, progress=False)


def test_an_unknown_experts_layout_is_refused_before_any_work():
    import transformers

    import compressx
    from compressx.errors import RecipeError

    config = transformers.GptOssConfig(vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        RecipeError, match="GptOssExperts.*cannot calibrate this experts layout: prune it with magnitude"
    ):
        compressx.apply(model, [{"pass": "sparsegpt", "config": {"sparsity": 0.5}}], tokens, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_moe_resume_and_disk_offload_give_the_in_memory_experts(tmp_path):
    """Fused expert parameters are saved and restored whole by the layer checkpoints (the uncalibrated experts'
    names too), and written back to accelerate's offload storage."""
    from accelerate import disk_offload
    from test_checkpoint import Crash, _store
    from test_llm_architectures import make_moe

    import compressx

    steps = [{"pass": "sparsegpt", "config": {"sparsity": 0.5, "batch_size": 2}}]
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))

    def run(store=None, resume=False, crash=False, offload=False):
        model = make_moe("mixtral")
        _never_route_to_expert_3(model)
        if offload:
            model = disk_offload(model, str(tmp_path / "off"), execution_device=torch.device("cpu"))
        hook = None
        if crash:
            hook = model.model.layers[1].register_forward_pre_hook(
                lambda module, args: (_ for _ in ()).throw(Crash(1))
            )
        try:
            result = compressx.apply(model, steps, tokens, progress=False, checkpoint=store, resume=resume)
        finally:
            if hook is not None:
                hook.remove()
        experts = {}
        for i, layer in enumerate(model.model.layers):
            from accelerate.utils import align_module_device

            with align_module_device(layer.mlp.experts, torch.device("cpu")):
                experts[i] = [
                    p.detach().clone() for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
                ]
        return experts, result.steps[0].report

    expected, report = run()
    with pytest.raises(Crash):
        run(_store(tmp_path / "ckpt", False), crash=True)
    resumed, resumed_report = run(_store(tmp_path / "ckpt", True), resume=True)
    offloaded, offloaded_report = run(offload=True)
    for got in (resumed, offloaded):
        assert all(torch.equal(a, b) for i in expected for a, b in zip(expected[i], got[i]))
    assert resumed_report == report == offloaded_report
    assert len(report["uncalibrated_experts"]) == 4
