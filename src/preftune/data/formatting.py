"""Rendering examples to text with one model's tokenizer and chat template.

Rendering is per tokenizer: the policy and every reference model render the same example with their
own template (each reference scores the text as it would see it, so references with different
vocabularies combine at the sequence level), so nothing here caches text across tokenizers.
"""

from __future__ import annotations

import logging
from typing import Any

from .records import Example, Text, UnpairedExample

logger = logging.getLogger(__name__)

# Used for conversational data when a tokenizer has no chat template (e.g. Gemma-3-270M base) and
# none is configured. Turns read "User: ...", the generation prompt is "Assistant:" and the reply
# follows after one space, so the boundary between prompt and completion falls before a
# space-prefixed word, where byte-level BPE and SentencePiece tokenizers split anyway. Every assistant
# turn ends with the EOS token. No BOS: text rendered with this template is tokenized like plain text
# (``add_special_tokens=True``), so the tokenizer adds BOS exactly when its own configuration says so.
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}{{ '\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' }}{{ message['content'] }}{{ eos_token if eos_token else '' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}{{ ': ' }}{{ message['content'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ '\\n' }}{%- endif -%}"
    "{{ 'Assistant:' }}"
    "{%- endif -%}"
)


_warned_not_prefix = False


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The template to render with: the override, else the tokenizer's own (``None``), else the fallback."""
    if chat_template is not None:
        return chat_template
    return None if has_chat_template(tokenizer) else DEFAULT_TEMPLATE


def add_special_tokens_for(tokenizer: Any, *, conversational: bool, chat_template: str | None = None) -> bool:
    """Whether text rendered for this tokenizer must be tokenized with ``add_special_tokens=True``.

    Plain text: yes (the tokenizer adds BOS as configured; :func:`tokenize_example` appends EOS).
    Conversational text from a real chat template: no, the template writes its own special tokens
    (as ``apply_chat_template(tokenize=True)`` does). Conversational text from
    :data:`DEFAULT_TEMPLATE`: yes, it is plain text with turn labels.
    """
    if not conversational:
        return True
    return resolve_chat_template(tokenizer, chat_template) == DEFAULT_TEMPLATE


def _apply(tokenizer: Any, messages: list[dict[str, Any]], template: str | None, generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, chat_template=template
    )
    if not isinstance(text, str):  # processors may return a list for one conversation
        text = text[0]
    return text


def _common_prefix(texts: list[str]) -> str:
    first = texts[0]
    end = len(first)
    for other in texts[1:]:
        limit = min(end, len(other))
        index = 0
        while index < limit and first[index] == other[index]:
            index += 1
        end = index
    return first[:end]


def _render(
    prompt: Text, completions: list[Text], tokenizer: Any, chat_template: str | None
) -> tuple[str, ...]:
    if isinstance(prompt, str):
        return (prompt, *completions)
    template = resolve_chat_template(tokenizer, chat_template)
    prompt_text = _apply(tokenizer, prompt, template, generation=True)
    full_texts = [
        _apply(tokenizer, prompt + completion, template, generation=False) for completion in completions
    ]
    if all(full.startswith(prompt_text) for full in full_texts):
        return (prompt_text, *(full[len(prompt_text) :] for full in full_texts))
    # The template renders the prompt alone differently from the prompt inside the full conversation
    # (e.g. a generation prompt the full conversation drops). Like TRL 1.16, train on the shared start
    # as the prompt and the rest as the completion.
    shared = _common_prefix([prompt_text, *full_texts])
    global _warned_not_prefix
    if not _warned_not_prefix:
        _warned_not_prefix = True
        logger.warning(
            "The chat template renders the prompt alone differently than inside the full conversation; "
            "the prompt is cut to their shared start, and the model trains on a context that differs "
            "from the one it sees at generation (dropped: %r). Shown once.",
            prompt_text[len(shared) :],
        )
    return (shared, *(full[len(shared) :] for full in full_texts))


def render_example(
    example: Example | UnpairedExample, tokenizer: Any, *, chat_template: str | None = None
) -> tuple[str, ...]:
    """Text of an example as ``tokenizer``'s model sees it.

    Returns ``(prompt_text, chosen_text, rejected_text)`` for an :class:`Example` and
    ``(prompt_text, completion_text)`` for an :class:`UnpairedExample`. Plain strings pass through
    unchanged (EOS is added at tokenization). Conversations are rendered with ``chat_template`` if
    given, else the tokenizer's own template, else :data:`DEFAULT_TEMPLATE`: the prompt with the
    generation prompt, each completion as the full conversation minus that prompt text.
    """
    if isinstance(example, UnpairedExample):
        return render_unpaired(example, tokenizer, chat_template=chat_template)
    return _render(example.prompt, [example.chosen, example.rejected], tokenizer, chat_template)


def render_unpaired(
    example: UnpairedExample, tokenizer: Any, *, chat_template: str | None = None
) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` of an :class:`UnpairedExample`; see :func:`render_example`."""
    return _render(example.prompt, [example.completion], tokenizer, chat_template)
