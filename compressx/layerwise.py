"""Layer-by-layer ("sequential") calibration of decoder LLMs, the loop Wanda, SparseGPT and DSnoT share.

1. The calibration sequences run through the model up to the first decoder layer; a forward pre-hook on that
   layer captures its inputs (hidden states and every keyword argument: attention mask, position embeddings,
   cache position...) and stops the forward.
2. For each decoder layer in order: hooks on the layer's target ``Linear`` modules collect statistics of their
   inputs (``LinearStats``) while the still-dense layer runs on the captured inputs; ``calibrate_layers`` yields
   the layer and the pass prunes those modules from the statistics in its own ``for`` loop; when the loop
   advances, the now-pruned layer runs again and its outputs become the next layer's inputs. So layer i is
   calibrated on what the pruned layers 0..i-1 produce, as in Wanda and SparseGPT.

Memory: only the layer being pruned is moved to the compute ``device`` (the rest of the model stays where it
is, e.g. on CPU), plus two activation buffers of ``samples x seq_len x hidden`` floats (inputs and outputs of
the current layer) and the statistics of one layer's Linears (a ``C_in x C_in`` Hessian each for SparseGPT),
plus the transient memory of one forward or of pruning one Linear. The formula, what it leaves out, and its
measurement: docs/passes/wanda.md ("Memory") and docs/results/offload_memory.md. On CPU, freed memory is handed
back to the OS after each phase of a layer (``compressx.memory.release_freed_memory``), else glibc's heap keeps
it. Offloaded weights (accelerate) are onloaded for the layer's turn and written back (``compressx.offload``).

Resuming: with ``checkpoint`` (``compressx.checkpoint.LayerCheckpoints``), each pruned layer's target weights
(and the ``info`` the pass set about it) are saved atomically after the layer; a resumed run loads the saved
layers instead of yielding them, and runs them forward to get the next layer's inputs, so it continues at the
first layer without a checkpoint, with the inputs an uninterrupted run would have given it.

Mixture-of-experts layers (Mixtral, Qwen-MoE in transformers 5): fused experts (``compressx.targets.FusedExperts``,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``) are calibrated per expert. A forward hook on the experts
module reads its call ``experts(hidden_states, top_k_index, top_k_weights)``: expert ``e``'s ``gate_up_proj`` slice
gets the statistics of the tokens routed to it, its ``down_proj`` slice those of the intermediate
``act_fn(gate) * up`` recomputed from the still-dense weights for those tokens (per sequence, as for a Linear).
On the first batch of each layer the recomputed expert mixture must equal the module's own output, else one clear
error (a layout compressx does not know). Each expert slice is then one weight matrix for the pass
(``CalibratedLayer.matrices``); an expert no calibration token was routed to is pruned by magnitude in the pass's
pattern instead (``CalibratedLayer.uncalibrated``, listed in the report under ``uncalibrated_experts``), not
zeroed. The router (not a Linear) is never a target; a Linear beside fused experts in their MoE block (Qwen2-MoE's
``shared_expert_gate``, a router written as a Linear) is a gate: it is left dense and listed under ``left_dense``.

Architectures: the decoder layers are found from the model itself (``compressx.targets.decoder_layers_path``: the
``ModuleList`` of the blocks transformers names in ``_no_split_modules``), so any decoder-only LM transformers
ships works whose layers take the hidden states first (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, Falcon,
OPT...). For a model it gets wrong, or one without such a list, a step names the list: ``config: {layers: ...}``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressx.checkpoint import LayerCheckpoints
from compressx.errors import CompressxError
from compressx.memory import release_freed_memory
from compressx.offload import offloaded_modules, onloaded, write_back
from compressx.ops.sparsity import check_finite, nm_mask, nm_shape_problems, sparsity_report, topk_mask
from compressx.targets import (
    FusedExperts,
    TransposedLinear,
    expert_key,
    weight_matrices,
    weight_tensors,
)

log = logging.getLogger(__name__)

# Linear names (relative to a decoder layer) that form its MLP, per model_type (DSnoT's ``refine_mlp``)
MLP_PREFIXES: dict[str, tuple[str, ...]] = {"opt": ("fc1", "fc2")}  # GPT-2's "mlp." is the default
_DEFAULT_MLP_PREFIXES = ("mlp.",)
DECODER_LINEARS = ("re:.*layers\\.\\d+\\..*",)  # for a model that is not a causal LM (one has its decoder layers)
# Linear layers, transformers' Conv1D (GPT-2) as the Linear it is, and fused MoE experts (each expert's slice a
# Linear calibrated on the tokens routed to it; layouts checked by ``experts_layout_problem``)
LAYERWISE_TYPES = (nn.Linear, TransposedLinear, FusedExperts)
_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of a model's decoder layers: ``path`` (a pass's ``layers`` option) when
    given, else found from the model (``compressx.targets.decoder_layers_path``); a clear error when neither works."""
    from compressx.targets import decoder_layers_path

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    hint = f" (its ModuleLists: {', '.join(lists[:6])})" if lists else ""
    if path is None:
        path = decoder_layers_path(model)
        if path is None:
            raise CompressxError(
                f"layer-by-layer calibration cannot find the decoder layers of {type(model).__name__} "
                f"(model_type {model_type!r}): it has no ModuleList of repeated blocks{hint}. Name the ModuleList "
                "of its decoder layers in the step's config, e.g. `config: {layers: model.layers}`"
            )
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        raise CompressxError(
            f"layers: {type(model).__name__} (model_type {model_type!r}) has no module {path!r}; name the ModuleList "
            f"of its decoder layers{hint}"
        ) from None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise CompressxError(
            f"layers: {path!r} of {type(model).__name__} is a {type(layers).__name__}, not a ModuleList of decoder "
            f"layers; name the ModuleList of its decoder layers{hint}"
        )
    return path, layers


