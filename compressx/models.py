"""Building the model a recipe names: ``model: {source, id, dtype, ...}``.

Sources:

* ``hf`` — a transformers model: a hub id or a local directory, loaded with ``class`` (default
  ``AutoModelForCausalLM``; any transformers class with ``from_pretrained``, e.g. ``LlavaForConditionalGeneration``);
  with ``gguf_file: NAME`` the weights are read from that GGUF file (llama.cpp's format) in the directory or hub
  repo and dequantized to ``dtype`` by transformers; needs the optional ``gguf`` package (``compressx[gguf]``);
* ``timm`` — ``timm.create_model(id, pretrained=..., **kwargs)``;
* ``diffusers`` — a pipeline directory or hub id, loaded with ``DiffusionPipeline.from_pretrained``;
* ``zoo`` — a compressx proxy model (``compressx.zoo``), built on first use; ``pretrained: false`` gives the
  architecture freshly initialised instead (for passes that train from scratch).

``build_model(spec, meta=True)`` builds the architecture on the meta device — no weights read, no training — so
``compressx validate`` can resolve targets against it in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compressx.config import Block, option
from compressx.errors import CompressxError, ConfigError
from compressx.gguf_files import as_dense_checkpoint, gguf_architecture, gguf_path

SOURCES = ("hf", "timm", "diffusers", "zoo")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec(Block):
    """A recipe's model block."""

    tag: ClassVar[str] = "source"
    shape: ClassVar[str] = "{source: zoo, id: llama_byte_1m}"

    source: str = option(choices=SOURCES)
    id: str = option(nonempty=True, expected="a hub id, local directory or name")
    dtype: str = option("float32", choices=tuple(DTYPES))
    cls: str | None = option(None, key="class", only=("hf",), nonempty=True, expected="a transformers class name")
    # timm / zoo: False builds freshly initialised weights (training from scratch, tests)
    pretrained: bool = option(True, only=("timm", "zoo"))
    kwargs: dict[str, Any] = option(
        default_factory=dict,
        expected="a mapping of keyword arguments (name: value)",
        doc="keyword arguments of the loader (sources hf, timm, diffusers)",
    )
    # hf only: a GGUF checkpoint in the directory / hub repo ``id``
    gguf_file: str | None = option(None, only=("hf",), nonempty=True, expected="the name of a .gguf file in 'id'")

    def __post_init__(self) -> None:
        if self.kwargs and self.source == "zoo":
            raise ConfigError(
                "a zoo model takes no keyword arguments: 'kwargs' applies to sources hf, timm, diffusers", "kwargs"
            )

    def to_dict(self) -> dict[str, Any]:
        # ``pretrained`` only where it is not the default: the mapping is part of a run's fingerprint (resume)
        out: dict[str, Any] = {"source": self.source, "id": self.id, "dtype": self.dtype}
        if self.cls:
            out["class"] = self.cls
        if self.source == "timm" or (self.source == "zoo" and not self.pretrained):
            out["pretrained"] = self.pretrained
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        return out


parse_model_spec = ModelSpec.from_dict  # the name callers know


@dataclasses.dataclass
class LoadedModel:
    """A built model with what evaluation needs beside it."""

    model: Any  # nn.Module, or a diffusers pipeline
    spec: ModelSpec
    tokenizer: Any = None
    family: str = "any"


def _hf_class(spec: ModelSpec):
    import transformers

    name = spec.cls or "AutoModelForCausalLM"
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"transformers has no model class {name!r}", path="class")
    return cls


def _family_of(model: Any) -> str:
    from compressx.targets import is_causal_lm

    name = type(model).__name__
    if isinstance(model, nn.Module) and is_causal_lm(model):  # GPT2LMHeadModel too, not only *ForCausalLM
        return "llm"
    if "Llava" in name or name.endswith("ForConditionalGeneration"):
        return "mllm"
    if "Pipeline" in name:
        return "diffusion"
    if name.startswith(VIT_CLASS_PREFIXES):  # ViTForImageClassification, DeiTModel, SwinForImageClassification…
        return "vit"
    return "any"


