"""Reading preference data from files, ``save_to_disk`` folders and the hub, with row-level errors.

Row numbers: JSONL, JSON arrays and CSV report the 1-based line a row starts on, as an editor shows
it (for CSV the header is line 1); Parquet, ``save_to_disk`` folders and hub datasets report the
0-based index. ``LoadedData.row_kind`` says which, and every ``Example.row`` uses it.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import logging
import os
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
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
from .validation import RowProblem, paired_from_row, unpaired_from_row

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class _Unreadable:
    """A row that could not be parsed at all (e.g. a malformed JSONL line)."""

    reason: str


# One raw row as a reader yields it: (row number, the row or why it is unreadable, locator, length).
# The locator and length say where to read the row again: a byte offset and length in a JSON file, or
# the index in a ``datasets.Dataset`` (length 0).
RawRow = tuple[int, "dict[str, Any] | _Unreadable", int, int]


@dataclass
class _Reading:
    """A source opened for streaming: ``rows()`` starts a fresh pass over its raw rows, ``columns``
    fills with the column names met so far (known up front for ``datasets`` sources), and
    ``reader(locators, lengths)`` re-reads the rows kept, given their locators."""

    rows: Callable[[], Iterator[RawRow]]
    columns: dict[str, None]
    row_kind: RowKind
    reader: Callable[[np.ndarray, np.ndarray], _RowReader]


class _RowReader:
    """Re-reads rows of a source by position among the rows kept (as raw dicts)."""

    def read(self, positions: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError


class _SpanReader(_RowReader):
    """Rows of a JSON / JSON Lines file, re-read by byte span; a file changed since it was validated
    is an error rather than other data under the same row numbers."""

    def __init__(self, path: str, source: str, starts: np.ndarray, lengths: np.ndarray):
        self.path, self.source = path, source
        self.starts, self.lengths = starts, lengths
        self.signature = _signature(path)

    def read(self, positions: np.ndarray) -> list[dict[str, Any]]:
        with open(self.path, "rb") as handle:
            if _signature(handle.fileno()) != self.signature:
                raise DataError(
                    "the file changed after it was loaded and validated; load it again", source=self.source
                )
            records = []
            for p in positions:
                handle.seek(int(self.starts[p]))
                records.append(json.loads(handle.read(int(self.lengths[p])).decode("utf-8")))
            return records


class _DatasetReader(_RowReader):
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow: off the Python heap), re-read by index."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def read(self, positions: np.ndarray) -> list[dict[str, Any]]:
        if not len(positions):
            return []
        return _records(self.dataset[[int(i) for i in self.indices[positions]]], self.dataset.column_names)


def _signature(path_or_fd) -> tuple[int, int]:
    info = os.stat(path_or_fd)
    return info.st_size, info.st_mtime_ns


def _records(batch: dict[str, list], names: list[str]) -> list[dict[str, Any]]:
    """A ``datasets`` batch (a dict of columns) as row dicts."""
    if not names:
        return []
    return [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]


# --------------------------------------------------------------------------------------------- readers


def _utf8_line(data: bytes, source: str, line: int) -> str:
    """One line as text; a byte that is not UTF-8 is reported by line and column, as an editor shows it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"not UTF-8 text: byte 0x{data[error.start]:02x} at column {error.start + 1} "
            "(save the file as UTF-8)",
            source=source,
            row=line,
        ) from None


def _parse_object(text: str | bytes) -> dict | _Unreadable:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return _Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")
    if not isinstance(value, dict):
        return _Unreadable(f"expected a JSON object, got {type(value).__name__}")
    return value


_BOM = b"\xef\xbb\xbf"


def _jsonl_rows(path: str, source: str, max_rows: int | None) -> Iterator[RawRow]:
    """JSON Lines, one line at a time (the file is never held whole)."""
    count = 0
    offset = 0
    with open(path, "rb") as handle:
        # split on "\n" only, as binary lines do: JSON strings may hold U+2028 etc., which editors do
        # not count as lines
        for line_number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            if max_rows is not None and count >= max_rows:
                break
            if line_number == 1 and line.startswith(_BOM):  # tolerate a byte-order mark
                line, start = line[len(_BOM) :], start + len(_BOM)
            text = _utf8_line(line, source, line_number)
            if not text.strip():
                continue
            count += 1
            yield line_number, _parse_object(text), start, len(line)


