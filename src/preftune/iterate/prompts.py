"""The prompts of ``rounds.prompts`` / ``rounds.eval_prompts``: read from any source ``data.train``
takes, checked before any model loads."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError


def read_prompt_rows(
    source: str, split: str, key: str, *, prompt_column: str = "prompt"
) -> list[dict[str, Any]]:
    """Every row of ``source`` as a dict, with ``"_row"`` its row number (1-based line for JSONL).

    Each must have a prompt (text or a non-empty list of chat messages); a row that does not is a
    :class:`ConfigError` naming the key, the source and the row."""
    from ..data.check import check_source_exists, resolve_source
    from ..data.sources import read_source  # the readers of data.train (JSON/JSONL/CSV/Parquet/folders/hub)

    resolved = resolve_source(source, key)
    check_source_exists(resolved, key)
    rows = []
    for number, row, _, _ in read_source(resolved, split, None).rows():
        if not isinstance(row, dict):
            reason = getattr(row, "reason", "not a JSON object")
            raise ConfigError(f"{key}: {source} row {number}: {reason}")
        prompt = row.get(prompt_column)
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and "content" in m for m in prompt)
        )
        if not ok:
            raise ConfigError(
                f"{key}: {source} row {number}: needs a '{prompt_column}' (text or a list of chat messages)"
            )
        rows.append({**row, "_row": number})
    if not rows:
        raise ConfigError(f"{key}: {source} has no rows")
    return rows


def round_slice(rows: list, round_index: int, per_round: int | None) -> list[int]:
    """Indices of the prompts of round ``round_index`` (1-based): every prompt, or the next
    ``per_round`` of them, wrapping around at the end of the file."""
    n = len(rows)
    if per_round is None or per_round >= n:
        return list(range(n))
    first = (round_index - 1) * per_round
    return [(first + i) % n for i in range(per_round)]
