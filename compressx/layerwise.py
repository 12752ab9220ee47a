"""Layer-by-layer ("sequential") calibration of decoder LLMs, the loop Wanda, SparseGPT and DSnoT share.

1. The calibration sequences run through the model up to the first decoder layer; a forward pre-hook on that
   layer captures its inputs (hidden states and every keyword argument: attention mask, position embeddings,
   cache position...) and stops the forward.
2. For each decoder layer in order: hooks on the layer's target ``Linear`` modules collect statistics of their
   inputs (``LinearStats``) while the still-dense layer runs on the captured inputs; the pass prunes those
   modules from the statistics; the now-pruned layer runs again and its outputs become the next layer's
   inputs. So layer i is calibrated on what the pruned layers 0..i-1 produce, as in Wanda and SparseGPT.

Memory: only the layer being pruned is moved to the compute ``device`` (the rest of the model stays where it
is, e.g. on CPU), plus two activation buffers of ``samples x seq_len x hidden`` floats (inputs and outputs of
the current layer) and the statistics of one layer's Linears (a ``C_in x C_in`` Hessian each for SparseGPT),
plus the transient memory of one forward or of pruning one Linear. The formula, what it leaves out, and its
measurement: docs/passes/wanda.md ("Memory") and docs/results/offload_memory.md. On CPU, freed memory is handed
back to the OS after each phase of a layer (``release_freed_memory``), else glibc's heap keeps it.

Resuming: with ``checkpoint`` (``compressx.checkpoint.LayerCheckpoints``), each pruned layer's target weights
(and what the pass reports about it) are saved atomically after the layer; a resumed run loads the saved layers
instead of calibrating and pruning them, and runs them forward to get the next layer's inputs, so it continues
at the first layer without a checkpoint, with the inputs an uninterrupted run would have given it.

Architectures: the decoder layers are found from the model itself (``compressx.targets.decoder_layers_path``: the
``ModuleList`` of the blocks transformers names in ``_no_split_modules``), so any decoder-only LM transformers
ships works whose layers take the hidden states first (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, Falcon,
OPT...). ``DECODER_LAYERS`` (model_type -> path of the decoder layer list) overrides that for a model it gets wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import inspect
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.checkpoint import LayerCheckpoints
from compressx.errors import CompressxError
from compressx.ops.sparsity import check_finite
from compressx.targets import weight_matrix

log = logging.getLogger(__name__)

# model_type (transformers config) -> dotted path of the ModuleList of decoder layers, for a model whose layers
# ``compressx.targets.decoder_layers_path`` does not find by itself (none known today)
DECODER_LAYERS: dict[str, str] = {}
# Linear names (relative to a decoder layer) that form its MLP, per model_type (DSnoT's ``refine_mlp``)
MLP_PREFIXES: dict[str, tuple[str, ...]] = {"opt": ("fc1", "fc2")}  # GPT-2's "mlp." is the default
_DEFAULT_MLP_PREFIXES = ("mlp.",)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of a model's decoder layers; a clear error when they cannot be found."""
    from compressx.targets import decoder_layers_path

    path = decoder_layers_path(model)
    if path is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise CompressxError(
            f"layer-by-layer calibration cannot find the decoder layers of {type(model).__name__} "
            f"(model_type {model_type!r}): it has no ModuleList of repeated blocks. Name the path of its "
            "decoder-layer ModuleList for its model_type in compressx.layerwise.DECODER_LAYERS"
        )
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise CompressxError(f"{type(model).__name__}: {path!r} is a {type(layers).__name__}, not a ModuleList")
    return path, layers


def layerwise_problems(model: nn.Module, config: object = None) -> list[str]:
    """``register_pass(check_model=...)`` of the layer-wise passes: why ``model``'s decoder layers cannot be found."""
    if not isinstance(model, nn.Module):
        return [f"layer-by-layer calibration needs a torch model, got {type(model).__name__}"]
    try:
        decoder_layers(model)
    except (CompressxError, AttributeError) as err:
        return [str(err)]
    return []


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
    ``var`` only ``with_variance`` (DSnoT uses it; it is the costliest of the per-channel sums).
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

    def add(self, x: torch.Tensor, terms: tuple | None = None) -> tuple:
        """Add a batch of inputs ``[batch, seq, columns]`` (or ``[seq, columns]``); returns the batch's terms, which
        statistics of the same kind fed the very same tensor take as ``terms`` instead of computing them again."""
        if terms is None:
            x = x.detach().float().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.detach().float()[None]
            seq_len = x.shape[1]
            flat = x.reshape(-1, self.columns)
            terms = (
                x.shape[0],
                x.shape[0] * seq_len,
                x.sum(dim=(0, 1)).double(),
                x.pow(2).sum(dim=(0, 1)).double(),
                (x.var(dim=1, unbiased=False) * seq_len).sum(dim=0).double() if self.with_variance else None,
                (flat.T @ flat).double() if self.with_hessian else None,
            )
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
        return terms

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


