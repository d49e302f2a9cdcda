"""generation.sample_batch: k samples per prompt from one prefill, seeded, greedy at temperature 0."""

import pytest
import torch

from preftune import generation
from preftune.generation import generate, sample_batch
from preftune.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    for c in (model.config, model.generation_config):
        c.pad_token_id, c.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, tok


PROMPTS = [[{"role": "user", "content": "What is 3 plus 4?" * (i + 1)}] for i in range(4)]


def test_temperature_zero_is_greedy(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    monkeypatch.setattr(generation, "LOOK_EVERY", 3)  # rows leave the batch mid-way
    greedy = generate(model, tok, PROMPTS, max_new_tokens=12)
    sampled = sample_batch(
        model, tok, PROMPTS, k=3, generator=torch.Generator().manual_seed(0), temperature=0, max_new_tokens=12
    )
    assert sampled == [[g] * 3 for g in greedy]


def test_seeded_and_prefilled_once(model_and_tokenizer):
    model, tok = model_and_tokenizer
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        a = sample_batch(
            model, tok, PROMPTS, k=4, generator=torch.Generator().manual_seed(7), max_new_tokens=10
        )
    finally:
        hook.remove()
    b = sample_batch(model, tok, PROMPTS, k=4, generator=torch.Generator().manual_seed(7), max_new_tokens=10)
    c = sample_batch(model, tok, PROMPTS, k=4, generator=torch.Generator().manual_seed(8), max_new_tokens=10)
    assert a == b and a != c
    assert len(a) == 4 and all(len(g) == 4 for g in a)
    assert len({t for g in a for t in g}) > 4  # the samples of a prompt differ
    longest = max(shapes, key=lambda s: s[1])
    assert longest[0] == len(PROMPTS)  # the prompt pass: one row per prompt, not per sample
    assert sum(1 for s in shapes if s[1] > 1) == 1  # and only one such pass
    assert all(s[1] == 1 and s[0] <= 16 for s in shapes if s != longest)  # then one token per row


def test_top_p_keeps_the_nucleus():
    sampler = generation._Sampler(1.0, 0.5, torch.Generator().manual_seed(0))
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.35, 0.45]]))
    draws = torch.stack([sampler.draw(scores) for _ in range(50)])
    assert set(draws[:, 0].tolist()) == {0}  # 0.6 alone reaches 0.5
    assert set(draws[:, 1].tolist()) == {1, 2}  # 0.45 + 0.35


def test_progress_ticks_per_prompt(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    ticks = []
    enc = generation.prompt_encodings(tok, PROMPTS)
    generation._greedy_batch(model, tok, enc, 6, None, on_done=ticks.append)
    assert sum(ticks) == len(PROMPTS)
