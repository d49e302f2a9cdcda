"""Chunked scoring must equal the straightforward full-logit computation, values and gradients."""

import math

import pytest
import torch

from preftune.data.collate import collate_sequences
from preftune.scoring import score_batch, score_dataset, token_logps
from preftune.testing import tiny_llama


def naive_scores(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = completion_mask[:, 1:].float()
    ent = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return (tok * mask).sum(1), (ent * mask).sum(1) / mask.sum(1)


def random_batch(vocab, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(n):
        lp, lc = torch.randint(1, 9, (2,), generator=g).tolist()
        prompts.append(torch.randint(0, vocab, (lp,), generator=g).tolist())
        comps.append(torch.randint(0, vocab, (lc,), generator=g).tolist())
    return prompts, comps


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_chunked_equals_full_logits(chunk):
    model = tiny_llama(300, seed=3).eval()
    prompts, comps = random_batch(300)
    batch = collate_sequences(prompts, comps, pad_token_id=0)
    want_logps, want_ent = naive_scores(model, **batch)
    got = score_batch(model, **batch, chunk_tokens=chunk, with_entropy=True)
    torch.testing.assert_close(got.logps, want_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want_ent, atol=1e-5, rtol=1e-5)
    assert got.n_tokens.tolist() == [len(c) for c in comps]


def test_chunked_gradients_equal_full_logit_gradients():
    prompts, comps = random_batch(300, seed=1)
    batch = collate_sequences(prompts, comps, pad_token_id=0)
    weights = torch.linspace(-1, 1, len(prompts))
    grads = []
    for path in ("naive", "chunked"):
        model = tiny_llama(300, seed=5)
        if path == "naive":
            logps, _ = naive_scores(model, **batch)
        else:
            logps = score_batch(model, **batch, chunk_tokens=3).logps
        (logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_and_prompt_tokens_do_not_count():
    model = tiny_llama(300, seed=2).eval()
    prompts, comps = random_batch(300, seed=4, n=3)
    alone = [score_batch(model, **collate_sequences([p], [c], 0)).logps for p, c in zip(prompts, comps)]
    together = score_batch(model, **collate_sequences(prompts, comps, 0)).logps
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_score_dataset_restores_original_order():
    model = tiny_llama(300, seed=2)
    prompts, comps = random_batch(300, seed=9, n=11)
    model.train()
    got = score_dataset(model, prompts, comps, pad_token_id=0, batch_tokens=40, with_entropy=True)
    assert model.training, "score_dataset must restore the model's training mode"
    for i in range(11):
        one = score_batch(model.eval(), **collate_sequences([prompts[i]], [comps[i]], 0), with_entropy=True)
        assert got.logps[i].item() == pytest.approx(one.logps.item(), abs=1e-5)
        assert got.entropy[i].item() == pytest.approx(one.entropy.item(), abs=1e-5)


def test_non_causal_lm_is_rejected():
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    with pytest.raises(ValueError, match="causal language model"):
        score_batch(bert, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3))


# --------------------------------------------------------------------------------------------------
# The fused head (one reusable logits tile, hand-written backward) against the straightforward
# full-logit computation: values and gradients of hidden states, weight and bias.


def naive_token_logps(hidden, targets, head, softcap=None, scale=None):
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def _head_case(seed=0, n=23, hidden=16, vocab=97, bias=False):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    h = torch.randn(n, hidden, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.randn(n, generator=g)  # an arbitrary upstream gradient
    return head, h, targets, weights


def _grads(fn, head, h, targets, weights):
    head.zero_grad(set_to_none=True)
    x = h.clone().requires_grad_(True)
    logps = fn(x, targets, head)
    (logps * weights).sum().backward()
    grads = {"hidden": x.grad, "weight": head.weight.grad}
    if getattr(head, "bias", None) is not None:
        grads["bias"] = head.bias.grad
    return logps.detach(), grads


@pytest.mark.parametrize("chunk", [1, 5, 23, 0])
@pytest.mark.parametrize(("softcap", "scale"), [(None, None), (3.0, None), (None, 0.125), (3.0, 2.5)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_matches_full_logits(chunk, softcap, scale, bias):
    head, h, targets, weights = _head_case(bias=bias)
    want, want_grads = _grads(
        lambda x, t, m: naive_token_logps(x, t, m, softcap, scale), head, h, targets, weights
    )
    for fused in (True, False):
        got, got_grads = _grads(
            lambda x, t, m, fused=fused: token_logps(
                x, t, m, softcap=softcap, chunk_tokens=chunk, fused=fused, scale=scale
            )[0],
            head,
            h,
            targets,
            weights,
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_head_entropy_matches_full_logits():
    head, h, targets, _ = _head_case(seed=1, vocab=61)
    logits = head(h).float()
    logp = torch.log_softmax(logits, -1)
    want = -(logp.exp() * logp).sum(-1) / math.log(61)
    for fused in (True, False):
        logps, ent = token_logps(h, targets, head, chunk_tokens=4, with_entropy=True, fused=fused)
        torch.testing.assert_close(ent, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logps, logp.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)


def test_fused_head_with_frozen_weight_gives_only_hidden_gradients():
    head, h, targets, weights = _head_case(seed=2)
    _, want = _grads(lambda x, t, m: naive_token_logps(x, t, m), head, h, targets, weights)
    head.weight.requires_grad_(False)
    _, got = _grads(lambda x, t, m: token_logps(x, t, m, chunk_tokens=4)[0], head, h, targets, weights)
    assert got["weight"] is None
    torch.testing.assert_close(got["hidden"], want["hidden"], atol=1e-5, rtol=1e-5)


def test_fused_head_under_bf16_autocast_matches_the_autocast_path():
    """Under autocast the product is rounded to bf16 as head(hidden).float() rounds it."""
    head, h, targets, weights = _head_case(seed=3, n=17, hidden=32, vocab=200)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(
                _grads(
                    lambda x, t, m, fused=fused: token_logps(x, t, m, chunk_tokens=6, fused=fused)[0],
                    head,
                    h,
                    targets,
                    weights,
                )
            )
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=2e-2, rtol=2e-2, msg=name)


def test_non_linear_heads_take_the_checkpointed_path():
    class Scaled(torch.nn.Module):  # e.g. a head with an adapter: not a plain nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight

        def forward(self, x):
            return self.inner(x) * 0.5

    head, h, targets, weights = _head_case(seed=4)
    scaled = Scaled(head)
    want, want_grads = _grads(lambda x, t, m: naive_token_logps(x, t, m), scaled, h, targets, weights)
    got, got_grads = _grads(
        lambda x, t, m: token_logps(x, t, m, chunk_tokens=5)[0], scaled, h, targets, weights
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads["hidden"], want_grads["hidden"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Prompt-prefix sharing: one row per pair (prompt | chosen | rejected), same scores and gradients.


def random_pairs(vocab, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lp, lc, lr = torch.randint(1, 9, (3,), generator=g).tolist()
        out.append(tuple(torch.randint(0, vocab, (k,), generator=g).tolist() for k in (lp, lc, lr)))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_pairs_equal_separate_rows(attn):
    from preftune.data.collate import collate_pairs, collate_shared_prompt_pairs

    pairs = random_pairs(300, seed=6, n=5)
    prompts, chosen, rejected = (list(x) for x in zip(*pairs))

    class Example:
        def __init__(self, p, c, r):
            self.prompt_ids, self.chosen_ids, self.rejected_ids = p, c, r

    weights = torch.linspace(-1, 1, 2 * len(pairs))
    results = []
    for batch in (
        collate_pairs([Example(*x) for x in pairs], pad_token_id=0),
        collate_shared_prompt_pairs(prompts, chosen, rejected, pad_token_id=0),
    ):
        model = tiny_llama(300, seed=7)
        model.config._attn_implementation = attn
        scores = score_batch(model, **batch, chunk_tokens=4)
        (scores.logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((scores, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-5)
    assert got.n_tokens.tolist() == want.n_tokens.tolist()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_pairs_entropy_equals_separate_rows():
    from preftune.data.collate import collate_sequences, collate_shared_prompt_pairs

    pairs = random_pairs(300, seed=8, n=3)
    prompts, chosen, rejected = (list(x) for x in zip(*pairs))
    model = tiny_llama(300, seed=9).eval()
    want = score_batch(model, **collate_sequences(prompts * 2, chosen + rejected, 0), with_entropy=True)
    got = score_batch(model, **collate_shared_prompt_pairs(prompts, chosen, rejected, 0), with_entropy=True)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)
