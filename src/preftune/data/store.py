"""Token ids of a split in flat, memory-mapped files: shared by the processes of a node, off the heap.

A :class:`TokenStore` holds one split tokenized for one model: per column (``prompt``, ``chosen``,
``rejected`` or ``completion``) one flat int32 file of all token ids and an int64 offsets array, plus
per row the source row, the truncation flag, the label (unpaired data) and the rendered prompt text
(UTF-8 bytes and offsets). Every process maps the same files, so a node pays for the token ids once,
in the page cache, whatever its number of processes; only a few ints per row live in numpy arrays.

:func:`build_token_store` tokenizes (batched, over ``num_proc`` worker processes) into a temporary
directory and renames it into place, so a reader sees a whole store or none. Its directory name is a
key over the data, the tokenizer and every tokenization setting: the first process of a node builds
it, the others (and later runs) map it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from .records import ExampleDigest, LoadedData
from .tokenize import (
    BatchSettings,
    TokenizedExample,
    TokenizedUnpaired,
    TokenizeReport,
    batch_settings,
    progress_bar,
    tokenize_batch,
)

STORE_FORMAT = 1  # bump when the files or the tokenization rules change
_TOKEN_DTYPE = np.int32
_HASH_CHUNK = 1024  # rows per hashing step: bounds its temporaries to a few MB


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TextColumn(Sequence):
    """The rendered prompts of a store, decoded one at a time (a lazy sequence of ``str``)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, index: np.ndarray | None):
        self._data, self._offsets, self._index = data, offsets, index

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._index is None else len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = i if self._index is None else int(self._index[i])
        return bytes(self._data[self._offsets[j] : self._offsets[j + 1]]).decode()


class TokenStore(Sequence):
    """One split tokenized for one model; ``store[i]`` is a :class:`TokenizedExample` (or
    :class:`TokenizedUnpaired`) built on demand, so code written for lists of them keeps working."""

    def __init__(self, directory: str | os.PathLike, index: np.ndarray | None = None):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.unpaired: bool = self.meta["unpaired"]
        self.columns: list[str] = self.meta["columns"]
        self._tokens = {c: _memmap(self.directory / f"{c}.tokens", _TOKEN_DTYPE) for c in self.columns}
        self._offsets = {c: np.load(self.directory / f"{c}.offsets.npy", mmap_mode="r") for c in self.columns}
        self._rows = np.load(self.directory / "rows.npy", mmap_mode="r")
        self._truncated = np.load(self.directory / "truncated.npy", mmap_mode="r")
        self._labels = np.load(self.directory / "labels.npy", mmap_mode="r")
        self._text = _memmap(self.directory / "prompt_text.bytes", np.uint8)
        self._text_offsets = np.load(self.directory / "prompt_text.offsets.npy", mmap_mode="r")
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    # -- sequence protocol ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows) if self.index is None else len(self.index)

    def _position(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.index is None else int(self.index[i])

    def _ids(self, column: str, j: int) -> list[int]:
        offsets = self._offsets[column]
        return self._tokens[column][offsets[j] : offsets[j + 1]].tolist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        j = self._position(int(i))
        text = bytes(self._text[self._text_offsets[j] : self._text_offsets[j + 1]]).decode()
        row, truncated = int(self._rows[j]), bool(self._truncated[j])
        if self.unpaired:
            label = None if self._labels[j] < 0 else bool(self._labels[j])
            return TokenizedUnpaired(
                self._ids("prompt", j), self._ids("completion", j), truncated, label, row, text
            )
        return TokenizedExample(
            self._ids("prompt", j), self._ids("chosen", j), self._ids("rejected", j), truncated, row, text
        )

    # -- columns -------------------------------------------------------------------------------------

    def _positions(self, index=None) -> np.ndarray:
        if index is None:
            return np.arange(len(self)) if self.index is None else self.index
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"index out of range for a store of {len(self)} rows")
        index = np.where(index < 0, index + len(self), index)
        return index if self.index is None else self.index[index]

    def ids(self, column: str, index=None) -> list[list[int]]:
        """Token ids of ``column`` for the rows ``index`` (default all) as lists."""
        tokens, offsets = self._tokens[column], self._offsets[column]
        return [tokens[offsets[j] : offsets[j + 1]].tolist() for j in self._positions(index)]

    @property
    def rows(self) -> np.ndarray:
        """Source row of every example (numpy, int64)."""
        return np.asarray(self._rows if self.index is None else self._rows[self.index])

    def labels(self, index=None) -> np.ndarray:
        """Unpaired labels as 0/1 (numpy, int8)."""
        return np.asarray(self._labels[self._positions(index)])

    @property
    def prompt_texts(self) -> TextColumn:
        return TextColumn(self._text, self._text_offsets, self.index)

    def select(self, index) -> TokenStore:
        """A store of the rows ``index`` (positions in this store), sharing the same files."""
        return TokenStore(self.directory, self._positions(index))

    @property
    def report(self) -> TokenizeReport:
        rep = self.meta["report"]
        return TokenizeReport(
            truncated=rep["truncated"],
            skipped=[tuple(s) for s in rep["skipped"]],
            total=rep["total"],
        )

    def token_key(self, columns: Sequence[str]) -> str:
        """:func:`preftune.cache.hash_token_lists` of ``columns`` (same digest), streamed from the files."""
        stored = self.meta.get("token_keys", {}).get(",".join(columns))
        if stored is not None and self.index is None:
            return stored
        return _hash_columns(self, columns)


