"""Turning raw rows (dicts) into validated :class:`Example` / :class:`UnpairedExample` records.

Every check raises :class:`RowProblem` naming the column (as the user spelled it) and the reason;
``loading.py`` adds the file and row and decides between raising and skipping.
"""

from __future__ import annotations

from typing import Any

from .records import Columns, Example, Text, UnpairedExample

ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


class RowProblem(Exception):
    """One invalid field of one row."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def check_text_or_messages(value: Any, field: str) -> Text:
    """A plain string or a well-formed list of messages; anything else is a RowProblem."""
    if value is None:
        raise RowProblem(field, "missing value")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return check_messages(value, field)
    raise RowProblem(field, f"expected a string or a list of messages, got {_describe(value)}")


def check_messages(value: list | tuple, field: str) -> list[dict[str, Any]]:
    if len(value) == 0:
        raise RowProblem(field, "empty list of messages")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise RowProblem(
                field,
                f"message {number} is {_describe(message)}; expected an object with 'role' and 'content'",
            )
        # Arrow-backed sources fill absent struct keys with None; drop them so every source agrees
        # (transformers' apply_chat_template drops None-valued keys too).
        message = {key: item for key, item in message.items() if item is not None}
        role = message.get("role")
        if role is None:
            raise RowProblem(field, f"message {number} has no 'role'")
        if role not in ROLES:
            raise RowProblem(field, f"message {number} has role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in message:
            if "tool_calls" not in message:
                raise RowProblem(field, f"message {number} has no 'content'")
        elif not isinstance(message["content"], str):
            raise RowProblem(
                field,
                f"message {number} has content {_describe(message['content'])}; only text content is supported",
            )
        messages.append(message)
    return messages


def is_blank(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not message.get("content", "").strip() and "tool_calls" not in message for message in value)


def _check_completion_messages(messages: list[dict[str, Any]], field: str) -> None:
    if messages[0]["role"] != "assistant":
        raise RowProblem(
            field, f"a completion must start with an assistant message, found role {messages[0]['role']!r}"
        )
    for number, message in enumerate(messages, start=1):
        if message["role"] not in COMPLETION_ROLES:
            raise RowProblem(
                field,
                f"message {number} of the completion has role {message['role']!r}; "
                f"completions hold only {' and '.join(COMPLETION_ROLES)} messages",
            )


def _check_same_kind(values: dict[str, Text]) -> None:
    """Within one row, prompt and completions are all plain text or all messages."""
    kinds = {name: isinstance(value, list) for name, value in values.items()}
    if len(set(kinds.values())) > 1:
        plain = [name for name, is_messages in kinds.items() if not is_messages]
        chat = [name for name, is_messages in kinds.items() if is_messages]
        odd = plain if len(plain) <= len(chat) else chat
        raise RowProblem(
            odd[0],
            f"mixes plain text ({', '.join(repr(n) for n in plain)}) with message lists "
            f"({', '.join(repr(n) for n in chat)}) in one row",
        )


def extract_implicit_prompt(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], columns: Columns
) -> tuple[list, list, list]:
    """Split two full conversations into their shared leading messages and the rest (as TRL's
    ``extract_prompt``), always leaving at least the last message of each as its completion."""
    shared = 0
    for left, right in zip(chosen, rejected):
        if left != right:
            break
        shared += 1
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)
    if shared == 0:
        raise RowProblem(
            columns.chosen,
            f"no prompt column, and {columns.chosen!r} and {columns.rejected!r} share no leading messages "
            "to use as the prompt",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def paired_from_row(raw: dict[str, Any], row: int, columns: Columns, *, implicit: bool) -> Example:
    """Validate one preference row. ``implicit``: the source has no prompt column."""
    chosen = check_text_or_messages(raw.get(columns.chosen), columns.chosen)
    rejected = check_text_or_messages(raw.get(columns.rejected), columns.rejected)
    raw_prompt = None if implicit else raw.get(columns.prompt)
    # A plain prompt next to full conversations in chosen/rejected (e.g. UltraFeedback-binarized):
    # the conversations carry the prompt, so extract it from them as TRL's maybe_extract_prompt does.
    conversations_carry_prompt = (
        isinstance(raw_prompt, str)
        and isinstance(chosen, list)
        and isinstance(rejected, list)
        and chosen[0]["role"] != "assistant"
    )
    if implicit or conversations_carry_prompt:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            odd = columns.chosen if not isinstance(chosen, list) else columns.rejected
            raise RowProblem(
                odd,
                "without a prompt column, chosen and rejected must be full conversations (lists of "
                "messages) so the shared prompt can be extracted",
            )
        prompt, chosen, rejected = extract_implicit_prompt(chosen, rejected, columns)
    else:
        prompt = check_text_or_messages(raw_prompt, columns.prompt)
    _check_same_kind({columns.prompt: prompt, columns.chosen: chosen, columns.rejected: rejected})
    if is_blank(prompt):
        raise RowProblem(columns.prompt, "empty prompt")
    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if isinstance(value, list):
            _check_completion_messages(value, name)
        if is_blank(value):
            raise RowProblem(name, "empty completion")
    return Example(prompt=prompt, chosen=chosen, rejected=rejected, row=row)


def parse_label(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if value is None:
        raise RowProblem(field, "missing value")
    raise RowProblem(field, f"expected a boolean label (true/false or 1/0), got {_describe(value)}")


def unpaired_from_row(raw: dict[str, Any], row: int, columns: Columns) -> UnpairedExample:
    """Validate one KTO-style row (prompt, completion, label)."""
    prompt = check_text_or_messages(raw.get(columns.prompt), columns.prompt)
    completion = check_text_or_messages(raw.get(columns.completion), columns.completion)
    label = parse_label(raw.get(columns.label), columns.label)
    _check_same_kind({columns.prompt: prompt, columns.completion: completion})
    if is_blank(prompt):
        raise RowProblem(columns.prompt, "empty prompt")
    if isinstance(completion, list):
        _check_completion_messages(completion, columns.completion)
    if is_blank(completion):
        raise RowProblem(columns.completion, "empty completion")
    return UnpairedExample(prompt=prompt, completion=completion, label=label, row=row)
