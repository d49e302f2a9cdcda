"""Greedy generation and exact-match scoring, as ``preftune eval --prompts`` and the demo use them."""

from __future__ import annotations

import torch


def prompt_text(prompt, tokenizer, chat_template: str | None = None) -> str:
    """The prompt as the model sees it in training: chat messages rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    from .data import UnpairedExample, render_unpaired

    placeholder = [{"role": "assistant", "content": "."}]
    text, _ = render_unpaired(
        UnpairedExample(prompt, placeholder, True, 0), tokenizer, chat_template=chat_template
    )
    return text


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy completions for prompts (text, or chat messages rendered with the model's template)."""
    from tqdm.auto import tqdm

    from .data import add_special_tokens_for

    texts = [prompt_text(p, tokenizer, chat_template) for p in prompts]
    special = (
        add_special_tokens_for(
            tokenizer, conversational=not isinstance(prompts[0], str), chat_template=chat_template
        )
        if prompts
        else False
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outputs = []
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model, tokenizer, items: list[dict], **kwargs) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy answer equals ``item["answer"]``, and the per-item details."""
    from .data.arithmetic import extract_answer

    outputs = generate(model, tokenizer, [it["prompt"] for it in items], **kwargs)
    details = []
    for it, text in zip(items, outputs):
        got = extract_answer(text)
        details.append(
            {"answer": it["answer"], "predicted": got, "correct": got == it["answer"], "output": text}
        )
    score = sum(d["correct"] for d in details) / max(1, len(details))
    return score, details
