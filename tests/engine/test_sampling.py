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


def test_samples_do_not_depend_on_when_rows_leave_the_batch(model_and_tokenizer, monkeypatch):
    """Each row draws from its own uniform of each step, so dropping the rows done at once, or
    never, gives the same samples; and dropping them shrinks the batch."""
    from preftune import decoding

    model, tok = model_and_tokenizer
    stop = __import__("re").compile("a")  # rows stop at different steps
    runs, rows = {}, {}
    for name, rule in {"now": lambda d, w, s: d > 0, "never": lambda d, w, s: False}.items():
        monkeypatch.setattr(decoding, "_worth_compacting", rule)
        seen = []
        hook = model.register_forward_pre_hook(
            lambda m, a, kw, seen=seen: seen.append(kw["input_ids"].shape[0]), with_kwargs=True
        )
        try:
            runs[name] = sample_batch(
                model,
                tok,
                PROMPTS,
                k=4,
                generator=torch.Generator().manual_seed(3),
                max_new_tokens=12,
                stop_when=stop,
            )
        finally:
            hook.remove()
        rows[name] = seen
    assert runs["now"] == runs["never"]
    assert min(rows["now"]) < 16 and set(rows["never"][1:]) == {16}  # rows left the batch, or did not
    assert any(len(tok(t, add_special_tokens=False).input_ids) < 12 for g in runs["now"] for t in g)


@pytest.mark.parametrize("architecture", ["qwen3", "gemma3_text", "falcon_h1"])
def test_every_cache_kind_samples_greedy_at_temperature_zero_and_seeded(architecture):
    """Full-attention caches take the preallocated loop; sliding-window (gemma3) and state-space
    (falcon_h1) layers decode through generate: both give the greedy text at temperature 0 and the
    same samples for the same seed."""
    from preftune import decoding

    from .test_architectures import build

    tok = tiny_tokenizer(vocab_size=300, chat_template=None)
    model = build(
        architecture, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    prompts = ["def f(x):", "The sum of two numbers", "import os"]
    cache = model(**tok(prompts[:1], return_tensors="pt"), use_cache=True)
    fast = decoding.fast_path_cache(cache["cache"] if "cache" in cache.keys() else cache["past_key_values"])
    assert fast == (architecture == "qwen3")
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert sample_batch(model, tok, prompts, k=2, generator=g(0), temperature=0, max_new_tokens=8) == [
        [t] * 2 for t in greedy
    ]
    a = sample_batch(model, tok, prompts, k=3, generator=g(5), max_new_tokens=8)
    assert a == sample_batch(model, tok, prompts, k=3, generator=g(5), max_new_tokens=8)
    assert a != sample_batch(model, tok, prompts, k=3, generator=g(6), max_new_tokens=8)


def test_the_nucleus_among_candidates_is_the_nucleus_of_the_whole_vocabulary(monkeypatch):
    """top_p < 1 looks among the NUCLEUS_CANDIDATES most probable tokens first; a row whose
    candidates fall short of top_p sorts its whole vocabulary: the same token for the same uniform."""
    from preftune import decoding

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * torch.tensor([[0.1], [3.0], [0.5], [8.0], [1.0], [0.2]])
    u = torch.rand(200, 6, generator=g, dtype=torch.float64)
    monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", 10**6)
    whole = torch.stack([decoding.draw(logits, x, 1.3, 0.7) for x in u])
    monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", 4)
    assert torch.equal(torch.stack([decoding.draw(logits, x, 1.3, 0.7) for x in u]), whole)
    probs = (logits / 1.3).softmax(-1)
    for row in range(6):  # every drawn token is in the row's nucleus, and the nucleus is reached
        order = probs[row].argsort(descending=True)
        before = probs[row][order].cumsum(0) - probs[row][order]
        nucleus = set(order[before < 0.7].tolist())
        assert set(whole[:, row].tolist()) <= nucleus
    assert len(set(whole[:, 0].tolist())) > 4  # a flat row's nucleus is wider than the candidates


def test_inverse_cdf_draws_only_tokens_of_positive_weight_in_proportion():
    from preftune import decoding

    g = torch.Generator().manual_seed(1)
    for width in (3, 255, 256, 700):
        w = torch.rand(8, width, generator=g) ** 3
        w[:, ::2] = 0
        u = torch.rand(8, generator=g, dtype=torch.float64)
        cdf = w.double().cumsum(-1)
        direct = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        assert torch.equal(decoding._inverse_cdf(w, u), direct)
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    ends = [decoding._inverse_cdf(w, torch.tensor([x], dtype=torch.float64)).item() for x in (0.0, 1 - 1e-16)]
    assert ends == [1, 3]  # never the zero-weight tokens at either end
    w = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(100_000, 4)
    freq = torch.bincount(
        decoding._inverse_cdf(w, torch.rand(100_000, generator=g, dtype=torch.float64)), minlength=4
    )
    assert torch.allclose(freq / 100_000, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01)
