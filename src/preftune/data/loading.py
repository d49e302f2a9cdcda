"""Reading preference data from files, ``save_to_disk`` folders and the hub, with row-level errors.

Row numbers: JSONL, JSON arrays and CSV report the 1-based line a row starts on, as an editor shows
it (for CSV the header is line 1); Parquet, ``save_to_disk`` folders and hub datasets report the
0-based index. ``LoadedData.row_kind`` says which, and every ``Example.row`` uses it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from .records import Columns, DataError, Example, LoadedData, RowKind, UnpairedExample
from .validation import RowProblem, paired_from_row, unpaired_from_row

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class _Unreadable:
    """A row that could not be parsed at all (e.g. a malformed JSONL line)."""

    reason: str


@dataclass
class _RawRows:
    rows: list[tuple[int, dict[str, Any] | _Unreadable]]
    columns: list[str]
    row_kind: RowKind


# --------------------------------------------------------------------------------------------- readers


def _line_counter(text: str):
    """Return a function mapping increasing character offsets of ``text`` to 1-based line numbers."""
    state = {"offset": 0, "line": 1}

    def line_at(offset: int) -> int:
        state["line"] += text.count("\n", state["offset"], offset)
        state["offset"] = offset
        return state["line"]

    return line_at


def _read_jsonl_text(text: str, max_rows: int | None) -> list[tuple[int, dict | _Unreadable]]:
    rows: list[tuple[int, dict | _Unreadable]] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc., which editors do not count as lines
    for line_number, line in enumerate(text.split("\n"), start=1):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append((line_number, _Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")))
            continue
        if not isinstance(value, dict):
            rows.append((line_number, _Unreadable(f"expected a JSON object, got {type(value).__name__}")))
            continue
        rows.append((line_number, value))
    return rows


def _read_json_array(
    text: str, start: int, source: str, max_rows: int | None
) -> list[tuple[int, dict | _Unreadable]]:
    """Parse a JSON array element by element, so each element keeps the line it starts on."""
    decoder = json.JSONDecoder()
    line_at = _line_counter(text)
    whitespace = re.compile(r"\s*")
    rows: list[tuple[int, dict | _Unreadable]] = []
    position = whitespace.match(text, start + 1).end()
    if position < len(text) and text[position] == "]":
        return rows
    while max_rows is None or len(rows) < max_rows:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(
                f"invalid JSON: {error.msg} (column {error.colno})", source=source, row=error.lineno
            ) from None
        line = line_at(position)
        if isinstance(value, dict):
            rows.append((line, value))
        else:
            rows.append((line, _Unreadable(f"expected a JSON object, got {type(value).__name__}")))
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
    return rows


def _read_json_file(path: str, source: str, max_rows: int | None) -> _RawRows:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error})", source=source) from None
    start = re.compile(r"\s*").match(text).end()
    rows: list[tuple[int, dict | _Unreadable]] | None = None
    if start < len(text) and text[start] == "[":
        rows = _read_json_array(text, start, source, max_rows)
    elif path.lower().endswith(".json") and start < len(text) and text[start] == "{":
        try:  # a single (possibly pretty-printed) object is a one-row dataset
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # several documents: JSON Lines saved as .json
        if isinstance(document, dict):
            rows = [(text.count("\n", 0, start) + 1, document)]
    if rows is None:
        rows = _read_jsonl_text(text, max_rows)
    columns: dict[str, None] = {}
    for _, value in rows:
        if isinstance(value, dict):
            columns.update(dict.fromkeys(value))
    return _RawRows(rows, list(columns), "line")


def _csv_record_lines(path: str) -> list[int]:
    """1-based line on which each CSV data record starts (records may span lines when quoted)."""
    starts = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        previous_end = 0  # line_num after the previous record; the next record starts on the line after
        for record in reader:
            if record and any(cell.strip() for cell in record):
                starts.append(previous_end + 1)
            previous_end = reader.line_num
    return starts[1:]  # drop the header


def _rows_from_dataset(dataset, max_rows: int | None, line_numbers: list[int] | None = None) -> _RawRows:
    """Rows of a ``datasets.Dataset``, numbered by line when ``line_numbers`` matches it, else by index."""
    if line_numbers is not None and len(line_numbers) != len(dataset):
        line_numbers = None  # the CSV dialect fooled our line count: fall back to indices rather than guess
    if max_rows is not None and len(dataset) > max_rows:
        dataset = dataset.select(range(max_rows))
    records = dataset.to_list()
    numbers = line_numbers[: len(records)] if line_numbers is not None else range(len(records))
    kind: RowKind = "line" if line_numbers is not None else "index"
    return _RawRows(list(zip(numbers, records)), list(dataset.column_names), kind)


def _pick_split(dataset, split: str, source: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"no split {split!r}; available splits: {', '.join(sorted(dataset))}", source=source
            )
        return dataset[split]
    return dataset


def _read_with_datasets(path: str, builder: str, source: str, max_rows: int | None) -> _RawRows:
    import datasets

    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # pyarrow / pandas parse errors come in many types
        raise DataError(
            f"could not read {builder} file: {type(error).__name__}: {error}", source=source
        ) from error
    return _rows_from_dataset(dataset, max_rows, _csv_record_lines(path) if builder == "csv" else None)


def _read_folder(path: str, source: str, split: str, max_rows: int | None) -> _RawRows:
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
    return _rows_from_dataset(dataset, max_rows)


def _read_hub(name: str, split: str, max_rows: int | None) -> _RawRows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in (
            "1",
            "true",
            "yes",
            "on",
        ) or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            " The hub is unreachable in offline mode (HF_HUB_OFFLINE=1): use a local file or folder."
            if offline
            else ""
        )
        raise DataError(
            f"not a local file or folder, and loading it as a hub dataset failed "
            f"({type(error).__name__}: {error}).{hint}",
            source=name,
        ) from error
    return _rows_from_dataset(dataset, max_rows)


def _read_source(source: str, split: str, max_rows: int | None) -> _RawRows:
    path = os.path.expanduser(source)
    lower = path.lower()
    if os.path.isdir(path):
        return _read_folder(path, source, split, max_rows)
    if os.path.isfile(path):
        if lower.endswith(_JSON_SUFFIXES):
            return _read_json_file(path, source, max_rows)
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


def _missing_column(column: str, present: list[str], source: str, extra: str = "") -> DataError:
    close = difflib.get_close_matches(column, present, n=3, cutoff=0.5)
    suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(repr(c) for c in present) if present else "none"
    return DataError(
        f"missing column {column!r} (columns found: {listed}).{suggestion}{extra} "
        "Map your column names with Columns(...) / data.columns in the config.",
        source=source,
        field=column,
    )


def _prompt_is_implicit(raw: _RawRows, columns: Columns, source: str) -> bool:
    if columns.prompt in raw.columns:
        return False
    first_chosen = next(
        (
            row[columns.chosen]
            for _, row in raw.rows
            if isinstance(row, dict) and row.get(columns.chosen) is not None
        ),
        None,
    )
    if isinstance(first_chosen, list):
        return True  # conversational chosen/rejected that hold the prompt: extract it (TRL's implicit prompt)
    raise _missing_column(
        columns.prompt,
        raw.columns,
        source,
        extra=" (A prompt is extracted from chosen/rejected only when they are full conversations.)",
    )


def load_examples(
    source: str,
    *,
    unpaired: bool = False,
    columns: Columns = Columns(),  # noqa: B008 - frozen dataclass, safe to share
    on_error: OnError = "raise",
    split: str = "train",
    max_rows: int | None = None,
) -> LoadedData:
    """Load and validate preference data.

    ``source`` is a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file, a ``save_to_disk``
    folder (``split`` picks from a ``DatasetDict``), a folder of data files, or a hub dataset name.
    Paired data gives :class:`Example` (prompt, chosen, rejected), ``unpaired=True`` gives
    :class:`UnpairedExample` (prompt, completion, label). ``max_rows`` reads only the first rows.

    Every row is validated; a bad row raises :class:`DataError` naming the file, row and field, or
    with ``on_error="skip"`` is left out and recorded in ``LoadedData.skipped``. Problems with the
    whole source (missing file or column, no usable rows) always raise.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    source = os.fspath(source)
    raw = _read_source(source, split, max_rows)
    if not raw.rows:
        raise DataError("no rows", source=source)

    def fail(row: int | None, field: str | None, reason: str) -> DataError:
        return DataError(reason, source=source, row=row, field=field, row_kind=raw.row_kind)

    if unpaired:
        required = [columns.prompt, columns.completion, columns.label]
    else:
        required = [columns.chosen, columns.rejected]
    for column in required:
        if column not in raw.columns:
            extra = ""
            if unpaired and columns.chosen in raw.columns and columns.rejected in raw.columns:
                extra = " This looks like paired data (chosen/rejected): load it without unpaired=True."
            if not unpaired and columns.completion in raw.columns and columns.label in raw.columns:
                extra = " This looks like unpaired data (completion/label): load it with unpaired=True."
            raise _missing_column(column, raw.columns, source, extra)
    implicit = not unpaired and _prompt_is_implicit(raw, columns, source)

    examples: list[Example | UnpairedExample] = []
    skipped: list[tuple[int, str | None, str]] = []
    identical: list[int] = []
    conversational: bool | None = None
    first_row: int | None = None
    for row, record in raw.rows:
        try:
            if isinstance(record, _Unreadable):
                raise RowProblem(None, record.reason)
            if unpaired:
                example = unpaired_from_row(record, row, columns)
            else:
                example = paired_from_row(record, row, columns, implicit=implicit)
            if conversational is None:
                conversational, first_row = example.conversational, row
            elif example.conversational != conversational:
                this, that = (
                    ("messages", "plain text") if example.conversational else ("plain text", "messages")
                )
                field = columns.completion if unpaired else columns.chosen
                raise RowProblem(
                    field,
                    f"row holds {this} but earlier rows hold {that} (first at {raw.row_kind} {first_row}); "
                    "a dataset must be all conversational or all plain text",
                )
        except RowProblem as problem:
            if on_error == "raise":
                raise fail(row, problem.field, problem.reason) from None
            skipped.append((row, problem.field, problem.reason))
            continue
        if not unpaired and example.chosen == example.rejected:
            identical.append(row)
        examples.append(example)

    if not examples:
        first = skipped[0]
        raise DataError(
            f"every row was invalid and skipped ({len(skipped)} rows); first problem: "
            f"{fail(first[0], first[1], first[2])}",
            source=source,
        )
    if identical:
        logger.warning(
            "%s: %d pair(s) have chosen identical to rejected (first at %s %d); they carry no DPO signal.",
            source,
            len(identical),
            raw.row_kind,
            identical[0],
        )
    return LoadedData(
        examples=examples,
        source=source,
        skipped=skipped,
        conversational=bool(conversational),
        columns=columns,
        row_kind=raw.row_kind,
        unpaired=unpaired,
        identical_pairs=identical,
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
