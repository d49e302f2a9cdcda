"""Load a causal LM and its tokenizer from a preset name or a local checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from preftune.models.presets import resolve_model

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


def check_causal_lm_config(path: str | Path):
    """The config of the checkpoint at `path`; ValueError unless it is a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face checkpoint directory: it has no config.json")
    config = AutoConfig.from_pretrained(path)
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures:
        is_causal = any(name in causal_classes or name.endswith(_CAUSAL_SUFFIXES) for name in architectures)
    else:
        is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False):
        is_causal = False
    if not is_causal:
        raise ValueError(
            f"{str(path)!r} is not a causal language model: its config has model_type={model_type!r} and "
            f"architectures={architectures or None}. preftune trains decoder-only models that "
            "AutoModelForCausalLM loads (e.g. LlamaForCausalLM, Gemma3ForCausalLM)."
        )
    return config


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
):
    """Return `(model, tokenizer)` for a preset name or a local checkpoint directory.

    dtype: None means float32 (the precision presets are stored in and CPU training uses); pass
    "bfloat16" for GPU training, or "auto" to keep the dtype the checkpoint was saved in.
    device: where to move the model; None leaves it on the CPU.
    The tokenizer always has a pad token (its eos token when it had none).
    The model's scoring is probed once here (:func:`preftune.scoring.probe_scoring`): where preftune's
    chunked head would not reproduce the model's own logits, or shared-prompt rows would not reproduce
    plain rows, the model is marked so that scoring never silently gives other numbers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.scoring import probe_scoring

    path = resolve_model(name_or_path, cache_dir=cache_dir)
    check_causal_lm_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    if device is not None:
        model = model.to(device)
    probe_scoring(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {str(path)!r} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
