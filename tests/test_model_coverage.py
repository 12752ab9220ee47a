"""Model families beyond Llama (issue 17): GPT-2 (transformers' Conv1D, tied lm_head), fused MoE experts (Mixtral,
Qwen2-MoE), NaN/Inf inputs, and sparsity reports that equal a census of the exported weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import with_random_experts
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import compressx
from compressx.errors import CompressxError, RecipeError
from compressx.models import _family_of
from compressx.targets import FusedExperts, TransposedLinear

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(**SMALL, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).eval()
    return with_random_experts(model)


def make_qwen_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1)  # fmt: skip
    model = Qwen2MoeForCausalLM(config).eval()
    return with_random_experts(model)


def make_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**SMALL, head_dim=8, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, decoder_sparse_step=1)  # fmt: skip
    model = Qwen3MoeForCausalLM(config).eval()
    return with_random_experts(model)


def tokens(n: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq_len), generator=torch.Generator().manual_seed(1))


PASSES = {
    "magnitude": {"sparsity": 0.5},
    "magnitude_row": {"sparsity": 0.5, "scope": "row"},
    "magnitude_2:4": {"pattern": "2:4"},
    "wanda": {"sparsity": 0.5},
    "wanda_2:4": {"pattern": "2:4"},
    "sparsegpt": {"sparsity": 0.5, "blocksize": 16},
    "dsnot": {"sparsity": 0.5},
}


def step(key: str, **extra) -> dict:
    return {"pass": key.split("_")[0], "config": PASSES[key], **extra}


def census_matches_report(model, result, tmp_path) -> dict[str, torch.Tensor]:
    """Export, then check the report against a census of the export; returns the reloaded state dict.

    transformers may save weights under other names than the model's (Mixtral's fused experts are written as
    per-expert ``w1``/``w2``/``w3``), so the raw files give the totals and the reloaded model the per-tensor split.
    """
    export = compressx.save(model, tmp_path / "export", result)
    report = result.steps[0].report
    saved = {}
    for path in sorted((tmp_path / "export").glob("*.safetensors")):
        saved.update(load_file(path))
    # Every exact zero of the exported weight matrices is one the report counts, and no more (1-D tensors hold
    # biases, which GPT-2 initialises at zero).
    assert sum(int((t == 0).sum()) for t in saved.values() if t.dim() >= 2) == report["pruned_weights"]
    state = compressx.load(export).state_dict()
    zeros = total = 0
    for key, fraction in report["per_module"].items():
        expert = re.fullmatch(r"(.*)\[(\d+)\]", key)  # one expert's slice of fused experts (layer-wise passes)
        tensor = state[expert[1]][int(expert[2])] if expert else state.get(f"{key}.weight", state.get(key))
        assert tensor is not None, f"{key} of the report is not in the reloaded export"
        z = int((tensor == 0).sum())
        assert fraction == round(z / tensor.numel(), 6), key
        zeros, total = zeros + z, total + tensor.numel()
    assert (report["pruned_weights"], report["target_weights"]) == (zeros, total)
    assert report["sparsity"] == round(zeros / total, 6)
    return state


# ---- GPT-2: Conv1D is a Linear stored [in, out]; lm_head is tied to wte ----------------------------------------


@pytest.mark.parametrize("key", list(PASSES))
def test_gpt2_every_sparsity_pass_prunes_the_blocks_and_reports_the_export(key, tmp_path):
    model = make_gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    result = compressx.apply(model, [step(key)], tokens(), progress=False)
    targets = result.steps[0].targets
    assert targets and all(name.startswith("transformer.h.") for name in targets)
    assert len(targets) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of the 2 blocks: Conv1D, supported
    assert torch.equal(model.transformer.wte.weight, wte)  # the tied lm_head / wte is untouched
    state = census_matches_report(model, result, tmp_path)
    for name in targets:
        stored = state[f"{name}.weight"]  # [in, out]
        matrix = stored.t()  # [out, in]: rows are outputs, blocks run along the input
        if key in ("magnitude_row", "wanda", "dsnot"):  # per output row: the same count in every row
            assert ((matrix == 0).sum(dim=1) == math.floor(0.5 * matrix.shape[1])).all(), name
        if key.endswith("2:4"):
            assert ((matrix.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name
    assert result.steps[0].report["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_gpt2_nm_blocks_run_along_the_input_dimension_of_the_conv1d_weight():
    model = make_gpt2()
    compressx.apply(model, [step("magnitude_2:4", targets=["transformer.h.0.mlp.c_fc"])], progress=False)
    stored = model.transformer.h[0].mlp.c_fc.weight.detach()  # [in=32, out=128]
    assert ((stored.t().reshape(-1, 4) != 0).sum(dim=1) == 2).all()
    assert not ((stored.reshape(-1, 4) != 0).sum(dim=1) == 2).all()  # blocks along the output would not be 2:4


def test_gpt2_dsnot_refines_the_previous_step_mask_of_conv1d_weights():
    model = make_gpt2()
    steps = [step("wanda"), {"pass": "dsnot", "config": {"init": "previous", "refine_mlp": True}}]
    result = compressx.apply(model, steps, tokens(), progress=False)
    assert result.steps[1].report["refined_modules"] == 8
    assert result.steps[1].report["sparsity"] == result.steps[0].report["sparsity"]  # swaps keep every row's count
    for name in result.steps[1].targets:
        matrix = model.get_submodule(name).weight.detach().t()
        assert ((matrix == 0).sum(dim=1) == matrix.shape[1] // 2).all(), name


def test_gpt2_tied_lm_head_is_refused_when_targeted():
    model = make_gpt2()
    with pytest.raises(RecipeError) as err:
        compressx.apply(model, [{"pass": "magnitude", "targets": ["lm_head"]}], progress=False)
    assert "tied" in str(err.value) and "transformer.wte.weight" in str(err.value)
    assert "add 'lm_head' to ignore" in str(err.value)


def test_causal_lm_default_targets_are_the_decoder_layers():
    model = make_gpt2()
    result = compressx.apply(model, [{"pass": "magnitude"}], progress=False)
    assert "lm_head" not in result.steps[0].targets
    assert all(name.startswith("transformer.h.") for name in result.steps[0].targets)


def test_gpt2_is_a_causal_lm_for_perplexity():
    assert _family_of(make_gpt2()) == "llm"
    assert isinstance(make_gpt2().transformer.h[0].attn.c_attn, TransposedLinear)


def test_default_target_error_does_not_blame_a_pattern_the_user_did_not_write():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(RecipeError) as err:
        compressx.apply(model, [{"pass": "wanda"}], tokens(), progress=False)
    message = str(err.value)
    assert "none given" in message and "default targets" in message
    assert "targets[0]: pattern" not in message


def test_training_pass_refuses_conv1d_it_cannot_change():
    with pytest.raises(RecipeError) as err:
        compressx.prepare(make_gpt2(), "sr_ste", {"pattern": "2:4"})
    assert "Conv1D" in str(err.value) and "cannot change" in str(err.value)


# ---- fused MoE experts: pruned per expert by magnitude and by the calibration passes ----------------------------


MOE = {"mixtral": make_mixtral, "qwen2_moe": make_qwen_moe, "qwen3_moe": make_qwen3_moe}


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("key", ["magnitude", "magnitude_row", "magnitude_2:4"])
def test_moe_magnitude_prunes_every_expert_and_reports_the_export(arch, key, tmp_path):
    model = MOE[arch]()
    result = compressx.apply(model, [step(key)], progress=False)
    report = result.steps[0].report
    fused = [k for k in report["per_module"] if k.endswith(("gate_up_proj", "down_proj")) and "experts" in k]
    assert len(fused) == 4  # gate_up_proj and down_proj in each of the 2 layers
    for module in model.modules():
        if isinstance(module, FusedExperts):
            for param in (module.gate_up_proj, module.down_proj):
                for expert in param:  # each expert slice is a layer of its own: [out, in]
                    if key == "magnitude_row":
                        assert ((expert == 0).sum(dim=1) == expert.shape[1] // 2).all()
                    elif key == "magnitude_2:4":
                        assert ((expert.reshape(-1, 4) != 0).sum(dim=1) == 2).all()
                    else:
                        assert int((expert == 0).sum()) == expert.numel() // 2
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    census_matches_report(model, result, tmp_path)


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("key", ["wanda", "sparsegpt", "dsnot"])
def test_moe_calibration_passes_prune_every_expert_or_leave_ignored_experts_dense(arch, key, tmp_path):
    model = MOE[arch]()
    result = compressx.apply(model, [step(key)], tokens(), progress=False)
    per_module = result.steps[0].report["per_module"]
    for layer in range(2):
        for e in range(4):
            for param in ("gate_up_proj", "down_proj"):
                assert per_module[f"model.layers.{layer}.mlp.experts.{param}[{e}]"] == 0.5
    census_matches_report(model, result, tmp_path)
    model = MOE[arch]()
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    result = compressx.apply(model, [step(key, ignore=["re:.*\\.experts"])], tokens(), progress=False)
    assert not any("experts" in k for k in result.steps[0].report["per_module"])
    assert all(torch.equal(model.get_parameter(n), p) for n, p in dense.items())


def test_other_3d_parameters_are_not_mistaken_for_experts():
    class TinyViT(torch.nn.Module):  # a ViT keeps pos_embed [1, tokens, dim] on the model itself
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 8))
            self.body = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 8)

    model = TinyViT()
    pos_embed = model.pos_embed.detach().clone()
    result = compressx.apply(model, [{"pass": "magnitude"}], progress=False)
    assert torch.equal(model.pos_embed, pos_embed) and list(result.steps[0].report["per_module"]) == ["body", "head"]
    compressx.prepare(TinyViT(), "sr_ste", {"pattern": "2:4"}).remove()  # no "fused experts" error


# ---- NaN / Inf -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["magnitude", "wanda", "sparsegpt", "dsnot"])
def test_nan_weights_are_refused_naming_the_module(key, tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CompressxError) as err:
        compressx.apply(tiny_llama, [step(key)], tokens(), progress=False)
    assert "model.layers.1.mlp.up_proj" in str(err.value) and "NaN or Inf" in str(err.value)


@pytest.mark.parametrize("key", ["wanda", "sparsegpt"])
def test_inf_activations_are_refused_naming_the_module(key, tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.gate_proj.weight[0, 0] = float("inf")  # inf into down_proj's inputs
    with pytest.raises(CompressxError) as err:
        compressx.apply(tiny_llama, [step(key, ignore=["model.layers.0.mlp.gate_proj"])], tokens(), progress=False)
    assert "calibration inputs" in str(err.value) and "model.layers.0.mlp.down_proj" in str(err.value)


# ---- spre degrades to SR-STE on a model without conv + BatchNorm pairs: said in the report -------------------


def test_spre_on_linear_layers_says_it_is_sr_ste(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 4))  # fmt: skip
    with caplog.at_level("WARNING"):
        result = compressx.apply(model, [{"pass": "spre", "config": {"pattern": "2:4"}}], progress=False)
    report = result.steps[0].report
    assert report["extra_branches"] == 0 and "sr_ste" in report["note"]
    assert "no extra branch" in caplog.text
    result.steps[0].handle.remove()
