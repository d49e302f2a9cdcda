"""Generation on the device: preftune's greedy generation (rows that stop leave the batch and its KV
cache) gives the text of one plain ``generate`` call and of one prompt at a time; sampling runs there,
is reproducible under a seed and writes tokens of the vocabulary."""

from __future__ import annotations

import pytest
import torch

from preftune.generation import generate
from preftune.models import load_causal_lm

pytestmark = pytest.mark.gpu

PROMPTS = [
    [{"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "user", "content": "A much longer question about the sum of seventeen and twenty-five?"}],
    [{"role": "user", "content": "Seven?"}],
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir, device):
    model, tok = load_causal_lm(str(tiny_model_dir))
    return model.to(device).eval(), tok


def _one_call(model, tok, prompts, max_new_tokens, **kwargs) -> list[str]:
    from preftune.data import add_special_tokens_for
    from preftune.generation import prompt_text

    tok.padding_side = "left"
    texts = [prompt_text(p, tok) for p in prompts]
    special = add_special_tokens_for(tok, conversational=True, chat_template=None)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(model.device)
    out = model.generate(
        input_ids=enc["input_ids"],  # not token_type_ids, which some tokenizers add and older
        attention_mask=enc["attention_mask"],  # transformers' generate refuses
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_generation_on_the_device(model_and_tokenizer):
    model, tok = model_and_tokenizer
    batched = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert batched == _one_call(model, tok, PROMPTS, 24, do_sample=False)
    assert all(isinstance(t, str) for t in batched) and any(batched)


def test_greedy_generation_in_bf16_on_the_device(tiny_model_dir, device):
    model, tok = load_causal_lm(str(tiny_model_dir), dtype=torch.bfloat16)
    model = model.to(device).eval()
    out = generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=2)
    assert len(out) == len(PROMPTS) and all(isinstance(t, str) for t in out)


def test_sampled_generation_is_reproducible_under_a_seed(model_and_tokenizer):
    model, tok = model_and_tokenizer
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(_one_call(model, tok, PROMPTS, 24, do_sample=True, temperature=1.0, top_k=0, top_p=1.0))
    assert runs[0] == runs[1]
    torch.manual_seed(11)
    enc = tok(["Hello"], return_tensors="pt").to(model.device)
    ids = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=32,
        do_sample=True,
        top_k=0,
        pad_token_id=tok.pad_token_id,
    )
    assert ids.shape[1] > enc["input_ids"].shape[1]
    assert int(ids.min()) >= 0 and int(ids.max()) < model.config.vocab_size
