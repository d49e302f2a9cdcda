"""On-disk cache of per-sequence reference scores and prompt embeddings, keyed by fingerprints.

A key hashes everything the cached numbers depend on: the exact token ids each model sees (which
covers the data, the tokenizer, the chat template and max_length), a digest of the model's weight
files, and the scoring dtype. Change any of them and the key changes; nothing is ever invalidated by
hand. Files are written to a temporary name and renamed, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models.presets import MANIFEST_NAME, default_cache_dir  # one definition of the cache root

CACHE_FORMAT = 1  # bump when the meaning of cached numbers changes


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
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # memoising is an optimisation only
    return digest


def make_key(**parts: object) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class TensorCache:
    """A directory of ``<key>.safetensors`` entries with a JSON sidecar describing each."""

    def __init__(self, root: str | os.PathLike, kind: str):
        self.root = Path(root) / kind

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception:  # a damaged entry is recomputed, never trusted
            return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        if meta is not None:
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
        return path
