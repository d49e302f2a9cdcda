"""Tokenization: BOS/EOS handling, the prompt/completion split, truncation and dataset-level errors."""

from __future__ import annotations

import pytest

from preftune.data import (
    Columns,
    DataError,
    Example,
    LoadedData,
    TokenizedExample,
    TokenizedUnpaired,
    UnpairedExample,
    load_examples,
    render_example,
    tokenize_dataset,
    tokenize_example,
    tokenize_unpaired,
)

from .conftest import write_jsonl

USER = {"role": "user", "content": "Sky color?"}
BLUE = {"role": "assistant", "content": "Blue."}
GREEN = {"role": "assistant", "content": "Green is the colour of the sky at dawn, they say."}


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_plain_text_gets_bos_once_and_eos_once(tiny_tokenizer):
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    out = tokenize_example(
        "The sky is", " blue.", " green.", tiny_tokenizer, max_length=None, add_special_tokens=True
    )
    assert out.prompt_ids == [bos, *ids(tiny_tokenizer, "The sky is")]
    assert out.chosen_ids == [*ids(tiny_tokenizer, " blue."), eos]
    assert out.rejected_ids == [*ids(tiny_tokenizer, " green."), eos]
    assert out.truncated is False and out.prompt_text == "The sky is"
    # Text that already holds the special tokens gets no second copy.
    again = tokenize_example(
        "<s>The sky is", " blue.</s>", " green.", tiny_tokenizer, max_length=None, add_special_tokens=True
    )
    assert (again.prompt_ids, again.chosen_ids, again.rejected_ids) == (
        out.prompt_ids,
        out.chosen_ids,
        out.rejected_ids,
    )


def test_tokenizer_that_appends_eos_itself_still_gives_one_eos(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template=None, add_bos=False, add_eos=True)
    eos = tokenizer.eos_token_id
    out = tokenize_example(
        "The sky is", " blue.", " green.", tokenizer, max_length=None, add_special_tokens=True
    )
    assert out.prompt_ids == ids(tokenizer, "The sky is")  # its own trailing EOS is not part of the prompt
    assert out.chosen_ids == [*ids(tokenizer, " blue."), eos]


def test_no_bos_tokenizer_gets_no_bos(tiny_tokenizer_bracket):
    out = tokenize_example(
        "Hi", " there", " you", tiny_tokenizer_bracket, max_length=None, add_special_tokens=True
    )
    assert out.prompt_ids == ids(tiny_tokenizer_bracket, "Hi")
    assert tiny_tokenizer_bracket.bos_token_id not in out.prompt_ids


