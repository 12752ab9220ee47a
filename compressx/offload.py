"""Changing the weights of a model whose parameters accelerate offloads to CPU or disk.

A model dispatched with offloaded weights (``device_map`` with ``cpu``/``disk``, ``cpu_offload``,
``disk_offload``) holds its parameters on the ``meta`` device; accelerate's hooks onload them from a weights map
for each forward. A weight changed while onloaded (``onloaded``) is lost when it is offloaded again unless it is
written back into that map (``write_back``). accelerate (1.15) has public helpers to find offloaded modules
(``has_offloaded_params``), onload them (``align_module_device``) and write a disk-offloaded tensor
(``offload_weight``), but none to update a parameter in place; ``write_back`` composes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn


def offloaded_modules(module: nn.Module) -> list[nn.Module]:
    """The modules inside ``module`` (itself included) whose parameters accelerate offloads."""
    from accelerate.utils import has_offloaded_params

    return [m for m in module.modules() if has_offloaded_params(m)]


@contextlib.contextmanager
def onloaded(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """Keep the offloaded parameters of ``modules`` on ``device`` inside the block (accelerate's
    ``align_module_device``), offloaded again after it."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(align_module_device(module, device))
        yield


def _offload_owner(layer: nn.Module, relative_name: str, param: str = "weight") -> tuple[nn.Module, str] | None:
    """The nearest module (the Linear itself, or a module containing it inside ``layer``) whose parameters
    accelerate offloads, and the name of its parameter ``param`` relative to it."""
    from accelerate.utils import has_offloaded_params

    parts = relative_name.split(".")
    for depth in range(len(parts), -1, -1):
        owner = layer.get_submodule(".".join(parts[:depth])) if depth else layer
        if has_offloaded_params(owner):
            return owner, ".".join([*parts[depth:], param])
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


def write_back(layer: nn.Module, relative_name: str, weight: torch.Tensor, param: str = "weight") -> None:
    """Store the changed ``weight`` (parameter ``param``, e.g. fused experts' whole ``gate_up_proj``) of the module
    ``relative_name`` (inside ``layer``) where accelerate onloads it from; a no-op for one that is not offloaded."""
    owner = _offload_owner(layer, relative_name, param)
    if owner is not None:
        _store_offloaded(*owner, weight)
