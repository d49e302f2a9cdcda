"""Loading preference data: every row of a source validated, with row-level errors, and kept as a
few numbers per row (:class:`StreamedExamples`) rather than as text.

The sources themselves (files, folders, the hub) are read by :mod:`preftune.data.sources`; a row's
fields are checked by :mod:`preftune.data.validation`. Row numbers follow the source:
``LoadedData.row_kind`` says whether they are lines or indices, and every ``Example.row`` uses it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from .records import (
    ANSWER_FIELD,
    Columns,
    DataError,
    Example,
    ExampleDigest,
    LoadedData,
    RowKind,
    UnpairedExample,
)
from .sources import Reading, RowReader, Unreadable, read_source
from .validation import RowProblem, paired_from_row, unpaired_from_row

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


_COLUMN_FIELDS = ("prompt", "chosen", "rejected", "completion", "label")
# words that other datasets use in their column names for each field, to suggest a mapping
_COLUMN_WORDS = {
    "prompt": ("prompt", "question", "instruction", "query", "input", "context"),
    "chosen": ("chosen", "good", "prefer", "win", "better", "accept", "pos"),
    "rejected": ("rejected", "bad", "dispref", "los", "worse", "reject", "neg"),
    "completion": ("completion", "response", "answer", "output"),
    "label": ("label", "desirable", "kto", "good"),
}


def _guess_column(field: str, column: str, present: list[str], taken: set[str]) -> list[str]:
    close = [c for c in difflib.get_close_matches(column, present, n=3, cutoff=0.5) if c not in taken]
    if close:
        return close
    words = _COLUMN_WORDS.get(field, ())
    return [c for c in present if c not in taken and any(w in c.lower() for w in words)][:1]


def _missing_columns(
    missing: list[str], present: list[str], source: str, columns: Columns, extra: str = ""
) -> DataError:
    """One error naming every missing column, with the override that maps each one."""
    fields = {getattr(columns, name): name for name in _COLUMN_FIELDS}
    listed = ", ".join(repr(c) for c in present) if present else "none"
    suggestions, fixes = [], []
    taken = set(fields) & set(present)
    for column in missing:
        close = _guess_column(fields.get(column, column), column, present, taken)
        taken.update(close[:1])
        if close:
            suggestions.append(f"Did you mean {' or '.join(repr(c) for c in close)}?")
        fixes.append(f"data.columns.{fields.get(column, column)}={close[0] if close else '<column>'}")
    what = f"column {missing[0]!r}" if len(missing) == 1 else f"columns {', '.join(repr(c) for c in missing)}"
    hint = " ".join(suggestions) if len(missing) == 1 else ""  # several: the overrides say it all
    return DataError(
        f"missing {what} (columns found: {listed}).{' ' + hint if hint else ''}{extra} "
        f"Map them with data.columns in the config or on the command line: {' '.join(fixes)} "
        "(in Python: load_examples(..., columns=Columns(...))).",
        source=source,
        field=missing[0],
    )


MAX_REPORTED_ROWS = 10


def bad_rows_error(
    problems: list[tuple[int, str | None, str]], count: int, source: str, row_kind: RowKind
) -> DataError:
    """One error for the first bad rows: the first in full (row, field), then up to nine more;
    ``count``: bad rows in all (``problems`` may hold only the first of them)."""
    row, field, reason = problems[0]
    if count > 1:
        more = [
            f"{row_kind} {r}" + (f", field '{f}'" if f else "") + f": {why}"
            for r, f, why in problems[1:MAX_REPORTED_ROWS]
        ]
        rest = count - MAX_REPORTED_ROWS
        tail = f"; and {rest} more" if rest > 0 else ""
        reason = (
            f"{reason} [{count} bad rows in all; also {'; '.join(more)}{tail}. "
            "Fix them, or set data.on_error=skip to leave them out]"
        )
    return DataError(reason, source=source, row=row, field=field, row_kind=row_kind)


def _example_from_row(
    record: dict[str, Any], row: int, columns: Columns, *, unpaired: bool, implicit: bool
) -> Example | UnpairedExample:
    if unpaired:
        return unpaired_from_row(record, row, columns)
    return paired_from_row(record, row, columns, implicit=implicit)


_CHUNK = 512  # rows re-read at a time when iterating


class StreamedExamples(Sequence):
    """The validated examples of a source, kept as a few numbers per row (its row number and where
    to read it again) instead of Python objects: ``examples[i]``, slices and iteration re-read those
    rows from the file (by byte span) or the ``datasets`` table (by index) and validate them again,
    the same way :func:`load_examples` did. Iteration reads ``_CHUNK`` rows at a time, so walking a
    split of any size holds one chunk. Picklable (a path or a dataset and numpy arrays), so worker
    processes read their own rows."""

    def __init__(
        self,
        reader: RowReader,
        rows: np.ndarray,
        *,
        source: str,
        row_kind: RowKind,
        columns: Columns,
        unpaired: bool,
        implicit: bool,
    ):
        self.reader, self.rows = reader, rows
        self.source, self.row_kind, self.columns = source, row_kind, columns
        self.unpaired, self.implicit = unpaired, implicit

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, positions: np.ndarray) -> list[Example | UnpairedExample]:
        examples = []
        for position, record in zip(positions, self.reader.read(positions)):
            row = int(self.rows[position])
            try:
                examples.append(
                    _example_from_row(
                        record, row, self.columns, unpaired=self.unpaired, implicit=self.implicit
                    )
                )
            except RowProblem as problem:  # valid when loaded: the source changed since
                raise DataError(
                    f"{problem.reason} (the row was valid when loaded: did the data change since?)",
                    source=self.source,
                    row=row,
                    field=problem.field,
                    row_kind=self.row_kind,
                ) from None
        return examples

    def __getitem__(self, i):
        if isinstance(i, slice):
            span = range(len(self))[i]
            return self._read(np.arange(span.start, span.stop, span.step))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._read(np.array([i]))[0]

    def __iter__(self) -> Iterator[Example | UnpairedExample]:
        for start in range(0, len(self), _CHUNK):
            yield from self._read(np.arange(start, min(start + _CHUNK, len(self))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def __repr__(self) -> str:
        return f"StreamedExamples({len(self)} rows of {self.source})"


@dataclass
class _Pass:
    """What one validation pass over a source found (a few numbers per kept row)."""

    rows: array  # row number of each kept row
    locators: array  # where to re-read it
    lengths: array
    problems: list[tuple[int, str | None, str]]  # all of them (skip), or the first ones (raise)
    problem_count: int
    identical: list[int]
    conversational: bool | None
    digest: ExampleDigest | None
    implicit: bool  # the implicit-prompt rule the rows were validated under
    first_chosen_is_list: bool | None  # the type of the first row's chosen value (None: none seen)
    read: int  # rows read
    answers: dict[int, Any]  # row -> its `answer` field, only when asked (generation_eval)


def _validation_pass(
    reading: Reading,
    source: str,
    columns: Columns,
    *,
    unpaired: bool,
    on_error: OnError,
    implicit: bool | None,
    with_answers: bool = False,
) -> _Pass:
    """Stream every raw row once: validate it, keep its row number and locator, feed the digest.

    ``implicit`` (no prompt column: take it from full conversations) is decided at the first row
    that has a chosen value when not given; :func:`load_examples` checks that guess against the
    columns of the whole source and runs the pass again when a later row proved it wrong.
    """
    result = _Pass(array("q"), array("q"), array("q"), [], 0, [], None, None, bool(implicit), None, 0, {})
    first_row: int | None = None
    keep_all = on_error == "skip"
    for row, record, locator, length in reading.rows():
        result.read += 1
        try:
            if isinstance(record, Unreadable):
                raise RowProblem(None, record.reason)
            reading.columns.update(dict.fromkeys(record))
            if result.first_chosen_is_list is None and record.get(columns.chosen) is not None:
                result.first_chosen_is_list = isinstance(record[columns.chosen], list)
                if implicit is None:
                    result.implicit = (
                        not unpaired and columns.prompt not in reading.columns and result.first_chosen_is_list
                    )
            example = _example_from_row(record, row, columns, unpaired=unpaired, implicit=result.implicit)
            if result.conversational is None:
                result.conversational, first_row = example.conversational, row
                result.digest = ExampleDigest.for_split(
                    unpaired=unpaired,
                    conversational=example.conversational,
                    row_kind=reading.row_kind,
                    columns=columns,
                )
            elif example.conversational != result.conversational:
                this, that = (
                    ("messages", "plain text") if example.conversational else ("plain text", "messages")
                )
                field = columns.completion if unpaired else columns.chosen
                raise RowProblem(
                    field,
                    f"row holds {this} but earlier rows hold {that} (first at {reading.row_kind} "
                    f"{first_row}); a dataset must be all conversational or all plain text",
                )
        except RowProblem as problem:
            # raise: keep going to report the first MAX_REPORTED_ROWS bad rows at once, not one per run
            result.problem_count += 1
            if keep_all or len(result.problems) < MAX_REPORTED_ROWS:
                result.problems.append((row, problem.field, problem.reason))
            continue
        if not unpaired and example.chosen == example.rejected:
            result.identical.append(row)
        assert result.digest is not None
        result.digest.add(example)
        result.rows.append(row)
        result.locators.append(locator)
        result.lengths.append(length)
        if with_answers and record.get(ANSWER_FIELD) is not None:  # Arrow fills an absent field with None
            result.answers[row] = record[ANSWER_FIELD]
    return result


def load_examples(
    source: str,
    *,
    unpaired: bool = False,
    columns: Columns = Columns(),  # noqa: B008 - frozen dataclass, safe to share
    on_error: OnError = "raise",
    split: str = "train",
    max_rows: int | None = None,
    with_answers: bool = False,
) -> LoadedData:
    """Load and validate preference data.

    ``source`` is a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file, a ``save_to_disk``
    folder (``split`` picks from a ``DatasetDict``), a folder of data files, or a hub dataset name.
    Paired data gives :class:`Example` (prompt, chosen, rejected), ``unpaired=True`` gives
    :class:`UnpairedExample` (prompt, completion, label). ``max_rows`` reads only the first rows.

    Every row is validated; a bad row raises :class:`DataError` naming the file, row and field, or
    with ``on_error="skip"`` is left out and recorded in ``LoadedData.skipped``. Problems with the
    whole source (missing file or column, no usable rows) always raise.

    The rows are streamed, not held: ``LoadedData.examples`` is a :class:`StreamedExamples` (per
    row: its number and where to re-read it), and ``LoadedData.digest`` (the token stores' data
    key) is computed in the same pass. ``with_answers`` also keeps each kept row's ``answer`` field
    (``LoadedData.answers``; for ``generation_eval``'s held-out split).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    source = os.fspath(source)
    reading = read_source(source, split, max_rows)
    validate = partial(
        _validation_pass,
        reading,
        source,
        columns,
        unpaired=unpaired,
        on_error=on_error,
        with_answers=with_answers,
    )
    found = validate(implicit=None)
    if not found.read:
        raise DataError("no rows", source=source)
    present = list(reading.columns)

    if unpaired:
        required = [columns.prompt, columns.completion, columns.label]
    else:
        required = [columns.prompt, columns.chosen, columns.rejected]
    missing = [column for column in required if column not in present]
    implicit = False
    if not unpaired and columns.prompt in missing and columns.chosen not in missing:
        # TRL's implicit prompt: taken from chosen/rejected when they hold full conversations
        implicit = bool(found.first_chosen_is_list)
        if implicit:
            missing.remove(columns.prompt)
    if missing:
        extra = ""
        if unpaired and columns.chosen in present and columns.rejected in present:
            extra = " This looks like paired data (chosen/rejected): load it without unpaired=True."
        if not unpaired and columns.completion in present and columns.label in present:
            extra = " This looks like unpaired data (completion/label): load it with unpaired=True."
        if missing == [columns.prompt] and not unpaired:
            extra += " (A prompt is extracted from chosen/rejected only when they are full conversations.)"
        raise _missing_columns(missing, present, source, columns, extra)
    if implicit != found.implicit:  # a prompt column first met after the first row: validate again
        found = validate(implicit=implicit)

    if found.problems and on_error == "raise":
        raise bad_rows_error(found.problems, found.problem_count, source, reading.row_kind)
    if not found.rows:
        first = found.problems[0]
        where = DataError(first[2], source=source, row=first[0], field=first[1], row_kind=reading.row_kind)
        raise DataError(
            f"every row was invalid and skipped ({found.problem_count} rows); first problem: {where}",
            source=source,
        )
    if found.identical:
        logger.warning(
            "%s: %d pair(s) have chosen identical to rejected (first at %s %d); they carry no DPO signal.",
            source,
            len(found.identical),
            reading.row_kind,
            found.identical[0],
        )
    rows = np.frombuffer(found.rows, dtype=np.int64)
    reader = reading.reader(
        np.frombuffer(found.locators, dtype=np.int64), np.frombuffer(found.lengths, dtype=np.int64)
    )
    assert found.digest is not None
    return LoadedData(
        examples=StreamedExamples(
            reader,
            rows,
            source=source,
            row_kind=reading.row_kind,
            columns=columns,
            unpaired=unpaired,
            implicit=found.implicit,
        ),
        source=source,
        skipped=found.problems,
        conversational=bool(found.conversational),
        columns=columns,
        row_kind=reading.row_kind,
        unpaired=unpaired,
        identical_pairs=found.identical,
        answers=found.answers,
        digest=found.digest.hexdigest(),
    )


# ----------------------------------------------------------------------------------------- fingerprint

_FINGERPRINT_VERSION = "preftune-data-v1"


def _canonical(example: Example | UnpairedExample) -> dict[str, Any]:
    if isinstance(example, UnpairedExample):
        return {"prompt": example.prompt, "completion": example.completion, "label": example.label}
    return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}


def examples_fingerprint(loaded: LoadedData | list[Example | UnpairedExample]) -> str:
    """sha256 (hex) of the examples' content, in order.

    Covers every prompt/chosen/rejected (or prompt/completion/label) field and the order of the
    examples; not the file path nor the row numbers, so moving or re-indenting a file keeps caches
    that key on it valid. Dict keys are sorted, so message key order does not matter.
    """
    examples = loaded.examples if isinstance(loaded, LoadedData) else loaded
    digest = hashlib.sha256(_FINGERPRINT_VERSION.encode())
    for example in examples:
        kind = b"U" if isinstance(example, UnpairedExample) else b"P"
        digest.update(kind)
        digest.update(json.dumps(_canonical(example), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