def test_chat_template_text_matches_apply_chat_template_ids(tiny_tokenizer):
    example = Example([USER], [BLUE], [GREEN], row=1)
    texts = render_example(example, tiny_tokenizer)
    out = tokenize_example(*texts, tiny_tokenizer, max_length=None, add_special_tokens=False)
    prompt_ids = tiny_tokenizer.apply_chat_template([USER], add_generation_prompt=True, return_dict=False)
    full_ids = tiny_tokenizer.apply_chat_template([USER, BLUE], return_dict=False)
    assert out.prompt_ids == prompt_ids and out.prompt_ids + out.chosen_ids == full_ids
    assert out.prompt_ids.count(tiny_tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    assert tiny_tokenizer.eos_token_id not in out.chosen_ids  # the template ends turns; no EOS appended
    # Even when asked to add special tokens, the duplicated BOS is collapsed.
    forced = tokenize_example(*texts, tiny_tokenizer, max_length=None, add_special_tokens=True)
    assert forced.prompt_ids == prompt_ids


def test_token_merging_across_the_boundary_moves_it_back(tiny_tokenizer):
    # "The sky is " ends with a space that merges into the completion's first word when joined.
    out = tokenize_example(
        "The sky is ", "blue.", "green.", tiny_tokenizer, max_length=None, add_special_tokens=True
    )
    full = ids(tiny_tokenizer, "The sky is blue.</s>", special=True)
    assert out.prompt_ids + out.chosen_ids == full
    assert out.prompt_ids == ids(tiny_tokenizer, "The sky is", special=True)


def test_truncation_keeps_the_start_and_flags_it(tiny_tokenizer):
    prompt, short, long = "The sky is", " blue.", " green and grey and purple and red and orange."
    full = tokenize_example(prompt, short, long, tiny_tokenizer, max_length=None, add_special_tokens=True)
    max_length = len(full.prompt_ids) + 3
    out = tokenize_example(
        prompt, short, long, tiny_tokenizer, max_length=max_length, add_special_tokens=True
    )
    assert out.truncated is True
    assert out.prompt_ids == full.prompt_ids
    assert out.chosen_ids == full.chosen_ids[:3] and out.rejected_ids == full.rejected_ids[:3]
    assert len(out.prompt_ids) + len(out.rejected_ids) == max_length
    room = len(full.prompt_ids) + max(len(full.chosen_ids), len(full.rejected_ids))
    exact = tokenize_example(prompt, short, long, tiny_tokenizer, max_length=room, add_special_tokens=True)
    assert exact.truncated is False and exact.rejected_ids == full.rejected_ids


def test_prompt_that_fills_max_length_is_an_error(tiny_tokenizer):
    prompt_length = len(ids(tiny_tokenizer, "The sky is", special=True))
    out = tokenize_example(
        "The sky is",
        " blue.",
        " green.",
        tiny_tokenizer,
        max_length=prompt_length + 1,
        add_special_tokens=True,
    )
    assert len(out.chosen_ids) == 1 and len(out.rejected_ids) == 1  # one completion token is enough
    with pytest.raises(DataError) as error:
        tokenize_example(
            "The sky is",
            " blue.",
            " green.",
            tiny_tokenizer,
            max_length=prompt_length,
            add_special_tokens=True,
            row=7,
            source="train.jsonl",
        )
    assert str(error.value).startswith(
        f"train.jsonl, line 7, field 'prompt': prompt is {prompt_length} tokens"
    )


def test_tokenize_dataset_names_row_and_field_and_skips(tmp_path, tiny_tokenizer):
    long_prompt = "word " * 50
    rows = [
        {"question": "The sky is", "good": " blue.", "bad": " green."},
        {"question": long_prompt, "good": " a", "bad": " b"},
        {"question": "The sun is", "good": " hot and bright and far away.", "bad": " cold."},
    ]
    columns = Columns(prompt="question", chosen="good", rejected="bad")
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    loaded = load_examples(source, columns=columns)
    with pytest.raises(DataError) as error:
        tokenize_dataset(loaded, tiny_tokenizer, max_length=12, progress=False)
    assert str(error.value).startswith(f"{source}, line 2, field 'question': prompt is ")
    assert (error.value.row, error.value.field) == (2, "question")
    outputs, report = tokenize_dataset(loaded, tiny_tokenizer, max_length=12, on_error="skip", progress=False)
    assert [o.row for o in outputs] == [1, 3]
    assert [o.prompt_text for o in outputs] == ["The sky is", "The sun is"]
    assert report.total == 3 and report.kept == 2 and report.truncated == 1
    assert len(report.skipped) == 1 and report.skipped[0][:2] == (2, "question")
    singles = [
        tokenize_example(
            *render_example(e, tiny_tokenizer), tiny_tokenizer, max_length=12, add_special_tokens=True
        )
        for e in (loaded.examples[0], loaded.examples[2])
    ]
    assert [(o.prompt_ids, o.chosen_ids, o.rejected_ids, o.truncated) for o in outputs] == [
        (s.prompt_ids, s.chosen_ids, s.rejected_ids, s.truncated) for s in singles
    ]
    assert all(isinstance(o, TokenizedExample) for o in outputs)


def test_tokenize_dataset_batches_agree_with_single_calls(tiny_tokenizer):
    examples = [Example([USER], [BLUE], [GREEN], row=i) for i in range(5)]
    loaded = LoadedData(examples=examples, source="mem", conversational=True)
    outputs, report = tokenize_dataset(loaded, tiny_tokenizer, max_length=None, batch_size=2, progress=False)
    single = tokenize_example(
        *render_example(examples[0], tiny_tokenizer),
        tiny_tokenizer,
        max_length=None,
        add_special_tokens=False,
    )
    assert [o.row for o in outputs] == [0, 1, 2, 3, 4] and report.truncated == 0
    assert all(
        (o.prompt_ids, o.chosen_ids, o.rejected_ids)
        == (single.prompt_ids, single.chosen_ids, single.rejected_ids)
        for o in outputs
    )


def test_fallback_template_tokenization_has_one_bos_and_one_eos(tiny_tokenizer_no_template):
    tokenizer = tiny_tokenizer_no_template
    loaded = LoadedData(examples=[Example([USER], [BLUE], [GREEN], row=1)], source="mem", conversational=True)
    (out,), _ = tokenize_dataset(loaded, tokenizer, max_length=None, progress=False)
    assert out.prompt_ids[0] == tokenizer.bos_token_id and out.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert out.chosen_ids[-1] == tokenizer.eos_token_id and out.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert out.prompt_text == "User: Sky color?\nAssistant:"


def test_per_tokenizer_outputs_differ(tiny_tokenizer, tiny_tokenizer_bracket):
    loaded = LoadedData(examples=[Example([USER], [BLUE], [GREEN], row=1)], source="mem", conversational=True)
    (a,), _ = tokenize_dataset(loaded, tiny_tokenizer, max_length=None, progress=False)
    (b,), _ = tokenize_dataset(loaded, tiny_tokenizer_bracket, max_length=None, progress=False)
    assert a.prompt_text != b.prompt_text and a.prompt_ids != b.prompt_ids
    assert b.prompt_ids == ids(tiny_tokenizer_bracket, "[user] Sky color? [/user]")


def test_unpaired(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "Q: sky?", "completion": " blue", "label": 1},
        {"prompt": "Q: where is the sun?", "completion": " cold", "label": 0},
    ]
    loaded = load_examples(write_jsonl(tmp_path / "u.jsonl", rows), unpaired=True)
    outputs, report = tokenize_dataset(loaded, tiny_tokenizer, max_length=64, progress=False)
    assert [(o.row, o.label) for o in outputs] == [(1, True), (2, False)]
    assert all(isinstance(o, TokenizedUnpaired) for o in outputs)
    single = tokenize_unpaired(
        "Q: sky?", " blue", tiny_tokenizer, max_length=64, add_special_tokens=True, label=True
    )
    assert (outputs[0].prompt_ids, outputs[0].completion_ids) == (single.prompt_ids, single.completion_ids)
    assert single.completion_ids[-1] == tiny_tokenizer.eos_token_id
    with pytest.raises(DataError, match=r"u\.jsonl, line 2, field 'prompt': prompt is"):
        tokenize_dataset(loaded, tiny_tokenizer, max_length=len(single.prompt_ids) + 1, progress=False)


def test_chat_template_error_becomes_a_row_error(make_tiny_tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tokenizer = make_tiny_tokenizer(chat_template=template)
    examples = [
        Example([USER], [BLUE], [GREEN], row=1),
        Example([{"role": "system", "content": "x"}, USER], [BLUE], [GREEN], row=2),
    ]
    loaded = LoadedData(examples=examples, source="chat.jsonl", conversational=True)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2, field 'prompt': the chat template failed"):
        tokenize_dataset(loaded, tokenizer, max_length=None, progress=False)
    outputs, report = tokenize_dataset(loaded, tokenizer, max_length=None, on_error="skip", progress=False)
    assert [o.row for o in outputs] == [1] and report.skipped[0][0] == 2


def test_unpaired_examples_in_memory(tiny_tokenizer):
    loaded = LoadedData(examples=[UnpairedExample("Q", " A", True, 0)], source="mem", unpaired=True)
    (out,), _ = tokenize_dataset(loaded, tiny_tokenizer, max_length=None, progress=False)
    assert out.label is True and out.completion_ids[-1] == tiny_tokenizer.eos_token_id
