"""Load a causal LM and its tokenizer from a preset name or a local checkpoint directory, and the
policy as a training config asks for it (dtype, activation checkpointing, LoRA)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from preftune.config import ConfigError, TrainConfig
from preftune.models.presets import resolve_model
from preftune.rundir import tokenizer_dir

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


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a model directory (a checkpoint's ``model/``: its run's ``tokenizer/``), with a
    pad token (its eos token when it had none). Loads no weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(model_dir))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {str(model_dir)!r} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    tokenizer=None,
):
    """Return `(model, tokenizer)` for a preset name or a local checkpoint directory.

    dtype: None means float32 (the precision presets are stored in and CPU training uses); pass
    "bfloat16" for GPU training, or "auto" to keep the dtype the checkpoint was saved in.
    device: where to move the model; None leaves it on the CPU.
    The tokenizer always has a pad token (its eos token when it had none); ``tokenizer``, one
    already loaded from this directory with :func:`load_tokenizer`, is used instead of a second load.
    The model's scoring is probed once here (:func:`preftune.scoring_probe.probe_scoring`): where preftune's
    chunked head would not reproduce the model's own logits, or shared-prompt rows would not reproduce
    plain rows, the model is marked so that scoring never silently gives other numbers.
    """
    from transformers import AutoModelForCausalLM

    from preftune.scoring_probe import probe_scoring

    path = resolve_model(name_or_path, cache_dir=cache_dir)
    check_causal_lm_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    if device is not None:
        model = model.to(device)
    probe_scoring(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The policy and references as a training config names them


def config_dtype(name: str | None) -> torch.dtype | None:
    """A config's dtype string as a torch dtype (None stays None); errors are ConfigErrors."""
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return value


def mixed_precision(cfg: TrainConfig) -> str:
    """accelerate's mixed_precision for ``cfg.precision`` ("auto": bf16 where the GPU supports it)."""
    if cfg.precision == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def resolve_causal_lm(name: str, key: str) -> Path:
    """A model directory for a config value, checked to be a causal LM; errors name the config key."""
    try:
        path = Path(resolve_model(name))
        check_causal_lm_config(path)
        if path.is_dir() and not any(
            next(path.glob(p), None) for p in ("*.safetensors", "*.bin", "*.index.json")
        ):
            raise ValueError(f"{str(path)!r} has a config.json but no weights (*.safetensors or *.bin)")
    except (
        ValueError,
        ImportError,
        FileNotFoundError,
    ) as e:  # not a causal LM / a file / absent / no package
        raise ConfigError(f"{key}: {e}") from e
    return path


POLICY_REFERENCE_TEMPLATE = "references: the `policy` reference always uses the policy's chat template"


def check_model_paths(cfg: TrainConfig) -> list[Path]:
    """Every model the config names -- the policy, then each reference -- checked to be a causal LM
    with weights, before any weights load and before the run directory is created: a misspelt path is
    one ConfigError naming its key (``model``, ``references[1]``). Local directories first, presets
    after (a preset not converted yet is converted on first use, which a misspelt reference must not
    wait for). Returns the directories, policy first."""
    from preftune.models.presets import PRESETS

    if not cfg.model:
        raise ConfigError(
            "`model` is required: a local HF directory or a preset name (e.g. smollm2-135m-instruct)"
        )
    named = [("model", cfg.model)]
    for k, ref in enumerate(cfg.references or []):
        if ref.model == "policy":
            if ref.chat_template:
                raise ConfigError(POLICY_REFERENCE_TEMPLATE)
            continue
        named.append((f"references[{k}]", ref.model))

    def is_preset(name: str) -> bool:
        return str(name) in PRESETS and not Path(name).expanduser().is_dir()

    found = {key: resolve_causal_lm(name, key) for key, name in named if not is_preset(name)}
    found.update({key: resolve_causal_lm(name, key) for key, name in named if is_preset(name)})
    return [found[key] for key, _ in named]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing).

    transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias until v6) to
    activation_checkpointing_enable; older releases have only the first.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(cfg: TrainConfig, device, tokenizer=None) -> tuple[nn.Module, object, Path]:
    """(model, tokenizer, directory) of ``cfg.model``: dtype, activation checkpointing and LoRA applied;
    ``tokenizer``: the policy's, already loaded (:func:`load_causal_lm`)."""
    if not cfg.model:
        raise ConfigError(
            "`model` is required: a local HF directory or a preset name (e.g. smollm2-135m-instruct)"
        )
    path = resolve_causal_lm(cfg.model, "model")
    model, tokenizer = load_causal_lm(
        str(path), dtype=config_dtype(cfg.model_dtype) or torch.float32, device=device, tokenizer=tokenizer
    )
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets if targets == "all-linear" else list(targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, tokenizer, Path(path)
