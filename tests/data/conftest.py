"""Fixtures and helpers for the data-stage tests: tiny BPE tokenizers trained in-process (no network)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A second, different template: the same example must render differently per tokenizer.
BRACKET_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '[' + message['role'] + '] ' + message['content'] + ' [/' + message['role'] + ']' }}"
    "{% endif %}"
    "{% endfor %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_jsonl(path, rows, *, blank_line_after_first: bool = False) -> str:
    """Write ``rows`` to ``path`` as UTF-8 JSON lines and return the path as a string.

    ``blank_line_after_first`` puts an empty line 2 in the file (row numbers must skip it).
    """
    lines = [json.dumps(row) for row in rows]
    if blank_line_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def bpe_json() -> str:
    """A byte-level BPE (vocabulary 1000) trained on the pydoc topics that ship with Python."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(topics.values()), trainer)
    return tokenizer.to_str()


def _make_tokenizer(bpe_json: str, *, chat_template: str | None, add_bos: bool = True, add_eos: bool = False):
    """A PreTrainedTokenizerFast over the shared BPE. ``add_bos``: prepends <s> like Llama/Gemma;
    ``add_eos``: appends </s> itself, like some sentencepiece configurations."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(bpe_json)
    if add_bos or add_eos:
        single = " ".join([*(["<s>"] if add_bos else []), "$A", *(["</s>"] if add_eos else [])])
        backend.post_processor = processors.TemplateProcessing(
            single=single,
            special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def make_tiny_tokenizer(bpe_json):
    """Factory: ``make_tiny_tokenizer(chat_template=..., add_bos=True, add_eos=False)``."""

    def make(*, chat_template: str | None, add_bos: bool = True, add_eos: bool = False):
        return _make_tokenizer(bpe_json, chat_template=chat_template, add_bos=add_bos, add_eos=add_eos)

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(bpe_json):
    """Adds BOS; ChatML-like chat template that writes its own BOS."""
    return _make_tokenizer(bpe_json, chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template(bpe_json):
    """Adds BOS; no chat template (like Gemma-3-270M base)."""
    return _make_tokenizer(bpe_json, chat_template=None)


@pytest.fixture(scope="session")
def tiny_tokenizer_bracket(bpe_json):
    """No BOS; a different chat template."""
    return _make_tokenizer(bpe_json, chat_template=BRACKET_TEMPLATE, add_bos=False)
