"""``preftune precompute``: score the references, entropies and embeddings a run needs, into the
cache, without training (``preftune train`` then reuses them)."""

from __future__ import annotations

from .config import ConfigError, TrainConfig, load_config
from .prepare_run import prepare_run

__all__ = ["precompute"]


def precompute(config, overrides=None) -> None:
    """Score the references, entropies and embeddings a run needs, into the cache, without training."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if cfg.reference_mode != "precompute":
        raise ConfigError("precompute needs reference_mode=precompute")
    prepare_run(cfg)  # its references, dispersion and embeddings stages fill the cache
    print("references, entropies and embeddings are cached; `preftune train` will reuse them")