def _offload_owner(layer: nn.Module, relative_name: str) -> tuple[nn.Module, str] | None:
    """The nearest module (the Linear itself, or a module containing it inside ``layer``) whose parameters
    accelerate offloads, and the weight's name relative to it."""
    from accelerate.utils import has_offloaded_params

    parts = relative_name.split(".")
    for depth in range(len(parts), -1, -1):
        owner = layer.get_submodule(".".join(parts[:depth])) if depth else layer
        if has_offloaded_params(owner):
            return owner, ".".join([*parts[depth:], "weight"])
    return None


def _store_offloaded(owner: nn.Module, param_name: str, value: torch.Tensor) -> None:
    """Write a changed weight into the storage accelerate onloads it from (else the change is lost).

    Disk-offloaded weights are written as a new ``.dat`` file in the offload folder and the loader's index is
    pointed at it — never into a safetensors checkpoint the loader may read from directly.
    """
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    weights_map = owner._hf_hook.weights_map
    key = f"{getattr(weights_map, 'prefix', '')}{param_name}"
    dataset = getattr(weights_map, "dataset", weights_map)
    value = value.detach().to("cpu").clone()
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict or dataset.save_folder is None:
            dataset.state_dict[key] = value
        else:
            offload_weight(value, key, dataset.save_folder, index=dataset.index)
    else:
        dataset[key] = value


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return memory that torch has freed to the OS, where glibc kept it in its heap (Linux only; a no-op elsewhere).

    glibc serves CPU tensors under its mmap threshold from its heap, and it raises that threshold (up to 32 MiB)
    each time a larger block is freed, so after a few layers the weight-sized temporaries of calibration and
    pruning all come from the heap. Freed heap pages stay resident unless trimmed, so the process can hold far
    more than its live tensors, more so as layers go by (measured in docs/results/offload_memory.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def live_cpu_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage still referenced from Python, each storage counted once: what streaming
    keeps alive, as opposed to what the allocator holds (``release_freed_memory``). A diagnostic; it walks every
    object the garbage collector tracks."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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
    model: nn.Module, tokens: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run ``tokens`` through the model up to its first decoder layer; return its inputs per micro-batch."""
    _, layers = decoder_layers(model)

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


# prune_layer(index, modules, stats): modules are Linear or Conv1D; it prunes ``compressx.targets.weight_matrix(m)``
# in place and may return what it decided about them (JSON), kept in layer checkpoints.
PruneLayer = Callable[[int, dict[str, nn.Module], dict[str, LinearStats]], dict[str, Any] | None]


def _restore_layer(
    checkpoint: LayerCheckpoints | None,
    index: int,
    layer: nn.Module,
    linears: dict[str, nn.Module],
    offloaded: list[nn.Module],
    device: torch.device,
    counts: dict[str, tuple[int, int]],
    prefix: str,
) -> dict[str, Any] | None:
    """Load layer ``index``'s pruned weights from ``checkpoint`` into ``linears`` (and into the offload storage
    of offloaded ones) and count their zeros; returns the pass's saved info, or None when the layer is to be
    pruned afresh."""
    from accelerate.utils import align_module_device

    saved = checkpoint.load(index) if checkpoint is not None and linears else None
    if saved is None:
        return None
    weights, info = saved
    if set(weights) != set(linears):
        raise CompressxError(
            f"--resume: the checkpoint of decoder layer {index} holds {sorted(weights)}, this run prunes "
            f"{sorted(linears)}; choose another checkpoint dir"
        )
    with contextlib.ExitStack() as onloaded:
        for module in offloaded:
            onloaded.enter_context(align_module_device(module, device))
        for name, linear in linears.items():
            linear.weight.copy_(weights[name])
            counts[prefix + name] = (int((linear.weight == 0).sum()), linear.weight.numel())
            owner = _offload_owner(layer, name) if offloaded else None
            if owner is not None:
                _store_offloaded(*owner, linear.weight)
    log.info("decoder layer %d: pruned weights loaded from %s", index, checkpoint.store.path)
    return info


def _save_layer(checkpoint: LayerCheckpoints | None, index: int, linears: dict[str, nn.Module], info: Any) -> None:
    if checkpoint is not None:
        checkpoint.save(index, {name: linear.weight for name, linear in linears.items()}, info)


@torch.no_grad()
def prune_layer_by_layer(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: dict[str, nn.Module],
    prune_layer: PruneLayer,
    *,
    with_hessian: bool = False,
    with_variance: bool = True,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: LayerCheckpoints | None = None,
    on_restore: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, tuple[int, int]]:
    """Calibrate and prune the target Linears of every decoder layer in order (see the module docstring).

    Args:
        model: a transformers causal LM whose ``model_type`` is in ``DECODER_LAYERS``.
        tokens: calibration token ids ``[samples, seq_len]``.
        targets: the Linear modules to prune (full names); each must sit inside a decoder layer.
        prune_layer: ``prune_layer(layer_index, linears, stats)`` prunes the given Linears (names relative to
            the decoder layer) in place from their input statistics.
        with_hessian: also accumulate ``X X^T`` (SparseGPT).
        with_variance: also accumulate the within-sequence variance (DSnoT); a pass that does not read
            ``LinearStats.var`` saves its cost.
        batch_size: sequences per forward of a decoder layer.
        device: where each decoder layer runs (default: where the model is); only that layer is moved there.
            A model dispatched by accelerate with offloaded weights (``device_map`` with ``cpu``/``disk``,
            ``cpu_offload``, ``disk_offload``) is left to its hooks: each layer's weights are onloaded for its
            forwards and for pruning, and the pruned weights are written back to the offload storage.
        progress: show a progress bar over layers.
        checkpoint: save each pruned layer there; when it resumes, load the saved layers instead of pruning them.
        on_restore: ``on_restore(layer_index, info)`` for each layer loaded from ``checkpoint``, with what
            ``prune_layer`` returned for it (for the pass's report).

    Returns:
        ``name -> (exact zeros, numel)`` of every target after pruning (read while its weight was onloaded).
    """
    from accelerate.utils import align_module_device, has_offloaded_params

    path, layers = decoder_layers(model)
    outside = [name for name in targets if not name.startswith(f"{path}.")]
    if outside:
        raise CompressxError(
            f"layer-by-layer pruning changes Linear layers inside the decoder layers ({path}.*); "
            f"{', '.join(outside[:3])} {'is' if len(outside) == 1 else 'are'} outside: add to ignore"
        )
    home = execution_device(model)
    device = torch.device(device) if device is not None else home
    counts: dict[str, tuple[int, int]] = {}
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    if checkpoint is not None:
        checkpoint.begin(model, tokens, targets)
    try:
        hiddens, kwargs_list = capture_layer_inputs(model, tokens, batch_size)
        hiddens = [h.to(device) for h in hiddens]
        kwargs_list = [_to(kw, device) for kw in kwargs_list]
        bar = tqdm(range(len(layers)), desc="pruning decoder layers", disable=not progress, unit="layer")
        for index in bar:
            offloaded = [m for m in layers[index].modules() if has_offloaded_params(m)]
            layer = layers[index] if offloaded else layers[index].to(device)
            prefix = f"{path}.{index}."
            linears = {n[len(prefix) :]: m for n, m in targets.items() if n.startswith(prefix)}
            restored = _restore_layer(checkpoint, index, layer, linears, offloaded, device, counts, prefix)
            if restored is not None and on_restore is not None:
                on_restore(index, restored)
            if linears and restored is None:
                stats = {
                    name: LinearStats(weight_matrix(m).shape[1], with_hessian, with_variance)
                    for name, m in linears.items()
                }
                # Linears fed the very same tensor (q/k/v, gate/up) share its batch terms: computed once, added to
                # each (same values, so the same statistics); the reference is dropped after each forward
                last: list = [None, None]

                def record(s: LinearStats, x: torch.Tensor, last: list = last) -> None:
                    last[:] = [x, s.add(x, last[1] if x is last[0] else None)]

                hooks = [
                    m.register_forward_hook(lambda mod, inp, out, s=stats[name]: record(s, inp[0]))
                    for name, m in linears.items()
                ]
                try:
                    for hidden, kwargs in zip(hiddens, kwargs_list):
                        layer(hidden, **kwargs)
                        last[:] = [None, None]
                finally:
                    for hook in hooks:
                        hook.remove()
                release_freed_memory()  # the forwards' temporaries, before the pruning's own
                with contextlib.ExitStack() as onloaded:
                    for module in offloaded:
                        onloaded.enter_context(align_module_device(module, device))
                    # a weight's own NaN/Inf first: it also spoils the inputs of the modules after it
                    check_finite({prefix + n: m.weight for n, m in linears.items()})
                    check_finite({prefix + n: s.sum_x2 for n, s in stats.items()}, "calibration inputs")
                    info = prune_layer(index, linears, stats)
                    for name, linear in linears.items():
                        counts[prefix + name] = (int((linear.weight == 0).sum()), linear.weight.numel())
                        owner = _offload_owner(layer, name) if offloaded else None
                        if owner is not None:
                            _store_offloaded(*owner, linear.weight)
                    _save_layer(checkpoint, index, linears, info)
                del stats
                release_freed_memory()  # the onloaded weights and the pruning's temporaries
            hiddens = [_first(layer(hidden, **kwargs)) for hidden, kwargs in zip(hiddens, kwargs_list)]
            if not offloaded:
                layers[index].to(home)
            release_freed_memory()  # the previous layer's inputs and the forwards' temporaries
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return counts
