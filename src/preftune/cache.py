"""On-disk cache of per-sequence reference scores and prompt embeddings, keyed by fingerprints.

A key hashes everything the cached numbers depend on: the exact token ids each model sees (which
covers the data, the tokenizer, the chat template and max_length), a digest of the model's weight
files, and the scoring dtype. Change any of them and the key changes; nothing is ever invalidated by
hand. Files are written to a temporary name and renamed, so a crash never leaves a half-written entry;
each entry's checksum and shapes are verified on load, so a damaged one is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingError
from .models.presets import MANIFEST_NAME, default_cache_dir  # one definition of the cache root

CACHE_FORMAT = 1  # bump when the meaning of cached numbers changes

logger = logging.getLogger(__name__)


def hash_token_lists(*lists: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for seqs in lists:
        h.update(b"[")
        for seq in seqs:
            h.update(len(seq).to_bytes(4, "little"))
            h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
        h.update(b"]")
    return h.hexdigest()


def hash_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model")


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a model directory's weight and config files (content, not names or times).

    Hashing a few hundred MB takes about a second; the digest is memoised next to the files' sizes
    and modification times in the cache, so an unchanged model is hashed once.
    """
    path = Path(path)
    # The preset manifest holds timestamps, not weights: a rebuilt identical preset keeps its fingerprint.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and p.name != MANIFEST_NAME
    )
    if not files:
        raise FileNotFoundError(f"{path}: no model files found (expected *.safetensors and config.json)")
    stat_key = hash_texts(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo = default_cache_dir() / "fingerprints" / f"{stat_key}.txt"
    try:
        memoised = memo.read_text().strip()
    except (OSError, UnicodeDecodeError):
        memoised = ""
    if _SHA256_HEX.fullmatch(memoised):  # anything else (a damaged file) is hashed again
        return memoised
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    try:  # atomically: another process hashing the same model must never read a half-written memo
        memo.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(memo, lambda tmp: tmp.write_text(digest))
    except (OSError, TrainingError):  # a full disk says so as a StorageError (a TrainingError)
        pass  # memoising is an optimisation only
    return digest


def make_key(**parts: object) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # a full disk (OSError, SafetensorError): one line, the partial file removed
        from .storage import raise_if_storage

        tmp.unlink(missing_ok=True)
        raise_if_storage(path, e, removed=tmp)
        raise
    finally:
        tmp.unlink(missing_ok=True)


_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped copy-on-write instead of read whole.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range
    of each tensor within the data that follows), then the data. Dtypes numpy cannot map (bf16) are
    read with safetensors itself.
    """
    path = Path(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > path.stat().st_size - 8:
            raise ValueError(f"header length {header_len} does not fit a {path.stat().st_size}-byte file")
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    size = path.stat().st_size
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _NUMPY_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            return load_file(path)
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= size - base or end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name!r}: byte range {begin}..{end} does not match shape {shape}")
        if count == 0:
            tensors[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            continue
        array = np.memmap(path, dtype=dtype, mode="c", offset=base + begin, shape=tuple(shape))
        tensors[name] = torch.from_numpy(array)
    return tensors


class TensorCache:
    """A directory of ``<key>.safetensors`` entries, each with a JSON sidecar ``<key>.json``.

    The sidecar records the payload's sha256 and every tensor's shape. :meth:`load` checks both (and
    the row counts the caller expects) and treats any mismatch, or an unreadable, truncated or
    missing file, as a miss: the entry is recomputed, never trusted, and a one-line warning says which
    entry and why.
    """

    def __init__(self, root: str | os.PathLike, kind: str, *, warn=None):
        self.root = Path(root) / kind
        self.warn = warn or logger.warning

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def _reject(self, key: str, why: str) -> None:
        self.warn(f"cache entry {self.path(key)} not used ({why}); recomputing it")

    def load(
        self, key: str, rows: dict[str, int] | None = None, *, verify: bool = True
    ) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, memory-mapped (pages are read on use, shared with other processes),
        or None when absent or not trustworthy.

        ``rows`` maps tensor names to the number of rows (first dimension) the caller needs; a missing
        tensor or another count rejects the entry. ``verify=False`` skips the checksum (for a process
        whose peer verified the same file a moment ago); shapes and rows are always checked.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path(key).read_text())
            checksum, shapes = meta["sha256"], meta["shapes"]
        except FileNotFoundError:
            self._reject(key, "its metadata file is missing")
            return None
        except KeyError as error:
            self._reject(key, f"its metadata records no {error} (written by an older preftune?)")
            return None
        except (OSError, ValueError, TypeError) as error:
            self._reject(key, f"unreadable metadata: {type(error).__name__}: {error}")
            return None
        if verify:
            try:
                actual = file_sha256(path)
            except OSError as error:
                self._reject(key, f"unreadable: {error}")
                return None
            if actual != checksum:
                self._reject(key, f"sha256 {actual[:12]}… differs from the recorded {str(checksum)[:12]}…")
                return None
        try:
            tensors = map_safetensors(path)
        except Exception as error:  # damaged headers raise several types
            self._reject(key, f"unreadable: {type(error).__name__}: {error}")
            return None
        found = {name: list(t.shape) for name, t in tensors.items()}
        if found != shapes:
            self._reject(key, f"tensor shapes {found} differ from the recorded {shapes}")
            return None
        for name, n in (rows or {}).items():
            if name not in tensors:
                self._reject(key, f"no tensor {name!r}")
                return None
            if tensors[name].dim() == 0 or tensors[name].shape[0] != n:
                self._reject(key, f"{name} has shape {found[name]}, expected {n} rows")
                return None
        return tensors

    def load_agreed(
        self, key: str, rows: dict[str, int] | None = None, *, what: str = ""
    ) -> dict[str, torch.Tensor] | None:
        """:meth:`load`, decided once for all processes: under torch.distributed the main process
        verifies the entry and tells the others, so every rank takes the same branch and runs the
        same collectives afterwards.

        The same exchange checks that every rank computed the same ``key``: processes that see
        different inputs (model files, data, settings) would otherwise write and read different
        entries; they get a :class:`~preftune.distributed.DistributedError` naming ``what`` instead.
        """
        from . import distributed

        if not distributed.is_distributed():
            return self.load(key, rows)
        import torch.distributed as dist

        entry = self.load(key, rows) if distributed.rank() == 0 else None
        seen: list = [None] * distributed.world_size()
        dist.all_gather_object(seen, (key, entry is not None))
        differ = [r for r, (k, _) in enumerate(seen) if k != seen[0][0]]
        if differ:
            raise distributed.DistributedError(
                f"{what or self.root.name}: rank(s) {differ} computed the cache key {seen[differ[0]][0]}, "
                f"rank 0 {seen[0][0]}; every process must see the same inputs (model files, data, settings)"
            )
        if seen[0][1] and entry is None:  # rank 0 checked the checksum a moment ago
            entry = self.load(key, rows, verify=False)
            if entry is None:
                raise RuntimeError(f"rank {distributed.rank()}: cannot read the cache entry {self.path(key)}")
        return entry

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Write the payload, then its sidecar, each atomically; a crash in between leaves a payload
        without matching metadata, which :meth:`load` rejects."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        _write_atomically(path, lambda tmp: save_file(tensors, tmp))
        record = {
            **(meta or {}),
            "format": CACHE_FORMAT,
            "sha256": file_sha256(path),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        _write_atomically(
            self.meta_path(key), lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str))
        )
        return path


# --------------------------------------------------------------------------------------------------
# Listing and cleaning (``preftune cache ls|clear``)

CACHE_KINDS = {
    "models": "presets converted from GGUF (rebuilt on next use, ~1 min each)",
    "references": "reference log-probs and entropies per (model, data) (recomputed on next run)",
    "embeddings": "RPO prompt embeddings (recomputed on next run)",
    "fingerprints": "digests of model weight files (recomputed on next run)",
    "tokens": "tokenized data per (data, tokenizer, max_length) (tokenized again on next run)",
    "answers": "the initial model's greedy answers of `preftune eval --prompts` (generated again next time)",
}
# Files beside the entries that are not entries: locks of concurrent writers, unfinished writes.
_NOT_ENTRIES = (".lock", ".tmp")


def _entries(folder: Path) -> int:
    """Entries of a cache folder: one per key, whatever files it is stored in (``KEY.safetensors`` +
    ``KEY.json``, ``KEY.meta.json``, a ``KEY/`` folder), locks and unfinished writes not counted."""
    return len({p.name.split(".")[0] for p in folder.iterdir() if not p.name.endswith(_NOT_ENTRIES)})


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_usage(root: str | os.PathLike | None = None) -> list[dict]:
    """One row per folder of the cache: kind, path, number of entries, bytes, what it holds."""
    root = Path(root) if root else default_cache_dir()
    rows = []
    if not root.is_dir():
        return rows
    for path in sorted(root.iterdir()):
        if path.name.endswith(_NOT_ENTRIES):
            continue
        rows.append(
            {
                "kind": path.name,
                "path": str(path),
                "entries": _entries(path) if path.is_dir() else 1,
                "bytes": _tree_bytes(path),
                "meaning": CACHE_KINDS.get(path.name, ""),
            }
        )
    return rows


def clear_cache(kinds: Sequence[str] = (), root: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """Remove the named cache folders (all of them when ``kinds`` is empty); returns (path, bytes freed).

    Everything in the cache is derived data: a removed entry is recomputed when next needed.
    """
    import shutil

    root = Path(root) if root else default_cache_dir()
    unknown = [k for k in kinds if k not in CACHE_KINDS]
    if unknown:
        raise ValueError(f"unknown cache kind {unknown[0]!r}; kinds: {', '.join(CACHE_KINDS)}")
    targets = [root / k for k in kinds] if kinds else (sorted(root.iterdir()) if root.is_dir() else [])
    removed = []
    for path in targets:
        if not path.exists():
            continue
        size = _tree_bytes(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append((path, size))
    return removed
