"""The records the data stage produces, and the one error type it raises."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# A prompt or completion is plain text, or a list of chat messages {"role": ..., "content": ...}.
Text = str | list[dict[str, Any]]
RowKind = Literal["line", "index"]
# The optional field of a held-out row that holds its reference answer (``generation_eval``).
ANSWER_FIELD = "answer"


@dataclass(frozen=True)
class Columns:
    """Names of the dataset columns holding each field (defaults follow TRL's dataset formats)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"


class DataError(ValueError):
    """A problem with the training data, naming where it is.

    The message reads ``<source>, <row_kind> <row>, field '<field>': <reason>``, for example
    ``data/train.jsonl, line 17, field 'chosen': empty completion``. ``row_kind`` is ``"line"``
    (1-based line number, as an editor shows it: JSONL, JSON arrays, CSV) or ``"index"`` (0-based
    position: Parquet, ``save_to_disk`` folders, hub datasets). Parts that are unknown are left out.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
        row_kind: RowKind = "line",
    ):
        self.reason = reason
        self.source = source
        self.row = row
        self.field = field
        self.row_kind = row_kind
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"{self.row_kind} {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self):  # keep the attributes across pickling (multiprocessing, accelerate)
        return (
            _rebuild_data_error,
            (self.reason, self.source, self.row, self.field, self.row_kind),
        )


def _rebuild_data_error(reason, source, row, field, row_kind) -> DataError:
    return DataError(reason, source=source, row=row, field=field, row_kind=row_kind)


@dataclass(frozen=True)
class Example:
    """One preference pair. ``prompt``/``chosen``/``rejected`` are all plain text or all messages."""

    prompt: Text
    chosen: Text
    rejected: Text
    row: int

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class UnpairedExample:
    """One KTO-style item: a prompt, one completion, and whether the completion is desirable."""

    prompt: Text
    completion: Text
    label: bool
    row: int

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class LoadedData:
    """Validated examples of one source.

    ``examples`` is a sequence of :class:`Example` / :class:`UnpairedExample`: a list when built in
    memory, or, from :func:`~preftune.data.loading.load_examples`, a lazy
    :class:`~preftune.data.loading.StreamedExamples` that keeps a few numbers per row (source row,
    where to re-read it) and re-reads and re-validates the rows it is asked for, so a split of any
    size costs no Python objects per row. ``digest`` is :func:`~preftune.data.store.data_fingerprint`
    computed while loading (None: computed from ``examples`` when asked).

    ``skipped`` holds ``(row, field, reason)`` for every row left out with ``on_error="skip"``
    (``field`` is ``None`` when the whole row was unreadable). ``identical_pairs`` lists the rows whose
    chosen equals rejected: they are kept (their DPO gradient is zero, but RPO contrasts them with
    other pairs) and counted so the caller can report them. ``answers`` maps the row of each valid
    example whose row carries an ``answer`` field to that answer, as it was read, when
    :func:`load_examples` was asked for them (``with_answers``: ``generation_eval`` answers those
    prompts after training; the answer is not part of the preference data, and a training split
    does not keep one Python object per row for it).
    """

    examples: Sequence[Example | UnpairedExample]
    source: str
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)
    conversational: bool = False
    columns: Columns = field(default_factory=Columns)
    row_kind: RowKind = "line"
    unpaired: bool = False
    identical_pairs: list[int] = field(default_factory=list)
    answers: dict[int, Any] = field(default_factory=dict)
    digest: str | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, row: int) -> str:
        """How to name ``row`` to a user, e.g. ``"data/train.jsonl, line 17"``."""
        return f"{self.source}, {self.row_kind} {row}"

    def error(self, row: int | None, field: str | None, reason: str) -> DataError:
        """A :class:`DataError` about ``row`` of this source (for later stages that find bad rows)."""
        return DataError(reason, source=self.source, row=row, field=field, row_kind=self.row_kind)


class ExampleDigest:
    """sha256 over a split's examples (text or messages, labels, rows), fed one example at a time, so
    a loader computes it while streaming; ``head`` names what else the digest covers (the flags and
    column names errors use). :func:`~preftune.data.store.data_fingerprint` is this digest."""

    def __init__(self, head: list[Any]):
        self._hash = hashlib.sha256(json.dumps(head, default=str).encode())

    @classmethod
    def for_split(
        cls, *, unpaired: bool, conversational: bool, row_kind: RowKind, columns: Columns
    ) -> ExampleDigest:
        return cls([unpaired, conversational, row_kind, repr(columns)])

    def add(self, example: Example | UnpairedExample) -> None:
        if isinstance(example, UnpairedExample):
            item = [example.row, example.prompt, example.completion, example.label]
        else:
            item = [example.row, example.prompt, example.chosen, example.rejected]
        data = json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode()
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