def layerwise_problems(model: nn.Module, config: object = None) -> list[str]:
    """``register_pass(check_model=...)`` of the layer-wise passes: why ``model``'s decoder layers cannot be found
    (at ``config.layers`` when the step names them)."""
    if not isinstance(model, nn.Module):
        return [f"layer-by-layer calibration needs a torch model, got {type(model).__name__}"]
    try:
        decoder_layers(model, getattr(config, "layers", None))
    except CompressxError as err:
        return [str(err)]
    return []


def experts_layout_problem(name: str, module: nn.Module) -> str | None:
    """Why the fused experts ``module`` cannot be calibrated per expert (None when they can): compressx recomputes
    each expert's intermediate as transformers' Mixtral / Qwen-MoE experts do, from ``gate_up_proj`` and
    ``down_proj`` alone with ``act_fn(gate) * up`` (no biases, no clamping, no interleaved gate/up)."""
    params = dict(module.named_parameters())
    known = (
        set(params) == {"gate_up_proj", "down_proj"}
        and all(p.dim() == 3 for p in params.values())
        and callable(getattr(module, "act_fn", None))
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
    )
    if known:
        matrices = weight_matrices(name, module)
        gate_up, down = matrices[expert_key(f"{name}.gate_up_proj", 0)], matrices[expert_key(f"{name}.down_proj", 0)]
        known = gate_up.shape[0] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[0]
    if known:
        return None
    return (
        f"'{name}' ({type(module).__name__}, parameters {sorted(params)}): layer-by-layer calibration handles fused "
        "experts holding only gate_up_proj [experts, 2*intermediate, hidden] and down_proj [experts, hidden, "
        "intermediate] combined as act_fn(gate) * up without biases (Mixtral, Qwen-MoE); it cannot calibrate this "
        "experts layout: prune it with magnitude, or add it to ignore"
    )


def experts_layout_problems(targets: dict[str, nn.Module]) -> list[str]:
    """``experts_layout_problem`` of every fused experts module among ``targets``."""
    return [
        problem
        for name, module in targets.items()
        if isinstance(module, FusedExperts) and (problem := experts_layout_problem(name, module))
    ]


