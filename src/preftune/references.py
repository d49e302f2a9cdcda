"""Reference models: each one scores the data as *text*, with its own tokenizer and chat template.

Every model (the policy and each reference) gets a :class:`ModelView`: its tokenizer and the token
ids of every split rendered through its own template. Sequence-level log-probs are all the losses
need, so references with different vocabularies combine directly; no model ever sees another
model's token ids.

Reference scores depend only on the data, so by default they are computed once and cached on disk
(:func:`precompute_references`); :class:`OnlineReferences` scores each batch instead, for data that
cannot be precomputed. Both return the same :class:`ReferenceBatch`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import TensorCache, hash_token_lists, make_key, model_fingerprint
from .data.collate import collate_sequences
from .scoring import score_batch, score_dataset

PAIRED_SIDES = ("chosen", "rejected")
UNPAIRED_SIDES = ("completion",)


@dataclass
class ModelView:
    """One model's view of the data."""

    name: str  # as configured: "policy", a path or a preset name
    path: Path  # local HF directory holding weights + tokenizer
    tokenizer: Any
    chat_template: str | None = None
    dtype: torch.dtype | None = None
    tokenized: dict[str, list] = field(default_factory=dict)  # split -> tokenized examples

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def sequences(self, split: str, side: str, index=None) -> tuple[list[list[int]], list[list[int]]]:
        items = self.tokenized[split]
        if index is not None:
            items = [items[i] for i in index]
        attr = {"chosen": "chosen_ids", "rejected": "rejected_ids", "completion": "completion_ids"}[side]
        return [it.prompt_ids for it in items], [getattr(it, attr) for it in items]

    def token_key(self, split: str, sides: tuple[str, ...]) -> str:
        prompts = self.sequences(split, sides[0])[0]
        return hash_token_lists(prompts, *(self.sequences(split, s)[1] for s in sides))


@dataclass
class ReferenceBatch:
    """Reference quantities for a batch: log-probs [K, B] per side, primary entropies [B] per side."""

    logps: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]


class PrecomputedReferences:
    """Reference scores of whole splits, looked up by example index."""

    def __init__(self, scores: dict[str, dict[str, torch.Tensor]]):
        # scores[split] has "<side>_logps" [K, N] and "<side>_entropy" [N] (primary reference)
        self.scores = scores

    def batch(self, split: str, index: torch.Tensor | list[int], sides: tuple[str, ...]) -> ReferenceBatch:
        data = self.scores[split]
        index = torch.as_tensor(index, dtype=torch.long)
        return ReferenceBatch(
            logps={s: data[f"{s}_logps"][:, index] for s in sides},
            entropy={s: data[f"{s}_entropy"][index] for s in sides},
        )

    def entropies(self, split: str, side: str) -> torch.Tensor:
        return self.scores[split][f"{side}_entropy"]


