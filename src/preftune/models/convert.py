"""GGUF -> plain Hugging Face checkpoint (float32 safetensors, config, tokenizer).

`transformers` loads a GGUF with `from_pretrained(dir, gguf_file=...)` and dequantizes it, but the
model it returns still carries `quantization_config` (quant_method "gguf"), which blocks training
and makes every later load dequantize again. We rebuild the config without it, build a fresh model
from that config, load the dequantized state dict into it and save that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from preftune.extras import require


def read_gguf_chat_template(gguf_path: str | Path) -> str | None:
    """The `tokenizer.chat_template` metadata string of a GGUF file, or None."""
    field = require("gguf", "presets").GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) and value else None


def convert_gguf_checkpoint(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    expect_chat_template: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write a float32 HF checkpoint of the GGUF file `gguf_path` into `out_dir`.

    Returns facts for the manifest: architecture, model_type, vocab_size, parameter count, library
    versions and the seconds each stage took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    gguf = require("gguf", "presets")  # transformers reads GGUF files through it

    say = progress or (lambda message: None)
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    timings = {}

    say(f"step 2/4: loading and dequantizing {gguf_path.name} with transformers")
    started = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = type(quantized.config).from_dict(config_dict)
    config.architectures = [type(quantized).__name__]
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover - defensive
        raise RuntimeError("rebuilt model still has a quantization_config")
    timings["load_seconds"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    model.save_pretrained(out_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    vocab_size = int(model.config.vocab_size)
    architecture = config.architectures[0]
    model_type = model.config.model_type
    del model
    timings["save_seconds"] = round(time.perf_counter() - started, 1)

    say("step 3/4: building the tokenizer from the GGUF metadata")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if expect_chat_template and not tokenizer.chat_template:
        template = read_gguf_chat_template(gguf_path)
        if template is None:
            raise ValueError(f"{gguf_path} has no tokenizer.chat_template, but the preset expects one")
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    timings["tokenizer_seconds"] = round(time.perf_counter() - started, 1)

    return {
        "architecture": architecture,
        "model_type": model_type,
        "vocab_size": vocab_size,
        "num_parameters": num_parameters,
        "has_chat_template": bool(tokenizer.chat_template),
        "transformers_version": transformers_version,
        "gguf_version": getattr(gguf, "__version__", None) or _distribution_version("gguf"),
        **timings,
    }


def _distribution_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