def layerwise_target_problems(targets: dict[str, nn.Module], config: Any) -> list[str]:
    """``register_pass(check=...)`` of the layer-wise passes: fused experts of a layout they cannot calibrate, and
    weight matrices (per expert for fused experts) whose shape cannot take ``config.nm``."""
    problems = experts_layout_problems(targets)
    matrices = {key: w for name, m in targets.items() for key, w in weight_matrices(name, m).items()}
    return problems + nm_shape_problems(matrices, config.nm)


def moe_gates(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """The Linear targets that sit beside fused experts in their MoE block (Qwen2-MoE's ``shared_expert_gate``, a
    router written as a Linear): gates that decide how much each expert's output counts, left dense."""
    gates = []
    for name, module in targets.items():
        if isinstance(module, FusedExperts) or "." not in name:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        if any(isinstance(child, FusedExperts) for child in parent.children()):
            gates.append(name)
    return gates


def is_mlp(model: nn.Module, relative_name: str) -> bool:
    """Whether a Linear (named relative to its decoder layer) belongs to the layer's MLP."""
    prefixes = MLP_PREFIXES.get(getattr(model.config, "model_type", ""), _DEFAULT_MLP_PREFIXES)
    return relative_name.startswith(prefixes)


@dataclasses.dataclass
class LinearStats:
    """Statistics of a Linear's inputs over the calibration sequences.

    Accumulated per sequence, as the DSnoT reference code does:
    ``mean`` — per-channel mean over all tokens; ``var`` — the within-sequence population variance, averaged
    over sequences with token-count weights (the spread of per-sequence means is left out); ``sq_norm`` —
    ``||X_r||^2 / n_sequences`` (the Wanda norm, squared); ``hessian`` — ``2/n_tokens * X X^T`` when asked.
    ``var`` only ``with_variance`` (DSnoT uses it; it is the costliest of the per-channel sums). An expert slice of
    fused experts gets only the rows routed to it (``routed_terms``): sequences count all the same, tokens do not.
    """

    columns: int
    with_hessian: bool = False
    with_variance: bool = True
    n_seq: int = 0
    n_tok: int = 0
    sum_x: torch.Tensor | None = None
    sum_x2: torch.Tensor | None = None
    sum_var: torch.Tensor | None = None
    xxt: torch.Tensor | None = None

    def terms(self, x: torch.Tensor) -> tuple:
        """What a batch of inputs ``[batch, seq, columns]`` (or ``[seq, columns]``) adds to these statistics;
        statistics of the same kind fed the very same tensor add the same terms (``add_terms``)."""
        x = x.detach().float().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.detach().float()[None]
        seq_len = x.shape[1]
        flat = x.reshape(-1, self.columns)
        return (
            x.shape[0],
            x.shape[0] * seq_len,
            x.sum(dim=(0, 1)).double(),
            x.pow(2).sum(dim=(0, 1)).double(),
            (x.var(dim=1, unbiased=False) * seq_len).sum(dim=0).double() if self.with_variance else None,
            (flat.T @ flat).double() if self.with_hessian else None,
        )

    def routed_terms(self, x: torch.Tensor, sequence: torch.Tensor, n_seq: int) -> tuple:
        """``terms`` of the rows ``x [tokens, columns]`` that reach one expert, ``sequence [tokens]`` saying which of
        the batch's ``n_seq`` sequences each row comes from: the variance is within each sequence's routed tokens,
        ``sq_norm`` is over the batch's sequences (rows not routed here count as zero)."""
        x = x.detach().double()
        sum_x, sum_x2 = x.sum(dim=0), x.pow(2).sum(dim=0)
        var = None
        if self.with_variance:  # sum over sequences of (sum x^2 - (sum x)^2 / n) of their routed tokens
            per_sequence = torch.zeros(n_seq, self.columns, dtype=x.dtype, device=x.device).index_add_(0, sequence, x)
            counts = torch.bincount(sequence, minlength=n_seq).clamp_min(1).to(x.dtype)
            var = (sum_x2 - (per_sequence.pow(2) / counts[:, None]).sum(dim=0)).clamp_min(0.0)
        xxt = (x.T @ x) if self.with_hessian else None
        return n_seq, x.shape[0], sum_x, sum_x2, var, xxt

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[batch, seq, columns]`` (or ``[seq, columns]``)."""
        self.add_terms(self.terms(x))

    def add_terms(self, terms: tuple) -> None:
        n_seq, n_tok, sum_x, sum_x2, sum_var, xxt = terms
        if self.sum_x is None:
            zeros = torch.zeros(self.columns, dtype=torch.float64, device=sum_x.device)
            self.sum_x, self.sum_x2, self.sum_var = zeros.clone(), zeros.clone(), zeros.clone()
            if self.with_hessian:
                self.xxt = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=sum_x.device)
        self.n_seq += n_seq
        self.n_tok += n_tok
        self.sum_x += sum_x
        self.sum_x2 += sum_x2
        if self.with_variance:
            self.sum_var += sum_var
        if self.with_hessian:
            self.xxt += xxt

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum_x / self.n_tok).float()

    @property
    def var(self) -> torch.Tensor:
        if not self.with_variance:
            raise RuntimeError("these statistics were collected without the variance")
        return (self.sum_var / self.n_tok).float()

    @property
    def sq_norm(self) -> torch.Tensor:
        return (self.sum_x2 / self.n_seq).float()

    @property
    def hessian(self) -> torch.Tensor:
        if self.xxt is None:
            raise RuntimeError("these statistics were collected without the Hessian")
        return (2.0 * self.xxt / self.n_tok).float()


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs of ``model`` go: its first real parameter's device, or an accelerate hook's execution device."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        for param in module.parameters(recurse=False):
            if param.device.type != "meta":
                return param.device
    return torch.device("cpu")


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("inputs of the first decoder layer captured")
        self.hidden, self.kwargs = hidden, kwargs


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, layers_path: str | None = None
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run ``tokens`` through the model up to its first decoder layer; return its inputs per micro-batch."""
    _, layers = decoder_layers(model, layers_path)

    signature = inspect.signature(layers[0].forward).parameters
    parameters = list(signature)
    takes_use_cache = "use_cache" in signature or any(p.kind is p.VAR_KEYWORD for p in signature.values())

    def catch(module, args, kwargs):
        # arguments passed by position (Falcon's alibi and mask, ...) become keywords, so every layer call is
        # ``layer(hidden, **kwargs)``
        kwargs = {**dict(zip(parameters, args)), **kwargs}
        hidden = kwargs.pop(parameters[0]) if parameters[0] in kwargs else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "layer_past")}
        raise _Captured(hidden, dict(kwargs, use_cache=False) if takes_use_cache else kwargs)

    device = execution_device(model)
    hiddens, kwargs_list = [], []
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(tokens), batch_size):
            try:
                model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            except _Captured as caught:
                hiddens.append(caught.hidden)
                kwargs_list.append(caught.kwargs)
            else:
                raise CompressxError("the first decoder layer was never called: cannot capture its inputs")
    finally:
        handle.remove()
    return hiddens, kwargs_list


