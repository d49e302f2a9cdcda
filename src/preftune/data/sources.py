"""Opening a data source for streaming: JSON Lines, JSON arrays, CSV, Parquet, Arrow, ``save_to_disk``
folders, folders of data files and hub datasets, each read row by row as raw dicts.

A source gives a :class:`Reading`: a fresh pass over its raw rows on demand, the columns met, how its
rows are numbered, and a :class:`RowReader` that re-reads kept rows by where they are (a byte span
in a JSON file, an index in a ``datasets.Dataset``). Rows that cannot be parsed come as
:class:`Unreadable`; what the rows must hold is checked by :mod:`preftune.data.loading`.

Row numbers: JSONL, JSON arrays and CSV report the 1-based line a row starts on, as an editor shows
it (for CSV the header is line 1); Parquet, ``save_to_disk`` folders and hub datasets report the
0-based index.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .records import DataError, RowKind

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Unreadable:
    """A row that could not be parsed at all (e.g. a malformed JSONL line)."""

    reason: str


# One raw row as a reader yields it: (row number, the row or why it is unreadable, locator, length).
# The locator and length say where to read the row again: a byte offset and length in a JSON file, or
# the index in a ``datasets.Dataset`` (length 0).
RawRow = tuple[int, "dict[str, Any] | Unreadable", int, int]


@dataclass
class Reading:
    """A source opened for streaming: ``rows()`` starts a fresh pass over its raw rows, ``columns``
    fills with the column names met so far (known up front for ``datasets`` sources), and
    ``reader(locators, lengths)`` re-reads the rows kept, given their locators."""

    rows: Callable[[], Iterator[RawRow]]
    columns: dict[str, None]
    row_kind: RowKind
    reader: Callable[[np.ndarray, np.ndarray], RowReader]


class RowReader:
    """Re-reads rows of a source by position among the rows kept (as raw dicts)."""

    def read(self, positions: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError


class _SpanReader(RowReader):
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


class _DatasetReader(RowReader):
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


def _parse_object(text: str | bytes) -> dict | Unreadable:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")
    if not isinstance(value, dict):
        return Unreadable(f"expected a JSON object, got {type(value).__name__}")
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
            yield line_at(position), Unreadable(f"expected a JSON object, got {type(value).__name__}"), 0, 0
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


def _json_reading(path: str, source: str, max_rows: int | None) -> Reading:
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
    return Reading(rows, {}, "line", partial(_SpanReader, path, source))


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


def _dataset_reading(dataset, max_rows: int | None, line_numbers: np.ndarray | None = None) -> Reading:
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
    return Reading(rows, dict.fromkeys(names), kind, lambda indices, _: _DatasetReader(dataset, indices))


def _pick_split(dataset, split: str, source: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"no split {split!r}; available splits: {', '.join(sorted(dataset))}", source=source
            )
        return dataset[split]
    return dataset


def _read_with_datasets(path: str, builder: str, source: str, max_rows: int | None) -> Reading:
    import datasets

    lines = _csv_record_lines(path, source) if builder == "csv" else None  # before pandas blurs the errors
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # pyarrow / pandas parse errors come in many types
        raise DataError(
            f"could not read {builder} file: {type(error).__name__}: {error}", source=source
        ) from error
    return _dataset_reading(dataset, max_rows, lines)


def _read_folder(path: str, source: str, split: str, max_rows: int | None) -> Reading:
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


def _read_hub(name: str, split: str, max_rows: int | None) -> Reading:
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


def read_source(source: str, split: str, max_rows: int | None) -> Reading:
    """Open ``source`` (a file by its suffix, a folder, else a hub name) for streaming; ``split`` picks
    from a ``DatasetDict``, ``max_rows`` stops each pass after that many rows."""
    path = os.path.expanduser(source)
    lower = path.lower()
    if os.path.isdir(path):
        return _read_folder(path, source, split, max_rows)
    if os.path.isfile(path):
        if lower.endswith(JSON_SUFFIXES):
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
    if lower.endswith((*JSON_SUFFIXES, ".parquet", ".csv", ".arrow")) or not HUB_NAME.match(source):
        raise DataError("file not found", source=source)
    return _read_hub(source, split, max_rows)
