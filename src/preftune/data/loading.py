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
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from .records import ANSWER_FIELD, Columns, DataError, Example, LoadedData, RowKind, UnpairedExample
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


def _read_json_file(path: str, source: str, max_rows: int | None) -> _RawRows:
    text = _read_text(path, source)
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


def _csv_record_lines(path: str, source: str | None = None) -> list[int]:
    """1-based line on which each CSV data record starts (records may span lines when quoted).

    Also the CSV checks pandas would blur: text that is not UTF-8 (named by line), and broken quoting,
    which would otherwise swallow the following lines into one field and surface later as a
    "missing value" somewhere else.
    """
    source = source if source is not None else path
    text = _read_text(path, source)
    starts = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    previous_end = 0  # line_num after the previous record; the next record starts on the line after
    try:
        for record in reader:
            if record and any(cell.strip() for cell in record):
                starts.append(previous_end + 1)
            previous_end = reader.line_num
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

    lines = _csv_record_lines(path, source) if builder == "csv" else None  # before pandas blurs the errors
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # pyarrow / pandas parse errors come in many types
        raise DataError(
            f"could not read {builder} file: {type(error).__name__}: {error}", source=source
        ) from error
    return _rows_from_dataset(dataset, max_rows, lines)


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


def _read_hub(name: str, split: str, max_rows: int | None) -> _RawRows:
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
    return _rows_from_dataset(dataset, max_rows)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


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


def _prompt_is_implicit(raw: _RawRows, columns: Columns) -> bool:
    """Whether a source without a prompt column holds full conversations that carry the prompt."""
    first_chosen = next(
        (
            row[columns.chosen]
            for _, row in raw.rows
            if isinstance(row, dict) and row.get(columns.chosen) is not None
        ),
        None,
    )
    return isinstance(first_chosen, list)  # TRL's implicit prompt: extract it from chosen/rejected


MAX_REPORTED_ROWS = 10


def _bad_rows_error(problems: list[tuple[int, str | None, str]], source: str, row_kind: RowKind) -> DataError:
    """One error for the first bad rows: the first in full (row, field), then up to nine more."""
    row, field, reason = problems[0]
    if len(problems) > 1:
        more = [
            f"{row_kind} {r}" + (f", field '{f}'" if f else "") + f": {why}"
            for r, f, why in problems[1:MAX_REPORTED_ROWS]
        ]
        rest = len(problems) - MAX_REPORTED_ROWS
        tail = f"; and {rest} more" if rest > 0 else ""
        reason = (
            f"{reason} [{len(problems)} bad rows in all; also {'; '.join(more)}{tail}. "
            "Fix them, or set data.on_error=skip to leave them out]"
        )
    return DataError(reason, source=source, row=row, field=field, row_kind=row_kind)


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
        required = [columns.prompt, columns.chosen, columns.rejected]
    missing = [column for column in required if column not in raw.columns]
    implicit = False
    if not unpaired and columns.prompt in missing and columns.chosen not in missing:
        implicit = _prompt_is_implicit(raw, columns)
        if implicit:
            missing.remove(columns.prompt)
    if missing:
        extra = ""
        if unpaired and columns.chosen in raw.columns and columns.rejected in raw.columns:
            extra = " This looks like paired data (chosen/rejected): load it without unpaired=True."
        if not unpaired and columns.completion in raw.columns and columns.label in raw.columns:
            extra = " This looks like unpaired data (completion/label): load it with unpaired=True."
        if missing == [columns.prompt] and not unpaired:
            extra += " (A prompt is extracted from chosen/rejected only when they are full conversations.)"
        raise _missing_columns(missing, raw.columns, source, columns, extra)

    examples: list[Example | UnpairedExample] = []
    skipped: list[tuple[int, str | None, str]] = []
    identical: list[int] = []
    answers: dict[int, Any] = {}
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
            # raise: keep going to report the first MAX_REPORTED_ROWS bad rows at once, not one per run
            skipped.append((row, problem.field, problem.reason))
            continue
        if not unpaired and example.chosen == example.rejected:
            identical.append(row)
        examples.append(example)
        if record.get(ANSWER_FIELD) is not None:  # Arrow sources fill an absent field with None
            answers[row] = record[ANSWER_FIELD]

    if skipped and on_error == "raise":
        raise _bad_rows_error(skipped, source, raw.row_kind)
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
        answers=answers,
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