def _hash_columns(store: TokenStore, columns: Sequence[str]) -> str:
    """The digest ``hash_token_lists`` computes over lists, built in vectorised chunks: per sequence
    its length (4 bytes, little endian) and its ids as int64."""
    h = hashlib.sha256()
    positions = store._positions()
    for column in columns:
        tokens, offsets = store._tokens[column], store._offsets[column]
        h.update(b"[")
        for start in range(0, len(positions), _HASH_CHUNK):
            pos = positions[start : start + _HASH_CHUNK]
            begin, end = np.asarray(offsets[pos]), np.asarray(offsets[pos + 1])
            lengths = end - begin
            total = int(lengths.sum())
            first = np.cumsum(lengths) - lengths  # where each sequence starts among this chunk's ids
            gather = np.repeat(begin - first, lengths) + np.arange(total)
            ids = np.asarray(tokens[gather], dtype="<i8")
            record = np.cumsum(4 + 8 * lengths) - (4 + 8 * lengths)  # byte offset of each record
            buf = np.empty(int(4 * len(pos) + 8 * total), dtype=np.uint8)
            length_bytes = lengths.astype("<u4").view(np.uint8).reshape(-1, 4)
            for b in range(4):
                buf[record + b] = length_bytes[:, b]
            where = np.repeat(record + 4, lengths) + 8 * (np.arange(total) - np.repeat(first, lengths))
            id_bytes = ids.view(np.uint8).reshape(-1, 8)
            for b in range(8):
                buf[where + b] = id_bytes[:, b]
            h.update(buf.tobytes())
        h.update(b"]")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- building


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of everything that decides a tokenizer's output, or None when it cannot be told
    (a tokenizer without a serialisable backend): then the store is not shared or reused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256()
    parts = [
        type(tokenizer).__name__,
        backend.to_str(),
        json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
        str(getattr(tokenizer, "add_bos_token", None)),
        str(getattr(tokenizer, "add_eos_token", None)),
    ]
    probe = "Hello world. <|im_start|> 12 + 30 = 42\n"
    for special in (True, False):  # python-side behaviour the backend does not show
        parts.append(str(tokenizer(probe, add_special_tokens=special)["input_ids"]))
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def data_fingerprint(loaded: LoadedData) -> str:
    """A digest of the examples (text or messages, labels, rows) and of the names errors use.

    ``load_examples`` computes it while it streams the rows (``loaded.digest``); otherwise the
    examples are read once, in order.
    """
    if loaded.digest is not None:
        return loaded.digest
    digest = ExampleDigest.for_split(
        unpaired=loaded.unpaired,
        conversational=loaded.conversational,
        row_kind=loaded.row_kind,
        columns=loaded.columns,
    )
    for example in loaded.examples:
        digest.add(example)
    return digest.hexdigest()


