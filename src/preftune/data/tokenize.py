"""Tokenizing rendered examples for one model, the way TRL 1.16's DPOTrainer does.

Per example (TRL ``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``):

1. Plain-text completions get the EOS token appended as text unless they already end with it.
2. The prompt and each prompt+completion are tokenized as whole strings (``add_special_tokens=True``
   for plain text, so the tokenizer adds BOS as configured; ``False`` for chat-template text, which
   carries its own special tokens).
3. The completion starts where the tokenized prompt and the tokenized prompt+completion diverge
   (usually the end of the prompt; earlier when tokens merge across the boundary), taking the
   smaller divergence point of chosen and rejected so both share one prompt.
4. ``keep_start`` truncation: prompt + completion is cut to ``max_length``; a prompt that alone fills
   ``max_length`` leaves no completion token and is an error (TRL silently drops such rows).

On top of TRL: a leading duplicated BOS (text that already starts with the BOS token, tokenized with
``add_special_tokens=True``) is collapsed to one, and a trailing duplicated EOS (tokenizers that append
EOS themselves) likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .formatting import add_special_tokens_for, render_example
from .records import DataError, Example, LoadedData, UnpairedExample
from .validation import RowProblem


@dataclass
class TokenizedExample:
    """Token ids of one preference pair for one tokenizer. ``row`` is the source row, ``prompt_text``
    the rendered prompt as this model sees it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    row: int | None = None
    prompt_text: str = ""