def _expert_intermediate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The input of an expert's ``down_proj`` from the output of its ``gate_up_proj``, as its module computes it."""
    apply_gate = getattr(module, "_apply_gate", None)  # transformers' @use_experts_implementation modules
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


@torch.no_grad()
def record_expert_inputs(
    name: str,
    module: nn.Module,
    call: tuple[tuple, dict],
    output: Any,
    stats: dict[str, LinearStats],
    n_seq: int,
    check: bool,
) -> None:
    """Add each expert's own inputs to the statistics of its weight slices (keys ``expert_key``): the tokens routed
    to it for ``gate_up_proj``, its recomputed ``act_fn(gate) * up`` for ``down_proj``; ``call`` is the experts
    module's ``(args, kwargs)``: ``hidden_states [tokens, hidden]`` (``n_seq`` sequences of equal length, in order),
    ``top_k_index`` and ``top_k_weights [tokens, k]``. ``check``: the routing-weighted sum of the recomputed expert
    outputs must equal the module's ``output``, else a ``CompressxError`` (a layout compressx does not know)."""
    args, kwargs = call
    values = {**dict(zip(_EXPERTS_ARGS, args)), **{k: v for k, v in kwargs.items() if k in _EXPERTS_ARGS}}
    if set(values) != set(_EXPERTS_ARGS):
        missing = ", ".join(sorted(set(_EXPERTS_ARGS) - set(values)))
        raise CompressxError(
            f"'{name}' ({type(module).__name__}) was called without {missing}: layer-by-layer calibration cannot "
            "tell which tokens reach which expert; prune it with magnitude, or add it to ignore"
        )
    hidden, index, routing = (values[k] for k in _EXPERTS_ARGS)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.shape[0] % n_seq:
        raise CompressxError(f"'{name}': {hidden.shape[0]} tokens do not split into {n_seq} sequences")
    seq_len = hidden.shape[0] // n_seq
    matrices = weight_matrices(name, module)
    gate_up_key, down_key = f"{name}.gate_up_proj", f"{name}.down_proj"
    mixture = torch.zeros_like(hidden) if check else None
    for e in range(module.num_experts):
        token, slot = torch.where(index == e)
        x = hidden[token]
        intermediate = _expert_intermediate(module, F.linear(x, matrices[expert_key(gate_up_key, e)]))
        sequence = token // seq_len
        for key, inputs in ((expert_key(gate_up_key, e), x), (expert_key(down_key, e), intermediate)):
            stats[key].add_terms(stats[key].routed_terms(inputs, sequence, n_seq))
        if check:
            expert_out = F.linear(intermediate, matrices[expert_key(down_key, e)]) * routing[token, slot, None]
            mixture.index_add_(0, token, expert_out.to(mixture.dtype))
    if check:
        actual = _first(output).reshape(mixture.shape)
        tolerance = 1e-3 if actual.dtype in (torch.float32, torch.float64) else 3e-2
        if not bool(((mixture - actual).abs().max() <= tolerance * actual.abs().max() + 1e-6).item()):
            raise CompressxError(
                f"'{name}' ({type(module).__name__}): its output is not the routing-weighted sum of "
                "down_proj(act_fn(gate) * up) of its experts, so compressx cannot calibrate that experts layout; "
                "prune it with magnitude, or add it to ignore"
            )


