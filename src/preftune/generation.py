"""Greedy generation and answer matching, as ``preftune eval --prompts`` and the demo use them.

Generation is batched greedy decoding (left padding, KV cache), each row stopping at EOS, or as
soon as its new text matches ``stop_when`` (e.g. :data:`ANSWER_STATED` for the arithmetic data).
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
            stopping = {}
            if stop_when is not None:
                stopping["stopping_criteria"] = _text_stops(tokenizer, stop_when, enc["input_ids"].shape[1])
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # KV cache: each new token costs one position, not the whole prefix
                eos_token_id=tokenizer.eos_token_id,  # rows stop at EOS (finished rows are padded)
                pad_token_id=tokenizer.pad_token_id,
                **stopping,
            )
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


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