@dataclass
class TokenizedUnpaired:
    """Token ids of one unpaired (KTO-style) item for one tokenizer."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False
    label: bool | None = None
    row: int | None = None
    prompt_text: str = ""


@dataclass
class TokenizeReport:
    """``truncated``: examples with at least one completion cut to fit ``max_length``;
    ``skipped``: ``(row, field, reason)`` left out with ``on_error="skip"``; ``total``: examples in."""

    truncated: int = 0
    skipped: list[tuple[int | None, str | None, str]] = field(default_factory=list)
    total: int = 0

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)


# ------------------------------------------------------------------------------------------------ core


def _append_eos(text: str, tokenizer: Any, add_special_tokens: bool) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if add_special_tokens and eos and not text.endswith(eos):
        return text + eos
    return text


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return [list(ids) for ids in encoded]
    return [
        list(ids[1:]) if len(ids) > 1 and ids[0] == bos and ids[1] == bos else list(ids) for ids in encoded
    ]


# A text longer than this many characters per max_length token is tokenized only as far as the cut:
# its first max_length tokens do not depend on what follows (more tokens than needed are seen).
_CHARS_PER_TOKEN = 32
_MIN_CHARS = 1 << 14


def _encode_bounded(
    tokenizer: Any, texts: list[str], add_special_tokens: bool, max_length: int | None
) -> list[list[int]]:
    """:func:`_encode` of ``texts``, where a text far longer than ``max_length`` tokens is encoded from
    its first characters only (4x more each time, until they give more than ``max_length`` + 2
    tokens, or are the whole text): a 20 MB row costs what a few ``max_length`` rows cost, and keeps
    the same first ``max_length`` tokens (keep-start truncation never reads further)."""
    if max_length is None:
        return _encode(tokenizer, texts, add_special_tokens)
    cut = max(_MIN_CHARS, _CHARS_PER_TOKEN * max_length)
    encoded = _encode(tokenizer, [text[:cut] for text in texts], add_special_tokens)
    for i, text in enumerate(texts):
        limit = cut
        while len(text) > limit and len(encoded[i]) <= max_length + 2:
            limit *= 4
            encoded[i] = _encode(tokenizer, [text[:limit]], add_special_tokens)[0]
    return encoded


def _common_prefix_length(left: list[int], right: list[int]) -> int:
    length = 0
    for a, b in zip(left, right):
        if a != b:
            break
        length += 1
    return length


def _split_and_truncate(
    prompt_ids: list[int],
    full_ids: list[list[int]],
    fields: list[str],
    *,
    max_length: int | None,
    eos_id: int | None,
) -> tuple[list[int], list[list[int]], bool]:
    """Split each prompt+completion at the shared prompt and cut to ``max_length`` (keep the start)."""
    prompt_length = min(_common_prefix_length(prompt_ids, full) for full in full_ids)
    prompt_ids = prompt_ids[:prompt_length]
    completions = []
    for ids, name in zip(full_ids, fields):
        completion = ids[prompt_length:]
        if eos_id is not None and len(completion) >= 2 and completion[-1] == completion[-2] == eos_id:
            completion = completion[:-1]
        if not completion:
            raise RowProblem(name, "completion has no tokens after tokenization")
        completions.append(completion)
    truncated = False
    if max_length is not None:
        if prompt_length >= max_length:
            raise RowProblem(
                "prompt",
                f"prompt is {prompt_length} tokens, which leaves no completion token within "
                f"max_length={max_length}; raise max_length or shorten the prompt",
            )
        room = max_length - prompt_length
        truncated = any(len(completion) > room for completion in completions)
        completions = [completion[:room] for completion in completions]
    return prompt_ids, completions, truncated


def _tokenize_rows(
    prompts: list[str],
    completions: list[list[str]],
    fields: list[str],
    tokenizer: Any,
    *,
    max_length: int | None,
    add_special_tokens: bool,
) -> list[tuple[list[int], list[list[int]], bool] | RowProblem]:
    """Tokenize a batch; ``completions[k][i]`` is completion ``fields[k]`` of example ``i``."""
    completions = [
        [_append_eos(text, tokenizer, add_special_tokens) for text in slot] for slot in completions
    ]
    prompt_ids = _encode_bounded(tokenizer, prompts, add_special_tokens, max_length)
    full_ids = [
        _encode_bounded(tokenizer, [p + c for p, c in zip(prompts, slot)], add_special_tokens, max_length)
        for slot in completions
    ]
    eos_id = getattr(tokenizer, "eos_token_id", None) if add_special_tokens else None
    results: list[tuple[list[int], list[list[int]], bool] | RowProblem] = []
    for index, ids in enumerate(prompt_ids):
        try:
            results.append(
                _split_and_truncate(
                    ids, [slot[index] for slot in full_ids], fields, max_length=max_length, eos_id=eos_id
                )
            )
        except RowProblem as problem:
            results.append(problem)
    return results


def _raise_single(result, source: str | None, row: int | None):
    if isinstance(result, RowProblem):
        raise DataError(result.reason, source=source, row=row, field=result.field)
    return result


def tokenize_example(
    prompt_text: str,
    chosen_text: str,
    rejected_text: str,
    tokenizer: Any,
    *,
    max_length: int | None,
    add_special_tokens: bool,
    row: int | None = None,
    source: str | None = None,
) -> TokenizedExample:
    """Token ids of one rendered pair (see the module docstring for the exact rules).

    ``add_special_tokens``: ``True`` for plain text (BOS as the tokenizer adds it, EOS appended to each
    completion), ``False`` for chat-template text; :func:`~preftune.data.formatting.add_special_tokens_for`
    decides it. Raises :class:`DataError` (field ``'prompt'``) when the prompt leaves no completion token
    within ``max_length``; ``row``/``source`` only go into that message.
    """
    (result,) = _tokenize_rows(
        [prompt_text],
        [[chosen_text], [rejected_text]],
        ["chosen", "rejected"],
        tokenizer,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
    )
    prompt_ids, (chosen_ids, rejected_ids), truncated = _raise_single(result, source, row)
    return TokenizedExample(prompt_ids, chosen_ids, rejected_ids, truncated, row=row, prompt_text=prompt_text)


def tokenize_unpaired(
    prompt_text: str,
    completion_text: str,
    tokenizer: Any,
    *,
    max_length: int | None,
    add_special_tokens: bool,
    label: bool | None = None,
    row: int | None = None,
    source: str | None = None,
) -> TokenizedUnpaired:
    """Token ids of one rendered unpaired item; the same rules as :func:`tokenize_example`."""
    (result,) = _tokenize_rows(
        [prompt_text],
        [[completion_text]],
        ["completion"],
        tokenizer,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
    )
    prompt_ids, (completion_ids,), truncated = _raise_single(result, source, row)
    return TokenizedUnpaired(
        prompt_ids, completion_ids, truncated, label=label, row=row, prompt_text=prompt_text
    )


# --------------------------------------------------------------------------------------------- dataset


def _render_or_problem(example, tokenizer, chat_template, prompt_field: str):
    import jinja2

    try:
        return render_example(example, tokenizer, chat_template=chat_template)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        return RowProblem(prompt_field, f"the chat template failed on this conversation: {error}")


@dataclass(frozen=True)
class BatchSettings:
    """What :func:`tokenize_batch` needs besides the examples (picklable: sent to worker processes)."""

    tokenizer: Any
    chat_template: str | None
    slots: tuple[str, ...]  # ("chosen", "rejected") or ("completion",)
    add_special_tokens: bool
    max_length: int | None

    @property
    def unpaired(self) -> bool:
        return self.slots == ("completion",)


def batch_settings(
    loaded: LoadedData, tokenizer: Any, max_length: int | None, on_error: str, chat_template: str | None
) -> tuple[BatchSettings, dict[str, str]]:
    """Check the arguments, then the settings every batch of ``loaded`` is tokenized with, and each
    field's name in the user's data (for errors). Shared by :func:`tokenize_dataset` and
    :func:`~preftune.data.store.build_token_store`, so both tokenize alike."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    columns = loaded.columns
    unpaired = loaded.unpaired or any(isinstance(example, UnpairedExample) for example in loaded.examples[:1])
    user_names = {
        "prompt": columns.prompt,
        "chosen": columns.chosen,
        "rejected": columns.rejected,
        "completion": columns.completion,
    }
    add_special = add_special_tokens_for(
        tokenizer, conversational=loaded.conversational, chat_template=chat_template
    )
    slots = ("completion",) if unpaired else ("chosen", "rejected")
    return BatchSettings(tokenizer, chat_template, slots, add_special, max_length), user_names


