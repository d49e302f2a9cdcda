"""Greedy generation and answer matching, as ``preftune eval --prompts`` and the demo use them.

Generation is batched greedy decoding (left padding, KV cache), each row stopping at EOS, or as
soon as its new text matches ``stop_when`` (e.g. :data:`ANSWER_STATED` for the arithmetic data).
Rows that have stopped leave the batch, with their part of the KV cache, every
:data:`LOOK_EVERY` new tokens, so the rows still writing do not carry them to the longest one's
end: the text is the same as one ``model.generate`` call over the whole batch.
Answers are checked by one of :data:`MATCH_MODES`:

* ``exact``: the normalised output equals the normalised answer (lower case, punctuation, articles
  and extra spaces removed; SQuAD-style);
* ``contains`` (default): the normalised answer appears in the normalised output as whole words
  ("Paris" in "The capital of France is Paris.");
* ``regex``: the answer is a regular expression searched in the output (case-insensitive);
* ``numeric``: the integer of the output's last "The answer is N" equals the answer (the bundled
  arithmetic data's format).
"""

from __future__ import annotations

import re
import string

import torch

from .config import MATCH_MODES  # also the choices of the generation_match key

_ARTICLES = re.compile(r"\b(a|an|the)\b")

# New tokens between two looks for rows that have stopped (which then leave the batch).
LOOK_EVERY = 8

# A row has stated its final answer: "The answer is N." (N an integer; "2.5." does not count).
ANSWER_STATED = re.compile(r"answer is\s*:?\s*\**\s*\$?\s*-?\d[\d,]*\s*\**\s*\.(?!\d)", re.IGNORECASE)


def normalize_answer(text) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_prediction(output: str, mode: str):
    """What the output states as its answer under ``mode`` (the whole normalised text, or N)."""
    if mode == "numeric":
        from .data.arithmetic import extract_answer

        return extract_answer(output)
    return normalize_answer(output) if mode in ("exact", "contains") else output.strip()