def prune_uncalibrated(layer: CalibratedLayer, sparsity: float, nm: tuple[int, int] | None) -> None:
    """Prune the weight matrices no calibration token reached (experts the router never chose for them) by
    magnitude in the pass's pattern: per output row (unstructured) or per N:M block. Their statistics are empty;
    a calibrated rule would zero them (SparseGPT treats every input as dead) or rank them arbitrarily."""
    for weight in layer.uncalibrated.values():
        scores = weight.detach().abs().float()
        keep = nm_mask(scores, *nm) if nm else topk_mask(scores, sparsity, dim=1)
        weight.masked_fill_(~keep.to(weight.device), 0.0)


@dataclasses.dataclass
class CalibratedLayer:
    """One decoder layer during layer-by-layer calibration, as ``calibrate_layers`` yields it.

    While the loop body runs, the layer's weights are on the compute device (onloaded when accelerate offloads
    them): the pass changes each of ``matrices`` in place, from ``stats[key]`` (same keys), prunes ``uncalibrated``
    with ``prune_uncalibrated``, and may set ``info`` (JSON) to what it decided, which the layer checkpoint keeps.
    """

    index: int
    prefix: str  # the layer's full name with a trailing dot: ``prefix + name`` is a Linear's full name
    linears: dict[str, nn.Module]  # the target Linears (Conv1D, fused experts) of the layer, named relative to it
    stats: dict[str, LinearStats]  # input statistics per weight matrix, on the still-dense layer; emptied after
    # ``[out, in]`` views (writing through to the parameters) of the weight matrices to prune, keyed like ``stats``:
    # one per Linear (its name), one per expert slice of fused experts (``name.param[e]``, ``compressx.targets``)
    matrices: dict[str, torch.Tensor]
    uncalibrated: dict[str, torch.Tensor]  # expert slices no calibration token reached (not in ``matrices``)
    info: dict[str, Any] | None = None


