"""Greedy generation, sampling and answer matching, as ``preftune eval --prompts``, the demo and
``preftune iterate`` use them.

Generation is batched decoding (left padding, KV cache), each row stopping at EOS, or as soon as
its new text matches ``stop_when`` (e.g. :data:`ANSWER_STATED` for the arithmetic data). Rows that
have stopped leave the batch, with their part of the KV cache, every :data:`LOOK_EVERY` new
tokens, so the rows still writing do not carry them to the longest one's end: the text is the same
as one ``model.generate`` call over the whole batch.

:func:`generate` is greedy. :func:`sample_batch` draws ``k`` samples per prompt (temperature,
top-p) from a seeded ``torch.Generator``: each prompt is prefilled once and its KV cache expanded
to its ``k`` rows (not ``k`` prefills), then :mod:`preftune.decoding`'s loop writes every row one
token per forward pass into a preallocated cache, rows leaving the batch as they stop. The same
prompts, ``k``, settings and generator seed give the same samples, whenever rows leave; at
temperature 0 every sample is the greedy text.
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
    from .data import add_special_tokens_for
    from .progress import bar as progress_bar

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
    # one tick per prompt as its row stops (not per batch: a batch can take minutes on a busy CPU)
    bar = progress_bar(total=len(texts), desc="generate", unit="prompt", enabled=progress)
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            outputs += _greedy_batch(model, tokenizer, enc, max_new_tokens, stop_when, on_done=bar.update)
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _greedy_batch(
    model, tokenizer, enc, max_new_tokens: int, stop_when: re.Pattern | None, on_done=None
) -> list[str]:
    """The new greedy text of each row of one left-padded batch ``enc`` (see :func:`_decode`)."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return _decode(model, tokenizer, ids, mask, ids.shape[1], max_new_tokens, stop_when, on_done=on_done)


def _decode(
    model,
    tokenizer,
    ids,
    mask,
    start: int,
    max_new_tokens: int,
    stop_when: re.Pattern | None,
    *,
    cache=None,
    processor=None,
    on_done=None,
) -> list[str]:
    """The new text (after column ``start``) of each row of the left-padded batch ``ids``.

    ``model.generate`` is called for :data:`LOOK_EVERY` tokens at a time, continuing from its own
    KV cache; between two calls the rows that have stopped (EOS, ``stop_when``) are taken out of the
    batch and of the cache. Rows write independently of each other, so a cache that cannot drop
    rows (state-space layers, for one) keeps them: their text was taken when they stopped, and what
    they write afterwards is ignored. A static cache (``generation_config.cache_implementation``)
    runs the whole batch in one call.

    ``cache`` = (generate's name for it, the cache) continues a KV cache of every position of
    ``ids`` but the last (as generate leaves it); ``ids[:, start:]`` are then new tokens already
    written, counted in ``max_new_tokens``.
    ``processor`` (a logits processor) picks each next token (sampling); without it, greedy.
    ``on_done(1)`` is called as each row's text is taken."""
    common = dict(
        do_sample=False,
        use_cache=True,  # KV cache: each new token costs one position, not the whole prefix
        eos_token_id=tokenizer.eos_token_id,  # rows stop at EOS (finished rows are padded)
        pad_token_id=tokenizer.pad_token_id,
    )
    if processor is not None:
        from transformers import LogitsProcessorList

        common["logits_processor"] = LogitsProcessorList([processor])
    if stop_when is not None:
        common["stopping_criteria"] = _text_stops(tokenizer, stop_when, start)
    eos = tokenizer.eos_token_id
    left = max_new_tokens - (ids.shape[1] - start)
    if getattr(model.generation_config, "cache_implementation", None) not in (None, "dynamic"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(left, 0), **common)
        if on_done is not None:
            on_done(ids.shape[0])
        return _texts(tokenizer, out[:, start:], eos)
    texts: list[str | None] = [None] * ids.shape[0]
    alive = torch.arange(ids.shape[0], device=ids.device)  # the batch rows still in the batch
    given: dict = {} if cache is None else {cache[0]: cache[1]}
    name = next(iter(given), None)
    while True:
        asked = min(LOOK_EVERY, left)
        if asked > 0:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=asked,
                return_dict_in_generate=True,
                **given,
                **common,
            )
            seqs = out.sequences
            name = "cache" if "cache" in out.keys() else "past_key_values"
            given = {name: out[name]}
        else:  # nothing left to write (max_new_tokens reached by the tokens given)
            seqs = ids
        got = seqs.shape[1] - ids.shape[1]
        left -= got
        new = seqs[:, start:]
        decoded = _texts(tokenizer, new, eos)
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
                if on_done is not None:
                    on_done(1)
        if all(t is not None for t in texts):
            return texts  # type: ignore[return-value]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], got)], dim=1)  # what a row wrote is real
        keep = torch.nonzero(~stopped).flatten()
        if len(keep) < len(alive) and name is not None and _can_drop_rows(given[name]):
            given[name].batch_select_indices(keep)
            alive, ids, mask = alive[keep], seqs[keep], mask[keep]
        else:
            ids = seqs