def progress_bar(total: int, progress: bool):
    """The "Tokenizing" bar: shown with ``progress`` (plain lines when stderr is not a terminal)."""
    from ..progress import bar

    return bar(total=total, desc="Tokenizing", unit="ex", enabled=progress)


def tokenize_batch(batch, settings: BatchSettings):
    """Render and tokenize one batch of examples.

    Returns ``(problems, kept)``: ``problems`` lists ``(example, RowProblem)`` in the order they are
    reported (rendering problems first, then tokenization problems, each in row order); ``kept`` lists
    ``(example, prompt_text, prompt_ids, [completion_ids per slot], truncated)`` in input order.
    """
    problems = []
    rendered = []
    for example in batch:
        texts = _render_or_problem(example, settings.tokenizer, settings.chat_template, "prompt")
        if isinstance(texts, RowProblem):
            problems.append((example, texts))
        else:
            rendered.append((example, texts))
    results = _tokenize_rows(
        [texts[0] for _, texts in rendered],
        [[texts[1 + k] for _, texts in rendered] for k in range(len(settings.slots))],
        list(settings.slots),
        settings.tokenizer,
        max_length=settings.max_length,
        add_special_tokens=settings.add_special_tokens,
    )
    kept = []
    for (example, texts), result in zip(rendered, results):
        if isinstance(result, RowProblem):
            problems.append((example, result))
        else:
            prompt_ids, completion_ids, truncated = result
            kept.append((example, texts[0], prompt_ids, completion_ids, truncated))
    return problems, kept


def tokenize_dataset(
    loaded: LoadedData,
    tokenizer: Any,
    *,
    max_length: int | None,
    on_error: Literal["raise", "skip"] = "raise",
    chat_template: str | None = None,
    progress: bool = True,
    batch_size: int = 512,
) -> tuple[list[TokenizedExample | TokenizedUnpaired], TokenizeReport]:
    """Render (with this tokenizer's template) and tokenize every example of ``loaded``.

    Outputs keep the source row (``.row``) and the rendered prompt (``.prompt_text``), in input order.
    A row whose prompt leaves no completion token within ``max_length`` (or that the chat template
    rejects) raises :class:`DataError`, or with ``on_error="skip"`` is left out and listed in
    ``TokenizeReport.skipped``. Which rows are skipped depends on the tokenizer: align the outputs
    of several tokenizers by ``.row``.
    """
    settings, user_names = batch_settings(loaded, tokenizer, max_length, on_error, chat_template)
    report = TokenizeReport(total=len(loaded.examples))
    outputs: list[TokenizedExample | TokenizedUnpaired] = []

    def handle(example: Example | UnpairedExample, problem: RowProblem) -> None:
        field_name = user_names.get(problem.field, problem.field)
        if on_error == "raise":
            raise loaded.error(example.row, field_name, problem.reason)
        report.skipped.append((example.row, field_name, problem.reason))

    bar = progress_bar(len(loaded.examples), progress)
    try:
        for start in range(0, len(loaded.examples), batch_size):
            batch = loaded.examples[start : start + batch_size]
            problems, kept = tokenize_batch(batch, settings)
            for example, problem in problems:
                handle(example, problem)
            for example, prompt_text, prompt_ids, completion_ids, truncated in kept:
                report.truncated += truncated
                if settings.unpaired:
                    outputs.append(
                        TokenizedUnpaired(
                            prompt_ids,
                            completion_ids[0],
                            truncated,
                            label=example.label,
                            row=example.row,
                            prompt_text=prompt_text,
                        )
                    )
                else:
                    outputs.append(
                        TokenizedExample(
                            prompt_ids, *completion_ids, truncated, row=example.row, prompt_text=prompt_text
                        )
                    )
            bar.update(len(batch))
    finally:
        bar.close()
    return outputs, report
