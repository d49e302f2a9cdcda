"""Every split of a run's data, loaded, validated and tokenized for the policy and each reference.

Rows dropped for one model (e.g. a prompt over max_length in its tokens, with on_error=skip) are
dropped for all, so example i is the same pair in every model's view.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, TrainConfig
from ..metrics import log
from ..models.loading import POLICY_REFERENCE_TEMPLATE, config_dtype, resolve_causal_lm
from ..models.presets import default_cache_dir
from ..references import ModelView
from ..rundir import tokenizer_dir
from .check import configured_sources, load_split, resolve_source
from .records import LoadedData
from .store import TokenStore, build_token_store, store_key
from .tokenize import tokenize_dataset


@dataclass
class PreparedData:
    splits: list[str]  # "train" and optionally "eval"
    views: list[ModelView]  # views[0] is the policy's; then one per reference (may share the policy's)
    reference_views: list[ModelView]
    unpaired: bool
    report: dict[str, Any]


def _keep(items, rows: np.ndarray, kept_rows: np.ndarray):
    """``items`` restricted to the source rows ``kept_rows`` (both in ascending row order)."""
    if len(rows) == len(kept_rows):
        return items
    positions = np.flatnonzero(np.isin(rows, kept_rows))
    return _take(items, positions)


def prepare_data(
    cfg: TrainConfig,
    policy_tokenizer,
    policy_path: Path,
    unpaired: bool,
    log=log,
    node_first=None,
    loaded: dict[str, LoadedData] | None = None,
    training: bool = True,
) -> PreparedData:
    """Load, validate and tokenize every split for the policy and for each reference's tokenizer.

    Token ids go to memory-mapped :class:`~preftune.data.store.TokenStore` files under
    ``cache_dir/tokens``; ``node_first`` (e.g. ``accelerator.local_main_process_first``) makes the
    first process of each node build them while the others wait, then map the same files.
    ``loaded``: splits already loaded with these settings (``DataCheck.loaded``), used as they are:
    streamed (:class:`~preftune.data.loading.StreamedExamples`), they cost a few numbers per row, and
    the store key comes from the digest computed while loading, so a warm start reads no text again.

    Rows dropped for one model (e.g. a prompt over max_length in its tokens, with on_error=skip) are
    dropped for all, so index i always names the same example in every view. ``training=False``: the
    ``eval`` split alone (a held-out evaluation, :func:`~preftune.data.check.configured_sources`).
    """
    from transformers import AutoTokenizer

    sources = configured_sources(cfg, training=training)
    if loaded is not None:  # loaded (and reported) by preftune.data.check: not read twice
        loaded = dict(loaded)
    else:
        loaded = {}
    for split, (key, source, hf_split) in sources.items():
        if split in loaded:
            continue
        loaded[split] = load_split(cfg, resolve_source(source, key), hf_split, unpaired)
        if loaded[split].skipped:
            log(f"{split}: skipped {len(loaded[split].skipped)} bad rows of {source} (data.on_error=skip)")

    policy_view = ModelView("policy", policy_path, policy_tokenizer, cfg.data.chat_template)
    views = [policy_view]
    reference_views = []
    for k, ref in enumerate(cfg.references or []):
        if ref.model == "policy":
            if ref.chat_template:
                raise ConfigError(POLICY_REFERENCE_TEMPLATE)
            reference_views.append(policy_view)
            continue
        path = resolve_causal_lm(ref.model, f"references[{k}]")
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(path)))
        view = ModelView(ref.model, Path(path), tok, ref.chat_template, dtype=config_dtype(ref.dtype))
        views.append(view)
        reference_views.append(view)
    if not reference_views:
        reference_views = [policy_view]

    report: dict[str, Any] = {}
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    for split, data in loaded.items():
        kept_rows = None
        per_view = []
        for view in views:
            settings = dict(
                max_length=cfg.max_length, on_error=cfg.data.on_error, chat_template=view.chat_template
            )
            key = store_key(data, view.tokenizer, **settings)
            if key is None:  # a tokenizer we cannot fingerprint: tokenized in this process, kept in lists
                items, rep = tokenize_dataset(data, view.tokenizer, progress=cfg.progress, **settings)
                rows = np.fromiter((it.row for it in items), dtype=np.int64, count=len(items))
            else:
                # the first process of each node tokenizes; the others map the files it wrote
                with node_first() if node_first is not None else contextlib.nullcontext():
                    items = build_token_store(
                        data,
                        view.tokenizer,
                        cache_root / "tokens" / key,
                        num_proc=cfg.data.num_proc,
                        progress=cfg.progress,
                        **settings,
                    )
                rep, rows = items.report, items.rows
            per_view.append((items, rows))
            kept_rows = rows if kept_rows is None else np.intersect1d(kept_rows, rows)
            if rep.skipped:
                row, column, reason = rep.skipped[0]
                log(
                    f"{split}: skipped {len(rep.skipped)} row(s) that do not tokenize for {view.name} "
                    f"(data.on_error=skip); first: {data.where(row)}, field '{column}': {reason}"
                )
            if rep.truncated:
                log(
                    f"{split}: {rep.truncated} of {rep.total} rows truncated to max_length={cfg.max_length} "
                    f"for {view.name} (the start is kept)"
                )
            report[f"{split}/{view.name}"] = {
                "total": rep.total,
                "truncated": rep.truncated,
                "skipped": len(rep.skipped),
            }
        for view, (items, rows) in zip(views, per_view):
            view.tokenized[split] = _keep(items, rows, kept_rows)
        if not len(policy_view.tokenized[split]):  # every view keeps the same rows
            raise ConfigError(f"{split}: no usable rows in {sources[split][1]}")
    splits = list(loaded)
    loaded.clear()  # the streamed splits (row offsets) are not needed any more: only the token stores stay
    return PreparedData(splits, views, reference_views, unpaired, report)


VALIDATION_SPLIT = "validation"


def carve_validation(data: PreparedData, fraction: float, seed: int) -> list[int]:
    """Move a seeded ``fraction`` of the training examples into a ``"validation"`` split, in place.

    The same examples leave the training split of every view (so index i still names one pair
    everywhere) and are never trained on. The choice depends only on ``seed`` and the number of
    training examples. Returns the data-file rows of the validation examples.
    """
    import torch

    n = len(data.views[0].tokenized["train"])
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ConfigError(
            f"mrpo.validation_fraction={fraction}: {n_val} validation rows would leave no training rows of {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = np.zeros(n, dtype=bool)
    held[order[:n_val]] = True
    for view in data.views:
        view.tokenized[VALIDATION_SPLIT] = _take(view.tokenized["train"], np.flatnonzero(held))
        view.tokenized["train"] = _take(view.tokenized["train"], np.flatnonzero(~held))
    if VALIDATION_SPLIT not in data.splits:
        data.splits.insert(data.splits.index("train") + 1, VALIDATION_SPLIT)
    return [it.row for it in data.views[0].tokenized[VALIDATION_SPLIT]]


def _take(items, positions: np.ndarray):
    """The examples at ``positions`` (ascending), from a token store or a list."""
    if isinstance(items, TokenStore):
        return items.select(positions)
    return [items[int(i)] for i in positions]
