"""Tiny Llama, Mistral, Qwen2 and OPT checkpoints through recipe -> layer-by-layer pruning -> export -> reload."""

import pytest
import torch
import transformers

import compressx
from compressx.ops.sparsity import is_nm_sparse
from compressx.recipe import parse_recipe
from compressx.runner import check_recipe

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
}


def make_checkpoint(arch, tokenizer, directory):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("step", [
    {"pass": "dsnot", "config": {"pattern": "2:4", "refine_mlp": True}},
    {"pass": "sparsegpt", "config": {"sparsity": 0.5}},
], ids=["dsnot-2of4", "sparsegpt"])  # fmt: skip
def test_recipe_export_reload(arch, step, bpe_tokenizer, tmp_path):
    directory = make_checkpoint(arch, bpe_tokenizer, tmp_path / arch)
    recipe = parse_recipe(
        {
            "model": {"source": "hf", "id": str(directory)},
            "data": {"calibration": {"source": "stdlib_text", "split": "val", "samples": 4, "seq_len": 32}},
            "steps": [step],
            "eval": [{"metric": "perplexity", "data": {"source": "stdlib_text", "samples": 2, "seq_len": 32}}],
            "export": {"dir": str(tmp_path / "export")},
        }
    )
    check_recipe(recipe)
    run = compressx.run_recipe(recipe, progress=False)
    report = run.result.steps[0].report
    assert report["modules"] == 12 if arch == "opt" else 14
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    for name in run.result.steps[0].targets:
        weight = run.model.get_submodule(name).weight
        if step["pass"] == "dsnot":
            assert is_nm_sparse(weight, 2, 4), name
    reloaded = compressx.load(tmp_path / "export")
    tokens = torch.randint(0, len(bpe_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=tokens).logits, reloaded(input_ids=tokens).logits)


# ---- decoder layers found from the model itself: Wanda on tiny configs of many transformers decoders ---------------

TINY = {"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 128}  # fmt: skip
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2,
                                                     "head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2,
                                                              "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"intermediate_size": 64, "num_key_value_heads": 2,
                                               "pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"intermediate_size": 64}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
}  # fmt: skip


def make_decoder(arch):
    config_cls, model_cls, extra = DECODERS[arch]
    base = {} if arch == "gpt2" else dict(TINY)
    config = getattr(transformers, config_cls)(**{**base, **extra, "vocab_size": 320})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("pass_name", ["wanda", "sparsegpt", "dsnot"])
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_layerwise_passes_find_the_decoder_layers_of_any_decoder(arch, pass_name):
    model = make_decoder(arch)
    assert model.config.model_type == arch
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = compressx.apply(model, [{"pass": pass_name, "config": {"sparsity": 0.5}}], tokens, progress=False)
    report = result.steps[0].report
    targets = result.steps[0].targets
    assert {n.split(".")[n.split(".").index("0") - 1] if ".0." in n else None for n in targets} - {None}, targets
    assert {".0." in n or ".1." in n for n in targets} == {True}, targets  # inside the two decoder layers only
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6), report
    assert report["modules"] == len(targets)
    for name in targets:  # every target pruned by half; nothing outside the targets changed
        weight = model.get_submodule(name).weight
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{name}.weight" for name in targets}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens).logits).all()


# ---- mixture of experts: every expert pruned with the tokens routed to it, the router untouched -----------------


def make_moe(arch, seed=0):
    """Tiny Mixtral / Qwen2-MoE (hidden 32, 2 layers, 4 experts, top-2); fused experts drawn from N(0, 0.05) (their
    init leaves them at zero variance in some transformers versions)."""
    from conftest import with_random_experts

    base = {**TINY, "num_key_value_heads": 2}
    if arch == "mixtral":
        config = transformers.MixtralConfig(**base, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
        model_cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(**base, intermediate_size=32, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                             decoder_sparse_step=1)  # fmt: skip
        model_cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(seed)
    return with_random_experts(model_cls(config).eval())


def expert_slices(model):
    """``{report key: [out, in] expert slice}`` of every fused experts module (``weight_matrices``' naming)."""
    from compressx.targets import FusedExperts, weight_matrices

    return {
        key: w for name, m in model.named_modules() if isinstance(m, FusedExperts)
        for key, w in weight_matrices(name, m).items()
    }  # fmt: skip


MOE_STEPS = {
    "wanda": {"pass": "wanda", "config": {"sparsity": 0.5}},
    "sparsegpt": {"pass": "sparsegpt", "config": {"sparsity": 0.5}},
    "dsnot": {"pass": "dsnot", "config": {"sparsity": 0.5, "refine_mlp": True}},
    "wanda-2:4": {"pass": "wanda", "config": {"pattern": "2:4"}},
}


@pytest.mark.parametrize("key", list(MOE_STEPS))
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_layerwise_passes_prune_every_expert_and_leave_the_router_dense(arch, key):
    from compressx.targets import FusedExperts

    model = make_moe(arch)
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = compressx.apply(model, [MOE_STEPS[key]], tokens, progress=False)
    report = result.steps[0].report
    slices = expert_slices(model)
    assert len(slices) == 2 * 2 * 4  # gate_up_proj and down_proj of 4 experts in 2 layers
    for name, weight in slices.items():
        if key.endswith("2:4"):
            assert is_nm_sparse(weight, 2, 4), name
        elif key == "sparsegpt":  # one column block: floor(sparsity * numel) in it
            assert int((weight == 0).sum()) == weight.numel() // 2, name
        else:
            assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name
        assert report["per_module"][name] == 0.5
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert report["uncalibrated_experts"] == []
    # what changed: exactly the experts' parameters and the Linear targets; the router and the MoE gate stay dense
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    experts = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, FusedExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    linears = {f"{k}.weight" for k in report["per_module"] if not k.endswith("]")}
    assert changed == experts | linears
    assert not any(".mlp.gate." in n or "shared_expert_gate" in n for n in changed)
    assert report["modules"] == len(slices) + len(linears)
    if arch == "qwen2_moe":
        assert report["left_dense"] == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
        assert any("shared_expert.down_proj" in k for k in linears)  # the shared expert is an MLP, pruned
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens).logits).all()


def test_dsnot_refines_what_magnitude_left_in_the_experts():
    """``init: previous`` reads each expert's dense slice from the 3-D original parameters."""
    model = make_moe("mixtral")
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    steps = [
        {"pass": "magnitude", "config": {"sparsity": 0.5, "scope": "row"}, "targets": ["re:.*layers\\..*"]},
        {"pass": "dsnot", "config": {"init": "previous", "refine_mlp": True}},
    ]
    result = compressx.apply(model, steps, tokens, progress=False)
    report = result.steps[1].report
    refined = [k for k in report["refinement"] if ".experts." in k]
    assert len(refined) == 16 and report["expected_error_reduction"] > 0
    for name, weight in expert_slices(model).items():
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name