def _json_array_rows(path: str, source: str, max_rows: int | None) -> Iterator[RawRow]:
    """Parse a JSON array element by element, so each element keeps the line it starts on (and its
    byte span, to be re-read). The text of the file is held while this pass runs."""
    text = _read_text(path, source)
    with open(path, "rb") as handle:
        byte_offset = len(_BOM) if handle.read(len(_BOM)) == _BOM else 0
    decoder = json.JSONDecoder()
    line_at = _line_counter(text)
    whitespace = re.compile(r"\s*")
    start = whitespace.match(text).end()
    position = whitespace.match(text, start + 1).end()
    if position < len(text) and text[position] == "]":
        return
    count, char_offset = 0, 0
    while max_rows is None or count < max_rows:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(
                f"invalid JSON: {error.msg} (column {error.colno})", source=source, row=error.lineno
            ) from None
        byte_offset += len(text[char_offset:position].encode("utf-8"))
        length = len(text[position:end].encode("utf-8"))
        char_offset = position
        count += 1
        if isinstance(value, dict):
            yield line_at(position), value, byte_offset, length
        else:
            yield line_at(position), _Unreadable(f"expected a JSON object, got {type(value).__name__}"), 0, 0
        del value
        position = whitespace.match(text, end).end()
        if position < len(text) and text[position] == ",":
            position = whitespace.match(text, position + 1).end()
        elif position < len(text) and text[position] == "]":
            break
        else:
            raise DataError(
                "invalid JSON: expected ',' or ']' after an array element",
                source=source,
                row=line_at(min(position, len(text))),
            )


def _first_byte(path: str) -> bytes:
    """The first byte of a file that is not whitespace (after a byte-order mark), or b""."""
    with open(path, "rb") as handle:
        head = handle.read(len(_BOM))
        chunk = head[len(_BOM) :] if head == _BOM else head
        while True:
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
            chunk = handle.read(1 << 16)
            if not chunk:
                return b""


def _single_object(path: str, source: str) -> RawRow | None:
    """A ``.json`` file holding one (possibly pretty-printed) object: a one-row dataset. None when the
    file holds several documents (JSON Lines saved as .json)."""
    text = _read_text(path, source)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    start = re.compile(r"\s*").match(text).end()
    with open(path, "rb") as handle:
        bom = len(_BOM) if handle.read(len(_BOM)) == _BOM else 0
    byte_start = bom + len(text[:start].encode("utf-8"))
    return text.count("\n", 0, start) + 1, document, byte_start, os.path.getsize(path) - byte_start


def _json_reading(path: str, source: str, max_rows: int | None) -> _Reading:
    first = _first_byte(path)
    rows: Callable[[], Iterator[RawRow]]
    single = None
    if first == b"[":
        rows = partial(_json_array_rows, path, source, max_rows)
    elif path.lower().endswith(".json") and first == b"{":
        single = _single_object(path, source)
    if single is not None:
        rows = partial(iter, [single])
    elif first != b"[":
        rows = partial(_jsonl_rows, path, source, max_rows)
    return _Reading(rows, {}, "line", partial(_SpanReader, path, source))


def _line_counter(text: str):
    """Return a function mapping increasing character offsets of ``text`` to 1-based line numbers."""
    state = {"offset": 0, "line": 1}

    def line_at(offset: int) -> int:
        state["line"] += text.count("\n", state["offset"], offset)
        state["offset"] = offset
        return state["line"]

    return line_at


