import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import compressx
from compressx.errors import ConfigError
from compressx.ops.sparsity import is_nm_sparse
from compressx.passes.wanda import WandaConfig, wanda_mask

TOKENS = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(0))


def decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def test_config():
    assert WandaConfig().sparsity == 0.5 and WandaConfig(pattern="4:8").nm == (4, 8)
    with pytest.raises(ConfigError, match="fixes sparsity"):
        WandaConfig(sparsity=0.6, pattern="2:4")
    with pytest.raises(ConfigError, match="batch_size"):
        WandaConfig(batch_size=0)


def test_one_layer_model_equals_the_formula_by_hand():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.setdefault(n, []).append(i[0]))
             for n, m in decoder_linears(model).items()]  # fmt: skip
    with torch.no_grad():
        model(input_ids=TOKENS)
    for h in hooks:
        h.remove()
    expected = {}
    for name, module in decoder_linears(model).items():
        x = torch.cat(inputs[name]).reshape(-1, module.in_features)
        score = module.weight.abs() * x.norm(dim=0)  # |W_ij| * ||X_j||_2
        k = int(0.5 * module.in_features)
        prune = torch.argsort(score, dim=1, stable=True)[:, :k]
        expected[name] = module.weight.detach().clone().scatter_(1, prune, 0.0)
    compressx.apply(model, [{"pass": "wanda", "config": {"sparsity": 0.5}}], data=TOKENS, progress=False)
    for name, module in decoder_linears(model).items():
        assert torch.equal(module.weight, expected[name]), name


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_sparsity_in_every_row(tiny_llama, sparsity):
    compressx.apply(tiny_llama, [{"pass": "wanda", "config": {"sparsity": sparsity}}], data=TOKENS, progress=False)
    for name, module in decoder_linears(tiny_llama).items():
        zeros = (module.weight == 0).sum(dim=1)
        assert torch.all(zeros == int(sparsity * module.in_features + 1e-6)), name


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_validity(tiny_llama, pattern):
    n, m = map(int, pattern.split(":"))
    compressx.apply(tiny_llama, [{"pass": "wanda", "config": {"pattern": pattern}}], data=TOKENS, progress=False)
    for name, module in decoder_linears(tiny_llama).items():
        assert is_nm_sparse(module.weight, n, m), name
        blocks = (module.weight != 0).reshape(-1, m).sum(dim=1)
        assert torch.all(blocks == n), name


def test_mask_uses_activations_not_only_magnitude():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])
    keep = wanda_mask(weight, sq_norm, 0.5, None)
    assert keep.tolist() == [[True, False, True, False]]  # 1*10 and 3*1 beat 2*1 and 4*0.1
