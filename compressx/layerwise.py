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

Architectures: the decoder layers are found from the model itself (``compressx.targets.decoder_layers_path``: the
``ModuleList`` of the blocks transformers names in ``_no_split_modules``), so any decoder-only LM transformers
ships works whose layers take the hidden states first (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, Falcon,
OPT...). ``DECODER_LAYERS`` (model_type -> path of the decoder layer list) overrides that for a model it gets wrong.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compressx.checkpoint import LayerCheckpoints
from compressx.errors import CompressxError
from compressx.memory import release_freed_memory
from compressx.offload import offloaded_modules, onloaded, write_back
from compressx.ops.sparsity import check_finite, nm_shape_problems
from compressx.targets import DECODER_LAYERS, TransposedLinear, weight_matrix  # noqa: F401 (documented here too)

log = logging.getLogger(__name__)

# Linear names (relative to a decoder layer) that form its MLP, per model_type (DSnoT's ``refine_mlp``)
MLP_PREFIXES: dict[str, tuple[str, ...]] = {"opt": ("fc1", "fc2")}  # GPT-2's "mlp." is the default
_DEFAULT_MLP_PREFIXES = ("mlp.",)
DECODER_LINEARS = ("re:.*layers\\.\\d+\\..*",)  # for a model that is not a causal LM (one has its decoder layers)
# Linear layers, and transformers' Conv1D (GPT-2) as the Linear it is. Fused MoE experts are refused: calibrating
# them needs each expert's own inputs, which these passes do not collect.
LAYERWISE_TYPES = (nn.Linear, TransposedLinear)


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


def layerwise_nm_problems(targets: dict[str, nn.Module], config: Any) -> list[str]:
    """``register_pass(check=...)`` of the layer-wise passes: targets whose shape cannot take ``config.nm``."""
    return nm_shape_problems({name: weight_matrix(m) for name, m in targets.items()}, config.nm)


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


@dataclasses.dataclass
class CalibratedLayer:
    """One decoder layer during layer-by-layer calibration, as ``calibrate_layers`` yields it.

    While the loop body runs, the layer's weights are on the compute device (onloaded when accelerate offloads
    them): the pass changes ``compressx.targets.weight_matrix(linear)`` of each of ``linears`` in place, from
    ``stats``, and may set ``info`` (JSON) to what it decided, which the layer checkpoint keeps.
    """

    index: int
    prefix: str  # the layer's full name with a trailing dot: ``prefix + name`` is a Linear's full name
    linears: dict[str, nn.Module]  # the target Linears (or Conv1D) of the layer, named relative to it
    stats: dict[str, LinearStats]  # their input statistics, on the still-dense layer; emptied when the loop advances
    info: dict[str, Any] | None = None


class LayerwiseCalibration:
    """Layer-by-layer calibration as a loop the pass owns (see the module docstring); made by ``calibrate_layers``::

        calibration = calibrate_layers(model, tokens, targets)
        for layer in calibration:
            for name, linear in layer.linears.items():
                prune(weight_matrix(linear), layer.stats[name])
        report = sparsity_report(calibration.counts)

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

    After the loop: ``counts`` maps every target to ``(exact zeros, numel)`` after pruning (read while its weight
    was onloaded); ``infos`` maps each layer index to the ``info`` the pass set (or the checkpoint restored).
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
    ) -> None:
        self.path, self.layers = decoder_layers(model)
        outside = [name for name in targets if not name.startswith(f"{self.path}.")]
        if outside:
            raise CompressxError(
                f"layer-by-layer pruning changes Linear layers inside the decoder layers ({self.path}.*); "
                f"{', '.join(outside[:3])} {'is' if len(outside) == 1 else 'are'} outside: add to ignore"
            )
        self.model, self.tokens, self.targets = model, tokens, targets
        self.with_hessian, self.with_variance = with_hessian, with_variance
        self.batch_size, self.progress = batch_size, progress
        self.checkpoint = checkpoint
        self.home = execution_device(model)
        self.device = torch.device(device) if device is not None else self.home
        self.counts: dict[str, tuple[int, int]] = {}
        self.infos: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def _collect(self, layer: nn.Module, linears: dict[str, nn.Module], hiddens: list, kwargs_list: list) -> dict:
        stats = {
            name: LinearStats(weight_matrix(m).shape[1], self.with_hessian, self.with_variance)
            for name, m in linears.items()
        }
        # Linears fed the very same tensor (q/k/v, gate/up) share its batch terms: computed once, added to each
        # (same values, so the same statistics); the reference is dropped after each forward
        last: list = [None, None]

        def record(s: LinearStats, x: torch.Tensor) -> None:
            if x is not last[0]:
                last[:] = [x, s.terms(x)]
            s.add_terms(last[1])

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
        return stats

    def _count(self, prefix: str, linears: dict[str, nn.Module]) -> None:
        for name, linear in linears.items():
            self.counts[prefix + name] = (int((linear.weight == 0).sum()), linear.weight.numel())

    @torch.no_grad()
    def _restore(self, index: int, layer: nn.Module, linears: dict[str, nn.Module], offloaded: list) -> bool:
        """Load layer ``index``'s pruned weights from the checkpoint into ``linears`` (and into the offload
        storage of offloaded ones); False when the layer is to be pruned afresh."""
        saved = self.checkpoint.load(index) if self.checkpoint is not None and linears else None
        if saved is None:
            return False
        weights, info = saved
        if set(weights) != set(linears):
            raise CompressxError(
                f"--resume: the checkpoint of decoder layer {index} holds {sorted(weights)}, this run prunes "
                f"{sorted(linears)}; choose another checkpoint dir"
            )
        with onloaded(offloaded, self.device):
            for name, linear in linears.items():
                linear.weight.copy_(weights[name])
                if offloaded:
                    write_back(layer, name, linear.weight)
            self._count(f"{self.path}.{index}.", linears)
        self.infos[index] = info
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
                hiddens, kwargs_list = capture_layer_inputs(model, self.tokens, self.batch_size)
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
                        # a weight's own NaN/Inf first: it also spoils the inputs of the modules after it
                        check_finite({prefix + n: m.weight for n, m in linears.items()})
                        check_finite({prefix + n: s.sum_x2 for n, s in stats.items()}, "calibration inputs")
                        current = CalibratedLayer(index, prefix, linears, stats)
                        yield current
                        current.stats.clear()  # the pass's loop variable still holds the layer: free its Hessians
                        self._count(prefix, linears)
                        for name, linear in linears.items():
                            if offloaded:
                                write_back(layer, name, linear.weight)
                        if self.checkpoint is not None:
                            weights = {name: linear.weight for name, linear in linears.items()}
                            self.checkpoint.save(index, weights, current.info)
                        self.infos[index] = current.info or {}
                    del stats, current
                    release_freed_memory()  # the onloaded weights and the pruning's temporaries
                with torch.no_grad():
                    hiddens = [_first(layer(hidden, **kwargs)) for hidden, kwargs in zip(hiddens, kwargs_list)]
                if not offloaded:
                    layers[index].to(self.home)
                release_freed_memory()  # the previous layer's inputs and the forwards' temporaries
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache


def calibrate_layers(
    model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module], **options: Any
) -> LayerwiseCalibration:
    """``for layer in calibrate_layers(model, tokens, targets, batch_size=4): ...`` — the options and what the
    loop gives are ``LayerwiseCalibration``'s. Refuses targets outside the decoder layers at once."""
    return LayerwiseCalibration(model, tokens, targets, **options)
