"""Layer-by-layer pruning of models whose weights accelerate offloads to CPU or disk."""

import hashlib

import pytest
import torch
import torch.nn as nn
from accelerate import cpu_offload, disk_offload
from accelerate.utils import align_module_device, has_offloaded_params

import compressx
from compressx.layerwise import calibrate_layers, execution_device
from compressx.memory import live_cpu_tensor_bytes

TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def weights(model):
    """Every decoder Linear's weight, onloaded when accelerate offloads it."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            owner = next(
                (m for n, m in model.named_modules() if has_offloaded_params(m) and name.startswith(n)), module
            )
            with align_module_device(owner, torch.device("cpu")):
                out[name] = module.weight.detach().clone()
    return out


def reference(step):
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    compressx.apply(model, [step], data=TOKENS, progress=False)
    return weights(model)


STEPS = [
    {"pass": "wanda", "config": {"sparsity": 0.5}},
    {"pass": "sparsegpt", "config": {"pattern": "2:4"}},
    {"pass": "dsnot", "config": {"sparsity": 0.6, "refine_mlp": True}},
]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s["pass"])
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_model_gives_the_in_memory_result(step, offload, tmp_path):
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    if offload == "cpu":
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        model = disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert execution_device(model) == torch.device("cpu")
    result = compressx.apply(model, [step], data=TOKENS, progress=False)
    expected = reference(step)
    got = weights(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    zeros = sum(int((w == 0).sum()) for w in expected.values())
    assert result.steps[0].report["sparsity"] == round(zeros / sum(w.numel() for w in expected.values()), 6)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded


def test_device_map_disk_never_writes_the_source_checkpoint(tmp_path):
    from conftest import make_tiny_llama
    from transformers import LlamaForCausalLM

    source = tmp_path / "ckpt"
    make_tiny_llama().save_pretrained(source)
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(source, device_map=device_map, offload_folder=str(tmp_path / "off"))
    step = {"pass": "dsnot", "config": {"pattern": "2:4", "refine_mlp": True}}
    compressx.apply(model, [step], data=TOKENS, progress=False)
    assert hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest() == digest
    expected = reference(step)
    got = weights(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the offloaded model evaluates and exports like any other
    from compressx.evaluate import perplexity

    assert perplexity(model, TOKENS, progress=False) > 1.0
    compressx.save(model, tmp_path / "export")
    reloaded = compressx.load(tmp_path / "export")
    for name in expected:
        assert torch.equal(reloaded.get_submodule(name).weight, expected[name]), name


def test_disk_offloaded_pruning_keeps_only_the_current_layer_alive(tmp_path):
    """While layer i is pruned, no other layer's weights are onloaded, and what is alive does not grow with i:
    the memory formula of docs/passes/wanda.md counts one layer, not the layers already pruned."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    model = disk_offload(LlamaForCausalLM(config).eval(), str(tmp_path / "off"), execution_device=torch.device("cpu"))
    layers = model.model.layers
    layer_bytes = sum(p.numel() * 4 for p in LlamaForCausalLM(config).model.layers[0].parameters())
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    tokens = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    before = live_cpu_tensor_bytes()
    live = []
    with torch.no_grad():
        for layer in calibrate_layers(model, tokens, targets, batch_size=2, progress=False):
            for j, other in enumerate(layers):
                onloaded = [n for n, p in other.named_parameters() if p.device.type != "meta"]
                assert (j == layer.index) == bool(onloaded), (layer.index, j, onloaded)
            live.append(live_cpu_tensor_bytes() - before)
            for linear in layer.linears.values():
                linear.weight.masked_fill_(linear.weight.abs() < linear.weight.abs().median(), 0.0)
    assert len(live) == 4
    assert min(live) >= layer_bytes  # the onloaded layer is seen: the count is not vacuous
    assert max(live) - min(live) < layer_bytes / 2, live  # no earlier layer's weights kept alive
    activations = 2 * tokens.numel() * config.hidden_size * 4
    assert max(live) < layer_bytes + activations + layer_bytes / 2, (live, layer_bytes, activations)
    assert live_cpu_tensor_bytes() - before < layer_bytes / 2  # nothing onloaded remains afterwards


def test_leaving_the_calibration_loop_early_offloads_the_layer_and_restores_the_model(tmp_path):
    """A pass that stops (break, or an error) in its loop body leaves no weights onloaded and use_cache as it was."""
    from conftest import make_tiny_llama

    model = disk_offload(make_tiny_llama(), str(tmp_path / "off"), execution_device=torch.device("cpu"))
    model.config.use_cache = True
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for layer in calibrate_layers(model, TOKENS, targets, progress=False):
        assert layer.index == 0 and layer.linears["self_attn.q_proj"].weight.device.type == "cpu"  # onloaded
        assert model.config.use_cache is False
        break
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert model.config.use_cache is True
