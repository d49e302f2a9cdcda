"""Greedy generation and exact match: batching (left padding) must not change any answer."""

import pytest

from preftune.generation import answer_match, answer_matches, exact_match, generate
from preftune.models import load_causal_lm


def test_batched_greedy_generation_equals_one_by_one(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir))
    prompts = [
        [{"role": "user", "content": "What is 2 plus 2?"}],
        [{"role": "user", "content": "A much longer question about the sum of seventeen and twenty-five?"}],
    ]
    tok.padding_side = "right"  # generation must pad on the left, whatever the tokenizer says
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # and the caller's setting is restored afterwards


def test_exact_match_counts_correct_answers(tiny_model_dir, monkeypatch):
    from preftune import generation

    model, tok = load_causal_lm(str(tiny_model_dir))
    items = [{"prompt": "q1", "answer": 4}, {"prompt": "q2", "answer": 7}, {"prompt": "q3", "answer": 1}]
    replies = ["2 + 2 = 4. The answer is 4.", "The answer is 8.", "no idea"]
    monkeypatch.setattr(generation, "generate", lambda *a, **k: replies)
    score, details = exact_match(model, tok, items)
    assert score == 1 / 3
    assert [d["predicted"] for d in details] == [4, 8, None]


@pytest.mark.parametrize(
    ("mode", "output", "answer", "expected"),
    [
        ("contains", "The capital of France is Paris.", "Paris", True),
        ("contains", "Parisian food is good", "Paris", False),  # whole words only
        ("contains", "the answer is 14", "4", False),
        ("exact", "Paris.", "paris", True),
        ("exact", "The capital of France is Paris.", "Paris", False),
        ("exact", "  The   Eiffel tower!", "eiffel Tower", True),  # articles, case, spaces, punctuation
        ("regex", "It is 3.14159", r"3\.14\d*", True),
        ("regex", "It is three", r"\d+", False),
        ("numeric", "2 + 2 = 4. The answer is 4.", 4, True),
        ("numeric", "2 + 2 = 4. The answer is 4.", "4", True),
        ("numeric", "The capital is Paris", "Paris", False),
        ("numeric", "4", 4, False),  # only "The answer is N" counts
    ],
)
def test_answer_matching_modes(mode, output, answer, expected):
    assert answer_matches(output, answer, mode) is expected


def test_unknown_match_mode_is_an_error():
    with pytest.raises(ValueError, match="contains, exact, regex, numeric"):
        answer_matches("x", "x", "fuzzy")


def test_answer_match_scores_general_text(tiny_model_dir, monkeypatch):
    from preftune import generation

    model, tok = load_causal_lm(str(tiny_model_dir))
    items = [
        {"prompt": "What is the capital of France?", "answer": "Paris"},
        {"prompt": "And of Italy?", "answer": "Rome"},
    ]
    monkeypatch.setattr(generation, "generate", lambda *a, **k: ["The capital of France is Paris.", "Milan"])
    score, details = answer_match(model, tok, items, mode="contains")
    assert score == 0.5 and [d["correct"] for d in details] == [True, False]
    assert (
        details[0]["output"] == "The capital of France is Paris."
        and details[0]["prompt"] == items[0]["prompt"]
    )


def test_generation_is_greedy_with_kv_cache_and_stops_at_eos(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir))
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    model.generate = spy
    generate(model, tok, ["hello", "a longer prompt here"], max_new_tokens=3, batch_size=2)
    assert seen["do_sample"] is False and seen["use_cache"] is True
    assert seen["eos_token_id"] == tok.eos_token_id
    assert seen["input_ids"].shape[0] == 2  # one batched call


def test_a_row_stops_once_its_text_matches_stop_when_and_the_others_go_on(tiny_model_dir):
    import re

    model, tok = load_causal_lm(str(tiny_model_dir))
    prompts = ["What is 2 plus 2?", "A much longer question about the sum of seventeen and twenty-five?"]
    full = generate(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert len(full[0]) > 4 and full[0][:4] not in full[1]  # the pattern below can only stop row 0
    stop = re.compile(re.escape(full[0][:4]))
    stopped = generate(model, tok, prompts, max_new_tokens=12, batch_size=2, stop_when=stop)
    # row 0 ends at the first token whose text completes the match: a proper prefix of its full text
    assert stop.search(stopped[0]) and full[0].startswith(stopped[0]) and len(stopped[0]) < len(full[0])
    assert stopped[1] == full[1]  # the other row generated on, unchanged
    # what a row writes before it stops does not depend on its batch
    assert [generate(model, tok, [p], max_new_tokens=12, stop_when=stop)[0] for p in prompts] == stopped


@pytest.mark.parametrize("architecture", ["llama", "gemma3_text", "qwen3", "falcon_h1"])
def test_rows_that_stop_leave_the_batch_and_the_text_is_that_of_one_call(architecture, monkeypatch):
    """Every LOOK_EVERY tokens the rows that stopped leave the batch and the KV cache (gemma3's
    sliding-window layers and falcon_h1's state-space layers included): what each row writes is
    what one ``model.generate`` call over the whole batch writes."""
    from preftune import generation
    from preftune.testing import tiny_tokenizer

    from .test_architectures import build

    tok = tiny_tokenizer(vocab_size=300, chat_template=None)
    model = build(
        architecture, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    prompts = ["def f(x):", "The sum of two numbers", "import os", "class A: pass", "x = 1", "for i in"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    written = model.generate(**enc, max_new_tokens=14, do_sample=False, pad_token_id=tok.pad_token_id)
    written = written[:, enc["input_ids"].shape[1] :]
    # EOS := the 3rd token row 0 writes, unless it opens another row's text: row 0 stops early
    eos = next(int(t) for t in written[0, 2:] if not (written[1:, :2] == t).any())
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    assert tok.eos_token_id == eos

    monkeypatch.setattr(generation, "LOOK_EVERY", 10**6)  # one call: the text to reproduce
    once = generate(model, tok, prompts, max_new_tokens=14, batch_size=6)
    monkeypatch.setattr(generation, "LOOK_EVERY", 3)
    rows_per_call = []
    original = model.generate

    def counting(**kwargs):
        rows_per_call.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", counting)
    assert generate(model, tok, prompts, max_new_tokens=14, batch_size=6) == once
    assert rows_per_call[0] == 6 and len(rows_per_call) > 1
    if architecture == "falcon_h1":  # state-space layers cannot drop rows: every row stays
        assert set(rows_per_call) == {6}
    else:
        assert rows_per_call[-1] < 6  # the rows still writing went on alone


def test_a_tokenizer_without_eos_generates_to_max_new_tokens_in_pieces(monkeypatch):
    from preftune import generation
    from preftune.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    tok.eos_token = None
    monkeypatch.setattr(generation, "LOOK_EVERY", 3)
    pieces = generate(model, tok, ["hello there", "a b"], max_new_tokens=10, batch_size=2)
    monkeypatch.setattr(generation, "LOOK_EVERY", 100)
    assert pieces == generate(model, tok, ["hello there", "a b"], max_new_tokens=10, batch_size=2)
    assert all(len(tok(t, add_special_tokens=False).input_ids) >= 5 for t in pieces)  # nothing cut short