def _read_text(path: str, source: str) -> str:
    """The file as text; a byte that is not UTF-8 is reported by line and column, as an editor shows it."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise DataError(
            f"not UTF-8 text: byte 0x{data[error.start]:02x} at column {error.start - line_start + 1} "
            "(save the file as UTF-8)",
            source=source,
            row=data.count(b"\n", 0, error.start) + 1,
        ) from None


def _csv_record_lines(path: str, source: str | None = None) -> np.ndarray:
    """1-based line on which each CSV data record starts (records may span lines when quoted).

    Also the CSV checks pandas would blur: text that is not UTF-8 (named by line), and broken quoting,
    which would otherwise swallow the following lines into one field and surface later as a
    "missing value" somewhere else. The file is streamed; only the line numbers are kept.
    """
    source = source if source is not None else path
    starts = array("q")
    previous_end = 0  # line_num after the previous record; the next record starts on the line after
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            for record in reader:
                if record and any(cell.strip() for cell in record):
                    starts.append(previous_end + 1)
                previous_end = reader.line_num
    except UnicodeDecodeError:
        _read_text(path, source)  # raises, naming the line and column
        raise
    except csv.Error as error:
        unclosed = "unexpected end of data" in str(error)
        raise DataError(
            "broken CSV quoting: "
            + (
                "a quoted field opened on this line is never closed"
                if unclosed
                else f'{error} (a quote inside a quoted field must be doubled: "")'
            ),
            source=source,
            row=previous_end + 1,
        ) from None
    return np.frombuffer(starts, dtype=np.int64)[1:].copy()  # drop the header


_DATASET_CHUNK = 1000  # rows per read from a datasets.Dataset


def _dataset_reading(dataset, max_rows: int | None, line_numbers: np.ndarray | None = None) -> _Reading:
    """Rows of a ``datasets.Dataset``, numbered by line when ``line_numbers`` matches it, else by
    index; read in chunks from the Arrow table, never converted whole."""
    if line_numbers is not None and len(line_numbers) != len(dataset):
        line_numbers = None  # the CSV dialect fooled our line count: fall back to indices rather than guess
    if dataset.format.get("type") is not None:  # e.g. saved with set_format("torch"): read Python objects
        dataset = dataset.with_format(None)
    total = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    names = list(dataset.column_names)

    def rows() -> Iterator[RawRow]:
        for start in range(0, total, _DATASET_CHUNK):
            end = min(start + _DATASET_CHUNK, total)
            for index, record in enumerate(_records(dataset[start:end], names), start=start):
                number = int(line_numbers[index]) if line_numbers is not None else index
                yield number, record, index, 0

    kind: RowKind = "line" if line_numbers is not None else "index"
    return _Reading(rows, dict.fromkeys(names), kind, lambda indices, _: _DatasetReader(dataset, indices))


def _pick_split(dataset, split: str, source: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"no split {split!r}; available splits: {', '.join(sorted(dataset))}", source=source
            )
        return dataset[split]
    return dataset


def _read_with_datasets(path: str, builder: str, source: str, max_rows: int | None) -> _Reading:
    import datasets

    lines = _csv_record_lines(path, source) if builder == "csv" else None  # before pandas blurs the errors
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # pyarrow / pandas parse errors come in many types
        raise DataError(
            f"could not read {builder} file: {type(error).__name__}: {error}", source=source
        ) from error
    return _dataset_reading(dataset, max_rows, lines)


def _read_folder(path: str, source: str, split: str, max_rows: int | None) -> _Reading:
    import datasets

    saved = any(os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            dataset = _pick_split(datasets.load_from_disk(path), split, source)
        else:  # a folder of data files (parquet/jsonl/csv shards)
            dataset = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as error:
        what = "save_to_disk folder" if saved else "folder of data files"
        raise DataError(f"could not read {what}: {type(error).__name__}: {error}", source=source) from error
    return _dataset_reading(dataset, max_rows)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds (one try, no retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode():
    """Make datasets and huggingface_hub use their caches only, for one load (no network retries)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _read_hub(name: str, split: str, max_rows: int | None) -> _Reading:
    """A hub dataset; offline (HF_HUB_OFFLINE=1, or the hub unreachable) only from the local cache,
    failing at once with one line instead of retrying the network."""
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
        "on",
    ) or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    unreachable = not offline and not _hub_reachable()
    try:
        with _offline_mode() if offline or unreachable else contextlib.nullcontext():
            dataset = datasets.load_dataset(name, split=split)
    except Exception as error:
        if offline or unreachable:
            why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable (no network)"
            raise DataError(
                f"not a local file or folder, and not in the local datasets cache; {why}: "
                "use a local file or folder, or load the dataset once with network access",
                source=name,
            ) from error
        raise DataError(
            f"not a local file or folder, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {_one_line(error)})",
            source=name,
        ) from error
    return _dataset_reading(dataset, max_rows)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_source(source: str, split: str, max_rows: int | None) -> _Reading:
    path = os.path.expanduser(source)
    lower = path.lower()
    if os.path.isdir(path):
        return _read_folder(path, source, split, max_rows)
    if os.path.isfile(path):
        if lower.endswith(_JSON_SUFFIXES):
            return _json_reading(path, source, max_rows)
        if lower.endswith(".parquet"):
            return _read_with_datasets(path, "parquet", source, max_rows)
        if lower.endswith(".csv"):
            return _read_with_datasets(path, "csv", source, max_rows)
        if lower.endswith(".arrow"):
            return _read_with_datasets(path, "arrow", source, max_rows)
        raise DataError(
            "unsupported file type; expected .jsonl, .json, .parquet, .csv, .arrow or a save_to_disk folder",
            source=source,
        )
    if lower.endswith((*_JSON_SUFFIXES, ".parquet", ".csv", ".arrow")) or not _HUB_NAME.match(source):
        raise DataError("file not found", source=source)
    return _read_hub(source, split, max_rows)


# ------------------------------------------------------------------------------------------ validation


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


def _bad_rows_error(
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
        reader: _RowReader,
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
    reading: _Reading,
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
            if isinstance(record, _Unreadable):
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
    reading = _read_source(source, split, max_rows)
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
        raise _bad_rows_error(found.problems, found.problem_count, source, reading.row_kind)
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