class LayerwiseCalibration:
    """Layer-by-layer calibration as a loop the pass owns (see the module docstring); made by ``calibrate_layers``::

        calibration = calibrate_layers(model, tokens, targets)
        for layer in calibration:
            for key, weight in layer.matrices.items():
                prune(weight, layer.stats[key])
            prune_uncalibrated(layer, sparsity, nm)
        report = calibration.report()

    Each step yields the next decoder layer that has targets and no saved checkpoint, its statistics collected
    on the inputs the already-pruned layers give; advancing the loop counts the layer's zeros, writes its weights
    back to the offload storage and to ``checkpoint``, and runs the now-pruned layer to give the next layer's
    inputs. Layers restored from ``checkpoint`` are not yielded; their ``info`` is in ``infos`` all the same.

    Args:
        model: a transformers causal LM (its decoder layers found by ``decoder_layers``).
        tokens: calibration token ids ``[samples, seq_len]``.
        targets: the Linear modules to prune (full names); each must sit inside a decoder layer.
        with_hessian: also accumulate ``X X^T`` (SparseGPT).
        with_variance: also accumulate the within-sequence variance (DSnoT); a pass that does not read
            ``LinearStats.var`` saves its cost.
        batch_size: sequences per forward of a decoder layer.
        device: where each decoder layer runs (default: where the model is); only that layer is moved there.
            A model dispatched by accelerate with offloaded weights (``device_map`` with ``cpu``/``disk``,
            ``cpu_offload``, ``disk_offload``) is left to its hooks: each layer's weights are onloaded for its
            forwards and for pruning, and the pruned weights are written back (``compressx.offload``).
        progress: show a progress bar over layers.
        checkpoint: save each pruned layer there; when it resumes, load the saved layers instead of yielding them.
        layers: the dotted path of the decoder-layer ModuleList (default: found from the model).

    After the loop: ``counts`` maps every weight matrix (per expert for fused experts) to ``(exact zeros, numel)``
    after pruning (read while its weight was onloaded); ``infos`` maps each layer index to the ``info`` the pass
    set (or the checkpoint restored); ``uncalibrated`` lists the expert slices no calibration token reached;
    ``gates`` the Linear targets beside fused experts (``moe_gates``), left dense; ``report()`` says all that.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        targets: dict[str, nn.Module],
        *,
        with_hessian: bool = False,
        with_variance: bool = True,
        batch_size: int = 1,
        device: str | torch.device | None = None,
        progress: bool = True,
        checkpoint: LayerCheckpoints | None = None,
        layers: str | None = None,
    ) -> None:
        self.path, self.layers = decoder_layers(model, layers)
        outside = [name for name in targets if not name.startswith(f"{self.path}.")]
        if outside:
            raise CompressxError(
                f"layer-by-layer pruning changes Linear layers inside the decoder layers ({self.path}.*); "
                f"{', '.join(outside[:3])} {'is' if len(outside) == 1 else 'are'} outside: add to ignore, or give "
                f"targets inside them (e.g. targets: ['{self.path}'])"
            )
        problems = experts_layout_problems(targets)
        if problems:
            raise CompressxError("; ".join(problems))
        self.gates = moe_gates(model, targets)
        if self.gates:
            log.info("left dense (gates of MoE blocks): %s", ", ".join(self.gates))
            targets = {name: module for name, module in targets.items() if name not in self.gates}
        self.model, self.tokens, self.targets = model, tokens, targets
        self.with_hessian, self.with_variance = with_hessian, with_variance
        self.batch_size, self.progress = batch_size, progress
        self.checkpoint = checkpoint
        self.home = execution_device(model)
        self.device = torch.device(device) if device is not None else self.home
        self.counts: dict[str, tuple[int, int]] = {}
        self.infos: dict[int, dict[str, Any]] = {}
        self.uncalibrated: list[str] = []

    def report(self) -> dict:
        """The pass's report: ``sparsity_report`` of ``counts``; with fused experts among the targets also
        ``uncalibrated_experts`` (the expert slices pruned by magnitude for want of calibration tokens), and
        ``left_dense`` (gates of MoE blocks) when there are any."""
        report = sparsity_report(self.counts)
        if any(isinstance(module, FusedExperts) for module in self.targets.values()):
            report["uncalibrated_experts"] = list(self.uncalibrated)
        if self.gates:
            report["left_dense"] = list(self.gates)
        return report

    @torch.no_grad()
    def _collect(self, layer: nn.Module, linears: dict[str, nn.Module], hiddens: list, kwargs_list: list) -> dict:
        stats = {
            key: LinearStats(weight.shape[1], self.with_hessian, self.with_variance)
            for name, m in linears.items()
            for key, weight in weight_matrices(name, m).items()
        }
        # Linears fed the very same tensor (q/k/v, gate/up) share its batch terms: computed once, added to each
        # (same values, so the same statistics); the reference is dropped after each forward
        last: list = [None, None]

        def record(s: LinearStats, x: torch.Tensor) -> None:
            if x is not last[0]:
                last[:] = [x, s.terms(x)]
            s.add_terms(last[1])

        batch = {"sequences": 1, "check": True}  # of the forward running: the experts hooks read it

        def record_experts(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            # after the module's forward: accelerate may have offloaded its weights again
            with onloaded(offloaded_modules(module), self.device):
                record_expert_inputs(name, module, (args, kwargs), output, stats, batch["sequences"], batch["check"])

        hooks = [
            m.register_forward_hook(partial(record_experts, name), with_kwargs=True)
            if isinstance(m, FusedExperts)
            else m.register_forward_hook(lambda mod, inp, out, s=stats[name]: record(s, inp[0]))
            for name, m in linears.items()
        ]
        try:
            for i, (hidden, kwargs) in enumerate(zip(hiddens, kwargs_list)):
                batch.update(sequences=hidden.shape[0] if hidden.dim() > 2 else 1, check=i == 0)
                layer(hidden, **kwargs)
                last[:] = [None, None]
        finally:
            for hook in hooks:
                hook.remove()
        return stats

    def _count(self, prefix: str, linears: dict[str, nn.Module]) -> None:
        for name, module in linears.items():
            for key, weight in weight_matrices(name, module).items():
                self.counts[prefix + key] = (int((weight == 0).sum()), weight.numel())

    @torch.no_grad()
    def _restore(self, index: int, layer: nn.Module, linears: dict[str, nn.Module], offloaded: list) -> bool:
        """Load layer ``index``'s pruned weights from the checkpoint into ``linears`` (and into the offload
        storage of offloaded ones); False when the layer is to be pruned afresh."""
        saved = self.checkpoint.load(index) if self.checkpoint is not None and linears else None
        if saved is None:
            return False
        weights, info, uncalibrated = saved
        if set(weights) != set(_weight_parameters(linears)):
            raise CompressxError(
                f"--resume: the checkpoint of decoder layer {index} holds {sorted(weights)}, this run prunes "
                f"{sorted(_weight_parameters(linears))}; choose another checkpoint dir"
            )
        with onloaded(offloaded, self.device):
            for key, (name, param_name, param) in _weight_parameters(linears).items():
                param.copy_(weights[key])
                if offloaded:
                    write_back(layer, name, param, param_name)
            self._count(f"{self.path}.{index}.", linears)
        self.infos[index] = info
        self.uncalibrated += [f"{self.path}.{index}.{key}" for key in uncalibrated]
        log.info("decoder layer %d: pruned weights loaded from %s", index, self.checkpoint.store.path)
        return True

    def __iter__(self) -> Iterator[CalibratedLayer]:
        model, layers = self.model, self.layers
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        if self.checkpoint is not None:
            self.checkpoint.begin(model, self.tokens, self.targets)
        try:
            with torch.no_grad():
                hiddens, kwargs_list = capture_layer_inputs(model, self.tokens, self.batch_size, self.path)
            hiddens = [h.to(self.device) for h in hiddens]
            kwargs_list = [_to(kw, self.device) for kw in kwargs_list]
            bar = tqdm(range(len(layers)), desc="pruning decoder layers", disable=not self.progress, unit="layer")
            for index in bar:
                offloaded = offloaded_modules(layers[index])
                layer = layers[index] if offloaded else layers[index].to(self.device)
                prefix = f"{self.path}.{index}."
                linears = {n[len(prefix) :]: m for n, m in self.targets.items() if n.startswith(prefix)}
                if linears and not self._restore(index, layer, linears, offloaded):
                    stats = self._collect(layer, linears, hiddens, kwargs_list)
                    release_freed_memory()  # the forwards' temporaries, before the pruning's own
                    with onloaded(offloaded, self.device):
                        # views of the onloaded weights (accelerate swaps the parameters when it onloads them)
                        matrices = {key: w for n, m in linears.items() for key, w in weight_matrices(n, m).items()}
                        # a weight's own NaN/Inf first: it also spoils the inputs of the modules after it
                        check_finite({prefix + key: w for key, w in matrices.items()})
                        check_finite({prefix + key: s.sum_x2 for key, s in stats.items()}, "calibration inputs")
                        uncalibrated = {key: matrices.pop(key) for key in list(matrices) if not stats[key].n_tok}
                        if uncalibrated:
                            log.warning(
                                "decoder layer %d: no calibration token was routed to %s; pruned by magnitude",
                                index, ", ".join(uncalibrated),
                            )  # fmt: skip
                        current = CalibratedLayer(index, prefix, linears, stats, matrices, uncalibrated)
                        yield current
                        current.stats.clear()  # the pass's loop variable still holds the layer: free its Hessians
                        current.matrices.clear()
                        self._count(prefix, linears)
                        parameters = _weight_parameters(linears)
                        if offloaded:
                            for name, param_name, param in parameters.values():
                                write_back(layer, name, param, param_name)
                        if self.checkpoint is not None:
                            weights = {key: param for key, (_, _, param) in parameters.items()}
                            self.checkpoint.save(index, weights, current.info, list(uncalibrated))
                        self.infos[index] = current.info or {}
                        self.uncalibrated += [prefix + key for key in uncalibrated]
                    del stats, current, matrices, uncalibrated, parameters
                    release_freed_memory()  # the onloaded weights and the pruning's temporaries
                with torch.no_grad():
                    hiddens = [_first(layer(hidden, **kwargs)) for hidden, kwargs in zip(hiddens, kwargs_list)]
                if not offloaded:
                    layers[index].to(self.home)
                release_freed_memory()  # the previous layer's inputs and the forwards' temporaries
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache


def _weight_parameters(linears: dict[str, nn.Module]) -> dict[str, tuple[str, str, torch.Tensor]]:
    """Each target's weight parameters, whole (3-D for fused experts), by the name ``weight_tensors`` gives them:
    ``(module name, parameter name, parameter)``; read them while the weights are onloaded."""
    return {
        key: (name, "weight" if key == name else key[len(name) + 1 :], tensor)
        for name, module in linears.items()
        for key, tensor in weight_tensors(name, module).items()
    }


def calibrate_layers(
    model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module], **options: Any
) -> LayerwiseCalibration:
    """``for layer in calibrate_layers(model, tokens, targets, batch_size=4): ...`` — the options and what the
    loop gives are ``LayerwiseCalibration``'s. Refuses targets outside the decoder layers at once."""
    return LayerwiseCalibration(model, tokens, targets, **options)
