"""Every split of a run's data, loaded, validated and tokenized for the policy and each reference.

Rows dropped for one model (e.g. a prompt over max_length in its tokens, with on_error=skip) are
dropped for all, so example i is the same pair in every model's view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig, to_dict
from ..metrics import log
from ..models.loading import config_dtype, resolve_causal_lm
from ..references import ModelView
from .loading import load_examples
from .records import Columns
from .tokenize import tokenize_dataset


def resolve_data_source(source: str) -> str:
    """`builtin:arithmetic-train` / `builtin:arithmetic-test` name the bundled arithmetic pairs."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in ("arithmetic-train", "arithmetic-test"):
            from .arithmetic import arithmetic_path

            return str(arithmetic_path(name.split("-")[1]))
        raise ConfigError(
            f"unknown builtin dataset {source!r} (have builtin:arithmetic-train, builtin:arithmetic-test)"
        )
    return source


@dataclass
class PreparedData:
    splits: list[str]  # "train" and optionally "eval"
    views: list[ModelView]  # views[0] is the policy's; then one per reference (may share the policy's)
    reference_views: list[ModelView]
    unpaired: bool
    report: dict[str, Any]


def prepare_data(
    cfg: TrainConfig, policy_tokenizer, policy_path: Path, unpaired: bool, log=log
) -> PreparedData:
    """Load, validate and tokenize every split for the policy and for each reference's tokenizer.

    Rows dropped for one model (e.g. a prompt over max_length in its tokens, with on_error=skip) are
    dropped for all, so index i always names the same example in every view.
    """
    from transformers import AutoTokenizer

    columns = Columns(**to_dict(cfg.data.columns))
    sources = {"train": (cfg.data.train, cfg.data.train_split)}
    if cfg.data.eval:
        sources["eval"] = (cfg.data.eval, cfg.data.eval_split)
    if not cfg.data.train:
        raise ConfigError("data.train is required (a file, a folder, a hub name or builtin:arithmetic-train)")
    loaded = {}
    for split, (source, hf_split) in sources.items():
        loaded[split] = load_examples(
            resolve_data_source(source),
            unpaired=unpaired,
            columns=columns,
            on_error=cfg.data.on_error,
            split=hf_split,
            max_rows=cfg.data.max_rows,
        )
        if loaded[split].skipped:
            log(f"{split}: skipped {len(loaded[split].skipped)} bad rows of {source} (data.on_error=skip)")

    policy_view = ModelView("policy", policy_path, policy_tokenizer, cfg.data.chat_template)
    views = [policy_view]
    reference_views = []
    for k, ref in enumerate(cfg.references or []):
        if ref.model == "policy":
            if ref.chat_template:
                raise ConfigError("references: the `policy` reference always uses the policy's chat template")
            reference_views.append(policy_view)
            continue
        path = resolve_causal_lm(ref.model, f"references[{k}]")
        tok = AutoTokenizer.from_pretrained(str(path))
        view = ModelView(ref.model, Path(path), tok, ref.chat_template, dtype=config_dtype(ref.dtype))
        views.append(view)
        reference_views.append(view)
    if not reference_views:
        reference_views = [policy_view]

    report: dict[str, Any] = {}
    for split, data in loaded.items():
        kept_rows = None
        per_view = []
        for view in views:
            items, rep = tokenize_dataset(
                data,
                view.tokenizer,
                max_length=cfg.max_length,
                on_error=cfg.data.on_error,
                chat_template=view.chat_template,
                progress=cfg.progress,
            )
            per_view.append(items)
            rows = {it.row for it in items}
            kept_rows = rows if kept_rows is None else kept_rows & rows
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
        for view, items in zip(views, per_view):
            view.tokenized[split] = [it for it in items if it.row in kept_rows]
        if not view.tokenized[split]:
            raise ConfigError(f"{split}: no usable rows in {sources[split][0]}")
    return PreparedData(list(loaded), views, reference_views, unpaired, report)


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
    held = set(order[:n_val])
    for view in data.views:
        items = view.tokenized["train"]
        view.tokenized[VALIDATION_SPLIT] = [it for i, it in enumerate(items) if i in held]
        view.tokenized["train"] = [it for i, it in enumerate(items) if i not in held]
    if VALIDATION_SPLIT not in data.splits:
        data.splits.insert(data.splits.index("train") + 1, VALIDATION_SPLIT)
    return [it.row for it in data.views[0].tokenized[VALIDATION_SPLIT]]