def store_key(loaded: LoadedData, tokenizer: Any, **settings: Any) -> str | None:
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    payload = {"format": STORE_FORMAT, "data": data_fingerprint(loaded), "tokenizer": fingerprint, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


_WORKER_SETTINGS: BatchSettings | None = None
_WORKER_EXAMPLES: Sequence | None = None


def _init_worker(settings: BatchSettings, examples: Sequence) -> None:
    """Give this process the settings and the examples. A worker receives both once, pickled (a
    lazy :class:`~preftune.data.loading.StreamedExamples` is a few arrays and a path), so each worker
    reads its own rows from the source instead of the parent sending them batch by batch."""
    global _WORKER_SETTINGS, _WORKER_EXAMPLES
    _WORKER_SETTINGS, _WORKER_EXAMPLES = settings, examples


class PackedBatch(NamedTuple):
    """A batch of examples tokenized and packed into numpy arrays: what :func:`_pack` sends back."""

    problems: list[tuple[int, str, str]]  # (row, field, reason) of each example that failed
    columns: dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (lengths, concatenated token ids)
    prompt_texts: tuple[np.ndarray, bytes]  # (byte lengths, the rendered prompts' UTF-8 bytes)
    rows: np.ndarray  # the kept examples' row numbers
    truncated: np.ndarray  # which kept examples were truncated
    labels: np.ndarray  # unpaired labels (-1: none)
    size: int  # examples read (kept or not)


def _pack(span: tuple[int, int]) -> PackedBatch:
    """Examples ``span[0]:span[1]`` read, tokenized and packed into numpy arrays (what travels back
    from a worker)."""
    assert _WORKER_SETTINGS is not None and _WORKER_EXAMPLES is not None
    settings = _WORKER_SETTINGS
    batch = _WORKER_EXAMPLES[span[0] : span[1]]
    problems, kept = tokenize_batch(batch, settings)
    problems = [(example.row, problem.field, problem.reason) for example, problem in problems]
    columns = ["prompt", *settings.slots]
    packed = {}
    for c, column in enumerate(columns):
        seqs = [item[2] if c == 0 else item[3][c - 1] for item in kept]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter((t for s in seqs for t in s), dtype=_TOKEN_DTYPE, count=int(lengths.sum()))
        packed[column] = (lengths, flat)
    texts = [item[1].encode() for item in kept]
    text_lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    rows = np.fromiter((item[0].row for item in kept), dtype=np.int64, count=len(kept))
    truncated = np.fromiter((item[4] for item in kept), dtype=bool, count=len(kept))
    labels = np.fromiter(
        (-1 if getattr(item[0], "label", None) is None else int(item[0].label) for item in kept),
        dtype=np.int8,
        count=len(kept),
    )
    return PackedBatch(problems, packed, (text_lengths, b"".join(texts)), rows, truncated, labels, len(batch))


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
    lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _worker_context(tokenizer: Any = None) -> multiprocessing.context.BaseContext:
    """Where tokenizer workers start: a fork server, else a fresh interpreter (spawn); never a plain
    fork. Forking the calling process copies its threads' locks as they are (torch's, the Rust
    tokenizer's, a process group's), and a worker that needs one held at that instant waits forever
    (a test run that had already used tokenizers and torch hung in this pool once). The fork server
    imports this module and the tokenizer's class once, so each worker starts already holding them.
    As with any spawned worker, a script that starts them needs an ``if __name__ == "__main__":``
    guard: the workers import the script's main module."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    preload = ["__main__", __name__]  # __main__: the default, which spawned workers import anyway
    if tokenizer is not None:
        preload.append(type(tokenizer).__module__)
    context.set_forkserver_preload(preload)  # taken when the server starts: its first use
    return context


_WORKER_FAILED = (
    "a tokenizer worker process died or could not start ({error}). A worker can run out of memory; "
    "and workers start from a fresh interpreter that imports the main module, so a script that "
    'tokenizes with data.num_proc > 1 needs an `if __name__ == "__main__":` guard. '
    "data.num_proc: 1 tokenizes in this process."
)


def _bounded_map(pool: concurrent.futures.Executor, items, window: int):
    """``pool.map(_pack, items)`` in order, with at most ``window`` batches in flight, so the packed
    results waiting for the parent stay bounded. A worker that dies (killed, out of memory) or
    cannot start raises here instead of leaving the parent waiting for its batch."""
    pending: collections.deque = collections.deque()

    def next_result():
        try:
            return pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise RuntimeError(_WORKER_FAILED.format(error=e)) from e

    for item in items:
        try:
            pending.append(pool.submit(_pack, item))
        except (concurrent.futures.process.BrokenProcessPool, BrokenPipeError, EOFError) as e:
            raise RuntimeError(_WORKER_FAILED.format(error=f"{type(e).__name__}: {e}")) from e
        if len(pending) >= window:
            yield next_result()
    while pending:
        yield next_result()


def build_token_store(
    loaded: LoadedData,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    max_length: int | None,
    on_error: Literal["raise", "skip"] = "raise",
    chat_template: str | None = None,
    num_proc: int = 1,
    batch_size: int = 512,
    progress: bool = True,
) -> TokenStore:
    """Tokenize ``loaded`` like :func:`~preftune.data.tokenize.tokenize_dataset` (same ids, same
    errors, same report) into a store at ``directory``; an existing store there is reused as is."""
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        return TokenStore(directory)
    settings, user_names = batch_settings(loaded, tokenizer, max_length, on_error, chat_template)
    examples = loaded.examples
    columns = ["prompt", *settings.slots]
    report = TokenizeReport(total=len(examples))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    # index ranges, not examples: whoever tokenizes a batch reads its rows (a worker, or this process)
    batches = ((s, min(s + batch_size, len(examples))) for s in range(0, len(examples), batch_size))
    lengths: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    text_lengths, rows, truncated, labels = [], [], [], []
    pool = None
    bar = progress_bar(len(examples), progress)
    try:
        files = {c: open(tmp / f"{c}.tokens", "wb") for c in columns}
        files["text"] = open(tmp / "prompt_text.bytes", "wb")
        if num_proc > 1 and len(examples) > batch_size:
            pool = concurrent.futures.ProcessPoolExecutor(
                num_proc,
                mp_context=_worker_context(tokenizer),
                initializer=_init_worker,
                initargs=(settings, examples),
            )
            results = _bounded_map(pool, batches, window=2 * num_proc)
        else:
            _init_worker(settings, examples)
            results = map(_pack, batches)
        for packed in results:
            for row, field, reason in packed.problems:
                name = user_names.get(field, field)
                if on_error == "raise":
                    raise loaded.error(row, name, reason)
                report.skipped.append((row, name, reason))
            for column, (lens, flat) in packed.columns.items():
                lengths[column].append(lens)
                files[column].write(flat.tobytes())
            prompt_lengths, prompt_bytes = packed.prompt_texts
            text_lengths.append(prompt_lengths)
            files["text"].write(prompt_bytes)
            rows.append(packed.rows)
            truncated.append(packed.truncated)
            labels.append(packed.labels)
            report.truncated += int(packed.truncated.sum())
            bar.update(packed.size)
        for f in files.values():
            f.close()
        for column in columns:
            np.save(tmp / f"{column}.offsets.npy", _offsets(lengths[column]))
        np.save(tmp / "prompt_text.offsets.npy", _offsets(text_lengths))
        np.save(tmp / "rows.npy", np.concatenate(rows) if rows else np.zeros(0, np.int64))
        np.save(tmp / "truncated.npy", np.concatenate(truncated) if truncated else np.zeros(0, bool))
        np.save(tmp / "labels.npy", np.concatenate(labels) if labels else np.zeros(0, np.int8))
        meta = {
            "format": STORE_FORMAT,
            "unpaired": settings.unpaired,
            "columns": columns,
            "report": {"truncated": report.truncated, "skipped": report.skipped, "total": report.total},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        meta["token_keys"] = {",".join(columns): TokenStore(tmp).token_key(columns)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / "meta.json").is_file():  # not another process's store: a real failure
                raise
    finally:
        bar.close()
        _init_worker(None, None)  # type: ignore[arg-type]  # this process keeps no reference to the rows
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for f in locals().get("files", {}).values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore(directory)