def _texts(tokenizer, new, eos) -> list[str]:
    """Each row's new tokens decoded up to its first EOS (what follows it is padding, or, for a row
    whose first token came from a shared prefill, writing that generate did not know had ended)."""
    if eos is None:
        return tokenizer.batch_decode(new, skip_special_tokens=True)
    rows = []
    for row in new.tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


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


class _Sampler:
    """A logits processor that draws each row's next token (temperature, top-p) from ``generator``
    (:func:`preftune.decoding.draw`) and leaves only that token possible, so that generate's
    greedy pick takes it: sampling through ``model.generate`` for caches that the decoding loop
    does not take. At temperature 0 the draw is the argmax: the greedy token."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        from .decoding import draw

        u = None
        if self.temperature > 0:
            u = torch.rand(len(scores), generator=self.generator, dtype=torch.float64, device=scores.device)
        return draw(scores, u, self.temperature, self.top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.draw(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None], 0.0)


def prompt_encodings(tokenizer, prompts: list, chat_template: str | None = None, device=None):
    """The left-padded batch of ``prompts`` as generation sees them (chat messages rendered with the
    generation prompt; special tokens added as in training)."""
    from .data import add_special_tokens_for

    texts = [prompt_text(p, tokenizer, chat_template) for p in prompts]
    special = add_special_tokens_for(
        tokenizer, conversational=not isinstance(prompts[0], str), chat_template=chat_template
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
    finally:
        tokenizer.padding_side = side
    return enc.to(device) if device is not None else enc


@torch.no_grad()
def sample_batch(
    model,
    tokenizer,
    prompts: list,
    *,
    k: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    chat_template: str | None = None,
    stop_when: re.Pattern | None = None,
    on_done=None,
) -> list[list[str]]:
    """``k`` sampled completions of each prompt (text, or chat messages), as ``[prompt][sample]``.

    One forward pass prefills the prompts; each prompt's KV cache is then expanded to its ``k``
    rows and its first token drawn from the prefill's last logits; from there the rows decode one
    token per step (:func:`preftune.decoding.decode_samples`; rows leave the batch as they stop),
    each next token drawn with a uniform number per row and step from ``generator`` (on the model's
    device). Rows are in prompt order, samples of a prompt adjacent.
    ``on_done(1)`` is called as each sample ends."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    sampler = _Sampler(temperature, top_p, generator)
    was_training = model.training
    model.eval()
    try:
        enc = prompt_encodings(tokenizer, prompts, chat_template, device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        static = getattr(model.generation_config, "cache_implementation", None) not in (None, "dynamic")
        if static or max_new_tokens < 1:  # a static cache cannot be expanded: k rows per prompt, one call
            texts = _sample_copies(
                model, tokenizer, ids, mask, k, sampler, max_new_tokens, stop_when, on_done
            )
        else:
            with torch.inference_mode():
                texts = _sample_prefilled(
                    model, tokenizer, ids, mask, k, sampler, max_new_tokens, stop_when, on_done
                )
    finally:
        model.train(was_training)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def _sample_copies(model, tokenizer, ids, mask, k, sampler, max_new_tokens, stop_when, on_done):
    """The k samples of each prompt from k copies of it, prefilled together: for caches that cannot
    be expanded after one prefill (static caches, state-space or linear-attention states)."""
    start = ids.shape[1]
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    return _decode(
        model, tokenizer, ids, mask, start, max_new_tokens, stop_when, processor=sampler, on_done=on_done
    )


def _sample_prefilled(model, tokenizer, ids, mask, k, sampler, max_new_tokens, stop_when, on_done):
    """One prefill of the prompts, then their k samples each: by :mod:`preftune.decoding`'s loop
    (preallocated cache) where every cache layer is full attention, else by :func:`_decode`
    continuing the expanded cache (sliding-window layers), else (state-space or linear-attention
    states, which do not expand) by :func:`_decode` over k copies of each prompt."""
    from .decoding import decode_samples, fast_path_cache, forward_accepts

    start = ids.shape[1]
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    last_only = forward_accepts(model, "logits_to_keep")  # the prefill's last logits, not [B, T, V]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **({"logits_to_keep": 1} if last_only else {}),
    )
    name = "cache" if "cache" in out.keys() else "past_key_values"
    cache = out[name]
    if fast_path_cache(cache):
        return decode_samples(
            model,
            tokenizer,
            out,
            cache,
            mask,
            k=k,
            generator=sampler.generator,
            temperature=sampler.temperature,
            top_p=sampler.top_p,
            max_new_tokens=max_new_tokens,
            stop_when=stop_when,
            on_done=on_done,
        )
    if not _can_drop_rows(cache):  # state-space or linear-attention states: k rows per prompt
        del out, cache
        return _sample_copies(model, tokenizer, ids, mask, k, sampler, max_new_tokens, stop_when, on_done)
    cache.batch_repeat_interleave(k)  # each prompt's keys and values, once per sample
    first = sampler.draw(out.logits[:, -1, :].repeat_interleave(k, 0))
    ids = torch.cat([ids.repeat_interleave(k, 0), first[:, None]], dim=1)
    mask = torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(len(first), 1)], dim=1)
    del out
    return _decode(
        model,
        tokenizer,
        ids,
        mask,
        start,
        max_new_tokens,
        stop_when,
        cache=(name, cache),
        processor=sampler,
        on_done=on_done,
    )


def exact_match(model, tokenizer, items: list[dict], **kwargs) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy "The answer is N" equals ``item["answer"]`` (numeric mode)."""
    return answer_match(model, tokenizer, items, mode="numeric", **kwargs)


def answer_details(items: list[dict], outputs: list[str], mode: str) -> list[dict]:
    """Per item its prompt, answer, prediction, verdict under ``mode`` and the full output (and
    ``item["row"]`` if it has one): :func:`answer_match`'s details, of outputs generated already."""
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
    return details


def answer_match(
    model, tokenizer, items: list[dict], *, mode: str = "contains", **kwargs
) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy output matches ``item["answer"]`` under ``mode``, and per item
    its prompt, answer, prediction, verdict and the full output (and ``item["row"]`` if it has one)."""
    if mode not in MATCH_MODES:
        raise ValueError(f"match mode must be one of {', '.join(MATCH_MODES)}, got {mode!r}")
    outputs = generate(model, tokenizer, [it["prompt"] for it in items], **kwargs)
    details = answer_details(items, outputs, mode)
    score = sum(d["correct"] for d in details) / max(1, len(details))
    return score, details
