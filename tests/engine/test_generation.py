"""Greedy generation and exact match: batching (left padding) must not change any answer."""

from preftune.generation import exact_match, generate
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
