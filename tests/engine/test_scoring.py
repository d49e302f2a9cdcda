"""Chunked scoring must equal the straightforward full-logit computation, values and gradients."""

import math

import pytest
import torch

from preftune.scoring import collate_sequences, score_batch, score_dataset
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