def _load_reference_model(view: ModelView, device, dtype):
    from .models import load_causal_lm

    model, _ = load_causal_lm(str(view.path), dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    return model


@contextlib.contextmanager
def _as_initial_policy(policy):
    """The policy as it was before training: with LoRA, the base with adapters disabled."""
    if hasattr(policy, "disable_adapter"):
        with policy.disable_adapter():
            yield policy
    else:
        yield policy


def precompute_references(
    views: list[ModelView],
    splits: list[str],
    sides: tuple[str, ...],
    *,
    policy=None,
    cache_root: Path,
    device="cpu",
    autocast_dtype: torch.dtype | None = None,
    batch_tokens: int = 8192,
    progress: bool = True,
    log=print,
    split_labels: dict[str, str] | None = None,
) -> PrecomputedReferences:
    """Score every (reference, split, side) once, reusing cached results when the inputs match.

    ``views[k].name == "policy"`` scores with the in-memory initial ``policy`` (adapters disabled);
    other references are loaded only on a cache miss and freed afterwards.
    """
    cache = TensorCache(cache_root, "references", warn=log)
    out: dict[str, dict[str, list]] = {s: {} for s in splits}
    for k, view in enumerate(views):
        fingerprint = model_fingerprint(view.path)
        model = None
        for split in splits:
            key = make_key(
                role="reference",
                tokens=view.token_key(split, sides),
                model=fingerprint,
                dtype=str(autocast_dtype or view.dtype),
                sides=sides,
            )
            n_rows = len(view.tokenized[split])
            entry = cache.load(
                key, rows={f"{s}_{q}": n_rows for s in sides for q in ("logps", "entropy", "tokens")}
            )
            if entry is None:
                if model is None:
                    model = (
                        policy if view.name == "policy" else _load_reference_model(view, device, view.dtype)
                    )
                bar = tqdm(
                    total=n_rows * len(sides),
                    desc=f"reference {k} ({view.name}) {(split_labels or {}).get(split, split)}",
                    disable=not progress,
                    unit="seq",
                )
                entry = {}
                ctx = _as_initial_policy(model) if view.name == "policy" else contextlib.nullcontext()
                with ctx:
                    for side in sides:
                        prompts, completions = view.sequences(split, side)
                        scores = score_dataset(
                            model,
                            prompts,
                            completions,
                            pad_token_id=view.pad_token_id,
                            batch_tokens=batch_tokens,
                            device=device,
                            with_entropy=True,
                            autocast_dtype=autocast_dtype,
                            progress=bar,
                        )
                        entry[f"{side}_logps"] = scores.logps
                        entry[f"{side}_entropy"] = scores.entropy
                        entry[f"{side}_tokens"] = scores.n_tokens
                bar.close()
                cache.save(key, entry, meta={"reference": view.name, "path": str(view.path), "split": split})
            else:
                label = (split_labels or {}).get(
                    split, split
                )  # e.g. `preftune eval`'s data in the train slot
                log(f"reference {k} ({view.name}) {label}: cached scores reused ({cache.path(key).name})")
            for name, value in entry.items():
                out[split].setdefault(name, []).append(value)
        if model is not None and model is not policy:
            del model
    scores = {
        split: {
            name: (torch.stack(vals) if name.endswith("_logps") else vals[0]) for name, vals in parts.items()
        }
        for split, parts in out.items()
    }
    return PrecomputedReferences(scores)


class OnlineReferences:
    """Scores the references on every batch (no cache): for data that cannot be precomputed."""

    def __init__(self, views: list[ModelView], *, policy, device="cpu", autocast_dtype=None):
        self.views = views
        self.policy = policy
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.models = []
        for view in views:
            if view.name == "policy" and hasattr(policy, "disable_adapter"):
                self.models.append(None)  # the LoRA base, no second copy
            else:
                self.models.append(_load_reference_model(view, device, view.dtype))

    @torch.no_grad()
    def batch(self, split: str, index, sides: tuple[str, ...]) -> ReferenceBatch:
        index = [int(i) for i in index]
        logps: dict[str, list] = {s: [] for s in sides}
        entropy: dict[str, torch.Tensor] = {}
        for k, (view, model) in enumerate(zip(self.views, self.models)):
            prompts, completions = [], []
            for side in sides:
                p, c = view.sequences(split, side, index)
                prompts += p
                completions += c
            batch = collate_sequences(prompts, completions, view.pad_token_id, self.device)
            ctx = _as_initial_policy(self.policy) if model is None else contextlib.nullcontext()
            device_type = torch.device(self.device).type
            with (
                ctx,
                torch.autocast(
                    device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                ),
            ):
                scorer = self.policy if model is None else model
                was_training = scorer.training
                scorer.eval()
                scores = score_batch(scorer, **batch, with_entropy=(k == 0))
                scorer.train(was_training)
            for j, side in enumerate(sides):
                part = slice(j * len(index), (j + 1) * len(index))
                logps[side].append(scores.logps[part].float().cpu())
                if k == 0:
                    entropy[side] = scores.entropy[part].float().cpu()
        return ReferenceBatch(logps={s: torch.stack(v) for s, v in logps.items()}, entropy=entropy)
