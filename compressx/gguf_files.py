"""GGUF checkpoints (llama.cpp's format): where a file is, what architecture it declares, and the dense model
transformers dequantizes it into. Reading one needs the optional ``gguf`` package (``compressx[gguf]``).
"""

from __future__ import annotations

import os

import torch.nn as nn

from compressx.errors import CompressxError, ConfigError

GGUF_EXTRA = "pip install 'compressx[gguf]'"  # the optional extra that brings the gguf package


def require_gguf() -> None:
    """A clear error when the optional ``gguf`` package (needed to read GGUF files) is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise CompressxError(f"reading a GGUF file needs the optional 'gguf' package: {GGUF_EXTRA}") from err


def gguf_path(model_id: str, gguf_file: str) -> str:
    """The local path of ``gguf_file`` in the directory (or, already downloaded or downloadable, the hub repo)
    ``model_id``; a ConfigError when there is no such file."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, gguf_file)
        if not os.path.isfile(path):
            found = sorted(f for f in os.listdir(model_id) if f.endswith(".gguf"))
            raise ConfigError(
                f"no file {gguf_file!r} in {model_id!r}; GGUF files there: {', '.join(found) or 'none'}",
                path="gguf_file",
            )
        return path
    from transformers.utils import cached_file

    try:
        path = cached_file(model_id, gguf_file, _raise_exceptions_for_missing_entries=False)
    except OSError as err:
        raise ConfigError(f"cannot find {gguf_file!r} in {model_id!r}: {err}", path="gguf_file") from err
    if path is None:
        raise ConfigError(f"no file {gguf_file!r} in {model_id!r}", path="gguf_file")
    return path


def as_dense_checkpoint(model: nn.Module) -> nn.Module:
    """A model transformers loaded from a GGUF file, marked as the dense model it now is.

    transformers dequantizes every tensor while loading, but keeps the file's quantization marker (a GGUF
    quantizer and ``config.quantization_config``), so ``save_pretrained`` refuses the model and a saved
    ``config.json`` would send a reload back to a GGUF file. The weights are ordinary dense tensors: drop the marker.
    """
    if getattr(model, "quantization_method", None) is not None and str(model.quantization_method).endswith("GGUF"):
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


# llama.cpp's architecture names that transformers renames (transformers.modeling_gguf_pytorch_utils)
_GGUF_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def gguf_architecture(path: str) -> str:
    """The architecture a GGUF file declares (``general.architecture``), read from its header only (the tensors are
    memory-mapped, not read); a ConfigError when transformers cannot load that architecture from GGUF."""
    require_gguf()
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = field.contents() if hasattr(field, "contents") else bytes(field.parts[-1]).decode()
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})", path="gguf_file") from err
    architecture = _GGUF_RENAMED.get(architecture, architecture)
    supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if architecture not in supported:
        raise ConfigError(
            f"{os.path.basename(path)} holds a {architecture!r} model; transformers reads GGUF files of these "
            f"architectures: {', '.join(supported)}",
            path="gguf_file",
        )
    return architecture