def build_model(
    spec: ModelSpec, meta: bool = False, progress: bool = True, run_model_code: bool = True
) -> LoadedModel:
    """Build the model a spec names; with ``meta=True`` only its architecture, on the meta device.

    ``run_model_code=False`` never runs Python code shipped with a model (``kwargs: {trust_remote_code: true}`` is
    dropped): an architecture defined by such code then fails to build.
    """
    dtype = DTYPES[spec.dtype]
    try:
        if spec.source == "zoo":
            from compressx import zoo

            member = zoo.get_member(spec.id)
            if member.family == "diffusion":  # a pipeline: validation sees its config, as for source diffusers
                if not spec.pretrained:
                    raise ConfigError(f"zoo pipeline {spec.id} has no untrained form", path="pretrained")
                if meta:
                    return LoadedModel(member.build_empty(), spec, None, member.family)
                pipe, _ = zoo.load_zoo_model(spec.id, progress=progress)
                return LoadedModel(pipe.to(dtype=dtype), spec, None, member.family)
            if meta:
                with torch.device("meta"):
                    model = member.build_empty()
                return LoadedModel(model.to(dtype), spec, member.tokenizer(), member.family)
            if not spec.pretrained:  # the architecture, freshly initialised from the global RNG (seed it first)
                return LoadedModel(member.build_empty().to(dtype), spec, member.tokenizer(), member.family)
            model, tokenizer = zoo.load_zoo_model(spec.id, progress=progress)
            return LoadedModel(model.to(dtype).eval(), spec, tokenizer, member.family)
        if spec.source == "hf":
            import transformers

            cls = _hf_class(spec)
            gguf = {}
            if spec.gguf_file:  # checked from the file's header before anything is dequantized
                gguf_architecture(gguf_path(spec.id, spec.gguf_file))
                gguf = {"gguf_file": spec.gguf_file}
            if meta:
                kwargs = spec.kwargs if run_model_code else {**spec.kwargs, "trust_remote_code": False}
                kwargs = {**kwargs, **gguf}
                config = transformers.AutoConfig.from_pretrained(spec.id, **kwargs)
                with torch.device("meta"):
                    if hasattr(cls, "from_config"):
                        model = cls.from_config(config, dtype=dtype)
                    else:
                        model = cls._from_config(config, dtype=dtype)
            else:
                # safetensors only, never a pickled checkpoint, whatever the kwargs say
                kwargs = spec.kwargs if run_model_code else {**spec.kwargs, "trust_remote_code": False}
                # A GGUF file is not pickle either: transformers dequantizes its tensors to ``dtype``.
                weights = gguf or {"use_safetensors": True}
                model = cls.from_pretrained(spec.id, dtype=dtype, **{**kwargs, **weights}).eval()
                if gguf:
                    model = as_dense_checkpoint(model)
            family = _family_of(model)
            # Multimodal models get their processor (text + images) where text models get their tokenizer.
            loader = _hf_processor if family == "mllm" else _hf_tokenizer
            loader_kwargs = {**gguf, **({} if run_model_code else {"trust_remote_code": False})}
            tokenizer = loader(spec.id, **loader_kwargs)
            return LoadedModel(model, spec, tokenizer, family)
        if spec.source == "timm":
            import timm

            if meta:
                with torch.device("meta"):
                    model = timm.create_model(spec.id, pretrained=False, **spec.kwargs)
            else:
                model = timm.create_model(spec.id, pretrained=spec.pretrained, **spec.kwargs).eval()
            return LoadedModel(model.to(dtype), spec, None, _timm_family(spec.id))
        if spec.source == "diffusers":
            import diffusers

            if meta:
                # A pipeline is several models; validation only checks that the pipeline config resolves.
                # Pipeline passes take no targets, so there is nothing to resolve against the modules.
                return LoadedModel(diffusers.DiffusionPipeline.load_config(spec.id), spec, None, "diffusion")
            kwargs = {**spec.kwargs, "use_safetensors": True}  # never a pickled checkpoint
            pipe = diffusers.DiffusionPipeline.from_pretrained(spec.id, dtype=dtype, **kwargs)
            return LoadedModel(pipe, spec, None, "diffusion")
    except CompressxError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise CompressxError(f"cannot build model {spec.source}:{spec.id}: {type(err).__name__}: {err}") from err
    raise ConfigError(f"got {spec.source!r}; allowed: {', '.join(SOURCES)}", path="source")


# Vision transformers, by transformers class-name prefix and by timm architecture name.
VIT_CLASS_PREFIXES = ("ViT", "DeiT", "Swin")
VIT_TIMM_NAMES = ("vit", "deit", "swin")


def _timm_family(model_id: str) -> str:
    if any(name in model_id for name in VIT_TIMM_NAMES):
        return "vit"
    cnn = ("resnet", "resnext", "mobilenet", "efficientnet", "regnet", "convnext", "vgg", "densenet")
    return "cnn" if model_id.startswith(cnn) else "any"


def _hf_tokenizer(model_id: str, **kwargs: Any) -> Any:
    """The model's tokenizer, or None when its directory has none (metrics that need text then say so)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hf_processor(model_id: str, **kwargs: Any) -> Any:
    """The model's processor (tokenizer and image processor), or None when its directory has none."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def as_module(model: Any) -> nn.Module:
    """The ``nn.Module`` passes act on. A diffusers pipeline is not one: pipeline passes take it whole."""
    if isinstance(model, nn.Module):
        return model
    raise CompressxError(f"{type(model).__name__} is not a torch module; only pipeline passes apply to it")
