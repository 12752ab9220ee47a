"""Layer-by-layer pruning of models whose weights accelerate offloads to CPU or disk."""

import hashlib

import pytest
import torch
import torch.nn as nn
from accelerate import cpu_offload, disk_offload
from accelerate.utils import align_module_device, has_offloaded_params

import compressx
from compressx.layerwise import execution_device

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