def answer_matches(output: str, answer, mode: str = "contains") -> bool:
    """Whether ``output`` gives ``answer`` under ``mode`` (see the module docstring)."""
    if mode not in MATCH_MODES:
        raise ValueError(f"match mode must be one of {', '.join(MATCH_MODES)}, got {mode!r}")
    if mode == "numeric":
        from .data.arithmetic import extract_answer

        try:
            return extract_answer(output) == int(answer)
        except (TypeError, ValueError):
            return False
    if mode == "regex":
        return re.search(str(answer), output, flags=re.IGNORECASE) is not None
    got, want = normalize_answer(output), normalize_answer(answer)
    if mode == "exact":
        return got == want
    return bool(want) and f" {want} " in f" {got} "


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
    stop_when: re.Pattern | None = None,
) -> list[str]:
    """Greedy completions for prompts (text, or chat messages rendered with the model's template).

    With ``stop_when``, a row stops once its new text matches the pattern (the others go on): the
    text up to that point is exactly what it would have been without stopping."""
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
            outputs += _greedy_batch(model, tokenizer, enc, max_new_tokens, stop_when)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _greedy_batch(model, tokenizer, enc, max_new_tokens: int, stop_when: re.Pattern | None) -> list[str]:
    """The new text of each row of one left-padded batch ``enc``.

    ``model.generate`` is called for :data:`LOOK_EVERY` tokens at a time, continuing from its own
    KV cache; between two calls the rows that have stopped (EOS, ``stop_when``) are taken out of the
    batch and of the cache. Rows write independently of each other, so a cache that cannot drop
    rows (state-space layers, for one) keeps them: their text was taken when they stopped, and what
    they write afterwards is ignored. A static cache (``generation_config.cache_implementation``)
    runs the whole batch in one call."""
    start = enc["input_ids"].shape[1]
    common = dict(
        do_sample=False,
        use_cache=True,  # KV cache: each new token costs one position, not the whole prefix
        eos_token_id=tokenizer.eos_token_id,  # rows stop at EOS (finished rows are padded)
        pad_token_id=tokenizer.pad_token_id,
    )
    if stop_when is not None:
        common["stopping_criteria"] = _text_stops(tokenizer, stop_when, start)
    if getattr(model.generation_config, "cache_implementation", None) not in (None, "dynamic"):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **common)
        return tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    texts: list[str | None] = [None] * ids.shape[0]
    alive = torch.arange(ids.shape[0], device=ids.device)  # the batch rows still in the batch
    cache: dict = {}  # ``cache=`` (transformers 5) or ``past_key_values=`` (4.x), as generate returned it
    left = max_new_tokens
    while True:
        asked = min(LOOK_EVERY, left)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=asked,
            return_dict_in_generate=True,
            **cache,
            **common,
        )
        seqs = out.sequences
        name = "cache" if "cache" in out.keys() else "past_key_values"
        cache = {name: out[name]}
        got = seqs.shape[1] - ids.shape[1]
        left -= got
        new = seqs[:, start:]
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        eos = tokenizer.eos_token_id
        stopped = (
            (new == eos).any(1)
            if eos is not None
            else torch.zeros(len(new), dtype=torch.bool, device=new.device)
        )
        if stop_when is not None:
            stopped |= torch.tensor([stop_when.search(t) is not None for t in decoded], device=new.device)
        if left <= 0 or got < asked:  # out of tokens, or generate saw every row stop
            stopped[:] = True
        for i in torch.nonzero(stopped).flatten().tolist():
            if texts[int(alive[i])] is None:
                texts[int(alive[i])] = decoded[i]
        if all(t is not None for t in texts):
            return texts  # type: ignore[return-value]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], got)], dim=1)  # what a row wrote is real
        keep = torch.nonzero(~stopped).flatten()
        if len(keep) < len(alive) and _can_drop_rows(cache[name]):
            cache[name].batch_select_indices(keep)
            alive, ids, mask = alive[keep], seqs[keep], mask[keep]
        else:
            ids = seqs


def _can_drop_rows(cache) -> bool:
    """Whether ``cache.batch_select_indices`` drops rows from every layer: attention key/value
    layers only (full or sliding window), not state-space or linear-attention states."""
    layers = getattr(cache, "layers", None)
    return (
        bool(layers)
        and hasattr(cache, "batch_select_indices")
        and all(type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in layers)
    )


def _text_stops(tokenizer, pattern: re.Pattern, start: int):
    """``model.generate``'s stopping criteria: per row, whether its text after ``start`` matches."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TextStops(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([pattern.search(t) is not None for t in texts], device=input_ids.device)

    return StoppingCriteriaList([TextStops()])


def exact_match(model, tokenizer, items: list[dict], **kwargs) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy "The answer is N" equals ``item["answer"]`` (numeric mode)."""
    return answer_match(model, tokenizer, items, mode="numeric", **kwargs)


def answer_match(
    model, tokenizer, items: list[dict], *, mode: str = "contains", **kwargs
) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy output matches ``item["answer"]`` under ``mode``, and per item
    its prompt, answer, prediction, verdict and the full output (and ``item["row"]`` if it has one)."""
    if mode not in MATCH_MODES:
        raise ValueError(f"match mode must be one of {', '.join(MATCH_MODES)}, got {mode!r}")
    outputs = generate(model, tokenizer, [it["prompt"] for it in items], **kwargs)
    details = []
    for it, text in zip(items, outputs):
        details.append(
            {
                **({"row": it["row"]} if "row" in it else {}),  # where the prompt came from, when known
                "prompt": it["prompt"],
                "answer": it["answer"],
                "predicted": extract_prediction(text, mode),
                "correct": answer_matches(text, it["answer"], mode),
                "reached_answer_phrase": extract_prediction(text, "numeric") is not None,
                "output": text,
            }
        )
    score = sum(d["correct"] for d in details) / max(1, len(details))
    return score, details
