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
    assert "compressx.layerwise.DECODER_LAYERS" in message


def test_decoder_layers_table_overrides_the_search(tiny_llama, monkeypatch):
    from compressx import layerwise

    monkeypatch.setitem(layerwise.DECODER_LAYERS, tiny_llama.config.model_type, "model.layers")
    assert decoder_layers(tiny_llama)[0] == "model.layers"
    monkeypatch.setitem(layerwise.DECODER_LAYERS, tiny_llama.config.model_type, "model.norm")
    with pytest.raises(CompressxError, match="'model.norm' is a LlamaRMSNorm, not a ModuleList"):
        decoder_layers(tiny_llama)


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
