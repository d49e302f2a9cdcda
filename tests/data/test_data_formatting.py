"""Rendering examples with each tokenizer's own chat template, an override, or the fallback."""

from __future__ import annotations

import logging

from preftune.data import (
    DEFAULT_TEMPLATE,
    Example,
    UnpairedExample,
    add_special_tokens_for,
    render_example,
    render_unpaired,
)
from preftune.data import formatting as formatting_module

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Sky color?"}
BLUE = {"role": "assistant", "content": "Blue."}
GREEN = {"role": "assistant", "content": "Green."}
CHAT_EXAMPLE = Example([SYSTEM, USER], [BLUE], [GREEN], row=1)


def test_plain_text_passes_through_unchanged(tiny_tokenizer, tiny_tokenizer_no_template):
    example = Example("The sky is", " blue.", " green.", row=1)
    for tokenizer in (tiny_tokenizer, tiny_tokenizer_no_template):
        assert render_example(example, tokenizer) == ("The sky is", " blue.", " green.")
    assert render_unpaired(UnpairedExample("Q:", " A", True, 1), tiny_tokenizer) == ("Q:", " A")


def test_conversation_uses_the_tokenizers_own_template(tiny_tokenizer):
    prompt, chosen, rejected = render_example(CHAT_EXAMPLE, tiny_tokenizer)
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSky color?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt == tiny_tokenizer.apply_chat_template(
        [SYSTEM, USER], tokenize=False, add_generation_prompt=True
    )
    assert chosen == "Blue.<|im_end|>\n" and rejected == "Green.<|im_end|>\n"
    full = tiny_tokenizer.apply_chat_template([SYSTEM, USER, BLUE], tokenize=False)
    assert prompt + chosen == full


def test_each_tokenizer_renders_with_its_own_template(tiny_tokenizer, tiny_tokenizer_bracket):
    chatml = render_example(CHAT_EXAMPLE, tiny_tokenizer)
    bracket = render_example(CHAT_EXAMPLE, tiny_tokenizer_bracket)
    assert bracket == ("[system] Be brief. [/system][user] Sky color? [/user]", " Blue.</s>", " Green.</s>")
    assert chatml != bracket
    # Rendering one tokenizer does not change what the other renders.
    assert render_example(CHAT_EXAMPLE, tiny_tokenizer) == chatml
    assert add_special_tokens_for(tiny_tokenizer, conversational=True) is False
    assert add_special_tokens_for(tiny_tokenizer, conversational=False) is True


def test_fallback_template_when_the_tokenizer_has_none(tiny_tokenizer_no_template):
    assert render_example(CHAT_EXAMPLE, tiny_tokenizer_no_template) == (
        "System: Be brief.\nUser: Sky color?\nAssistant:",
        " Blue.</s>",
        " Green.</s>",
    )
    # The fallback is plain text with turn labels: tokenized with the tokenizer's own BOS.
    assert add_special_tokens_for(tiny_tokenizer_no_template, conversational=True) is True
    multi_turn = Example([USER, BLUE, {"role": "user", "content": "Sure?"}], [GREEN], [BLUE], row=1)
    prompt, chosen, _ = render_example(multi_turn, tiny_tokenizer_no_template)
    assert prompt == "User: Sky color?\nAssistant: Blue.</s>\nUser: Sure?\nAssistant:"
    assert chosen == " Green.</s>"


def test_chat_template_override_wins(tiny_tokenizer, tiny_tokenizer_no_template, tiny_tokenizer_bracket):
    bracket = tiny_tokenizer_bracket.chat_template
    for tokenizer in (tiny_tokenizer, tiny_tokenizer_no_template):
        rendered = render_example(CHAT_EXAMPLE, tokenizer, chat_template=bracket)
        assert rendered == (
            "[system] Be brief. [/system][user] Sky color? [/user]",
            " Blue.</s>",
            " Green.</s>",
        )
        assert add_special_tokens_for(tokenizer, conversational=True, chat_template=bracket) is False
    assert render_example(CHAT_EXAMPLE, tiny_tokenizer, chat_template=DEFAULT_TEMPLATE)[0].startswith(
        "System:"
    )


def test_template_whose_prompt_is_not_a_prefix_falls_back_to_the_shared_start(
    tiny_tokenizer, make_tiny_tokenizer, caplog, monkeypatch
):
    # The generation prompt opens an empty "thought" that the full conversation does not contain.
    template = tiny_tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think></think>' }}"
    )
    assert template != tiny_tokenizer.chat_template
    tokenizer = make_tiny_tokenizer(chat_template=template)
    monkeypatch.setattr(formatting_module, "_warned_not_prefix", False)
    with caplog.at_level(logging.WARNING, logger="preftune.data.formatting"):
        prompt, chosen, rejected = render_example(CHAT_EXAMPLE, tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and chosen == "Blue.<|im_end|>\n"
    assert rejected == "Green.<|im_end|>\n"
    assert "'<think></think>'" in caplog.text


def test_unpaired_conversation(tiny_tokenizer):
    example = UnpairedExample([USER], [BLUE], label=False, row=4)
    prompt, completion = render_example(example, tiny_tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and completion == "Blue.<|im_end|>\n"
