"""Tiny random models and tokenizers, built offline in seconds, and the environment of a one-node
multi-process launch: for tests, benchmarks and examples."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=8)
def tiny_tokenizer(
    vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE, lowercase: bool = False
):
    """A byte-level BPE tokenizer trained on Python's bundled pydoc topics (no network needed)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 64,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
):
    """A random LlamaForCausalLM small enough for a CPU step in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(
    directory: str | Path,
    *,
    vocab_size: int = 512,
    seed: int = 0,
    chat_template=CHATML_TEMPLATE,
    **model_kwargs,
) -> Path:
    """Write a tiny random model + tokenizer as a local HF directory and return its path."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer(vocab_size, chat_template)
    model = tiny_llama(len(tokenizer), seed=seed, **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int | str, *, threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment torchrun gives worker ``rank`` of a one-node job on this machine (offline,
    ``threads`` OpenMP threads), plus ``extra``."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        **extra,
    )
