"""Reference models: each one scores the data as *text*, with its own tokenizer and chat template.

Every model (the policy and each reference) gets a :class:`ModelView`: its tokenizer and the token
ids of every split rendered through its own template. Sequence-level log-probs are all the losses
need, so references with different vocabularies combine directly; no model ever sees another
model's token ids.

Reference scores depend only on the data, so by default they are computed once and cached on disk
(:func:`precompute_references`); :class:`OnlineReferences` scores each batch instead, for data that
cannot be precomputed. Both return the same :class:`ReferenceBatch`. A training step reads its
examples' token ids and reference scores in one call, :func:`read_rows`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .cache import TensorCache, hash_token_lists, make_key, model_fingerprint
from .data.collate import collate_sequences
from .data.store import TokenStore
from .progress import bar as progress_bar
from .scoring import score_batch, score_dataset

PAIRED_SIDES = ("chosen", "rejected")
UNPAIRED_SIDES = ("completion",)
#: KTO's mismatched items: each prompt with the completion of the split's previous item (see
#: :meth:`ModelView.sequences`); scored like a side, used only for KTO's reference point.
MISMATCHED_SIDE = "kl"


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

    def _columns(self, split: str) -> TokenStore | _TokenList:
        """``split``'s tokenized examples behind a token store's column methods (a store already has
        them; a list, tokenized in this process, gets them from :class:`_TokenList`)."""
        items = self.tokenized[split]
        return items if isinstance(items, TokenStore) else _TokenList(items)

    def sequences(self, split: str, side: str, index=None) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and completion ids of ``side`` for the items ``index`` (all by default), as lists.

        Side ``kl`` pairs item i's prompt with item (i − 1)'s completion (mod N): TRL's KTO rotates
        the completions of each batch of the dataset by one in the same way, before shuffling.
        """
        if side == MISMATCHED_SIDE:
            n = len(self.tokenized[split])
            index = list(range(n) if index is None else index)
            prompts, _ = self.sequences(split, "completion", index)
            _, completions = self.sequences(split, "completion", [(i - 1) % n for i in index])
            return prompts, completions
        columns = self._columns(split)
        return columns.ids("prompt", index), columns.ids(side, index)

    def batch_sequences(self, split: str, sides, index) -> tuple[list[list[int]], list[list[int]]]:
        """:meth:`sequences` of each side in turn: the first side's rows, then the next side's."""
        prompts, completions = [], []
        for side in sides:
            side_prompts, side_completions = self.sequences(split, side, index)
            prompts += side_prompts
            completions += side_completions
        return prompts, completions

    def shared_lengths(self, split: str, index=None) -> list[int]:
        """LD-DPO: each pair's shared completion length ``min(|y_w|, |y_l|)`` in this model's tokens."""
        chosen = self.sequences(split, "chosen", index)[1]
        rejected = self.sequences(split, "rejected", index)[1]
        return [min(len(c), len(r)) for c, r in zip(chosen, rejected)]

    def prompt_texts(self, split: str) -> Sequence[str]:
        """The rendered prompts of ``split`` (lazily decoded from a token store)."""
        return self._columns(split).prompt_texts

    def labels(self, split: str, index) -> list[bool]:
        """Unpaired labels of the examples ``index``."""
        return [bool(label) for label in self._columns(split).labels(index)]

    def token_key(self, split: str, sides: tuple[str, ...]) -> str:
        # KTO's mismatched side is the completions rotated by one: those and the rule name it
        columns = [s for s in sides if s != MISMATCHED_SIDE]
        suffix = "+kl-rotated-by-1" if len(columns) < len(sides) else ""
        # a store streams the digest from its files; a list hashes its ids (the same digest)
        return self._columns(split).token_key(["prompt", *columns]) + suffix


class _TokenList:
    """A list of tokenized examples with the column methods of a
    :class:`~preftune.data.store.TokenStore` (``ids``, ``prompt_texts``, ``labels``, ``token_key``)."""

    _ID_FIELDS = {
        "prompt": "prompt_ids",
        "chosen": "chosen_ids",
        "rejected": "rejected_ids",
        "completion": "completion_ids",
    }

    def __init__(self, items: list):
        self.items = items

    def ids(self, column: str, index=None) -> list[list[int]]:
        items = self.items if index is None else [self.items[i] for i in index]
        return [getattr(it, self._ID_FIELDS[column]) for it in items]

    @property
    def prompt_texts(self) -> list[str]:
        return [it.prompt_text for it in self.items]

    def labels(self, index) -> list:
        return [self.items[i].label for i in index]

    def token_key(self, columns: Sequence[str]) -> str:
        return hash_token_lists(*(self.ids(column) for column in columns))


@dataclass
class ReferenceBatch:
    """Reference quantities for a batch: log-probs [K, B] per side, primary entropies [B] per side,
    and (LD-DPO, precomputed) the log-probs [K, B] beyond each pair's shared length per side."""

    logps: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]
    tail: dict[str, torch.Tensor] = field(default_factory=dict)


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
            tail={s: data[f"{s}_tail"][:, index] for s in sides if f"{s}_tail" in data},
        )

    def entropies(self, split: str, side: str) -> torch.Tensor:
        return self.scores[split][f"{side}_entropy"]


@dataclass
class Rows:
    """What one micro-batch reads of its examples (:func:`read_rows`)."""

    prompts: list[list[int]]  # the policy's prompt ids: the first side's B rows, then the next side's
    completions: list[list[int]]  # the policy's completion ids, in the same order
    pad_token_id: int  # the policy's
    reference: ReferenceBatch | None  # None: the run has no reference
    labels: list[bool] | None = None  # unpaired data: which examples are desirable
    shared_lengths: list[int] | None = None  # LD-DPO: each pair's shared completion length


def read_rows(
    view: ModelView, references, split: str, index: list[int], sides: tuple[str, ...], *, tails: bool = False
) -> Rows:
    """Everything a micro-batch reads of the examples ``index`` of ``split``, in one call: the token ids
    of each side in ``view`` (the policy's), their reference scores (``references``: precomputed,
    online, or None without a reference), unpaired labels when ``sides`` are unpaired and, ``tails``
    (LD-DPO), each pair's shared completion length."""
    prompts, completions = view.batch_sequences(split, sides, index)
    return Rows(
        prompts,
        completions,
        view.pad_token_id,
        None if references is None else references.batch(split, index, sides),
        labels=view.labels(split, index) if UNPAIRED_SIDES[0] in sides else None,
        shared_lengths=view.shared_lengths(split, index) if tails else None,
    )


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


def _score_rows(
    model, view: ModelView, split: str, sides, index, *, chunk_rows: int, tails: bool = False, **kwargs
):
    """Scores of the examples ``index`` for every side, in chunks of ``chunk_rows`` examples so that
    only one chunk's token ids exist as Python lists at a time. ``tails`` (LD-DPO): also the log-prob
    beyond each pair's shared length."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(index), chunk_rows):
        chunk = index[start : start + chunk_rows]
        for side in sides:
            prompts, completions = view.sequences(split, side, chunk)
            tail_from = view.shared_lengths(split, chunk) if tails else None
            scores = score_dataset(
                model, prompts, completions, pad_token_id=view.pad_token_id, tail_from=tail_from, **kwargs
            )
            if tails:
                parts.setdefault(f"{side}_tail", []).append(scores.tail)
            parts.setdefault(f"{side}_logps", []).append(scores.logps)
            parts.setdefault(f"{side}_entropy", []).append(scores.entropy)
            parts.setdefault(f"{side}_tokens", []).append(scores.n_tokens)
    return {name: torch.cat(values) for name, values in parts.items()}


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    chunk_rows: int = 16384,
    progress: bool = True,
    log=print,
    tails: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> PrecomputedReferences:
    """Score every (reference, split, side) once, reusing cached results when the inputs match.

    ``views[k].name == "policy"`` scores with the in-memory initial ``policy`` (adapters disabled);
    other references are loaded only on a cache miss and freed before the next one. ``tails`` (LD-DPO) also
    stores ``<side>_tail``: the log-prob beyond each pair's shared length (a separate cache entry). Under
    torch.distributed every process calls this: each scores its own rows (``rank::world``), the main
    process merges them into the one cache entry a single process would write (same key, same rows)
    and the others wait for it (a barrier with ``timeout_s``). Every process then reads the entry
    memory-mapped. A cache hit loads no model on any process.
    """
    cache = TensorCache(cache_root, "references", warn=log)
    main = distributed.rank() == 0
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
                **({"tails": "shared_length"} if tails else {}),
            )
            n_rows = len(view.tokenized[split])
            quantities = ("logps", "entropy", "tokens", *(("tail",) if tails else ()))
            rows = {f"{s}_{q}": n_rows for s in sides for q in quantities}
            entry = cache.load_agreed(key, rows, what=f"reference {k} ({view.path}) {split}")
            if entry is None:
                if model is None:
                    model = (
                        policy if view.name == "policy" else _load_reference_model(view, device, view.dtype)
                    )
                # an FSDP-sharded policy runs collectives in every forward: then every rank makes the
                # same forwards over all rows (no speed-up, but no rank waits for another)
                sharded = _is_sharded(model)
                mine = (
                    range(n_rows) if sharded else range(distributed.rank(), n_rows, distributed.world_size())
                )
                bar = progress_bar(
                    total=len(mine) * len(sides),
                    desc=f"reference {k} ({view.name}) {split}",
                    enabled=progress,
                    unit="seq",
                )
                ctx = _as_initial_policy(model) if view.name == "policy" else contextlib.nullcontext()
                score = functools.partial(
                    _score_rows,
                    model,
                    view,
                    split,
                    sides,
                    chunk_rows=chunk_rows,
                    tails=tails,
                    batch_tokens=batch_tokens,
                    device=device,
                    with_entropy=True,
                    autocast_dtype=autocast_dtype,
                    progress=bar,
                )
                with ctx:
                    if sharded:
                        merged = score(mine)
                    else:  # each rank its share (the same rows as ``mine``), merged on rank 0
                        merged = distributed.scatter_score(n_rows, score, to_all=False)
                bar.close()
                meta = {"reference": view.name, "path": str(view.path), "split": split}
                if main:
                    cache.save(key, merged, meta=meta)
                del merged
                distributed.barrier(f"reference {k} ({view.name}) {split}: cache write", timeout_s)
                entry = cache.load(key, rows=rows, verify=main)  # memory-mapped, on every process
                if entry is None:
                    raise RuntimeError(
                        f"the reference scores just written to {cache.path(key)} cannot be read"
                    )
            else:
                log(f"reference {k} ({view.name}) {split}: cached scores reused ({cache.path(key).name})")
            for name, value in entry.items():
                out[split].setdefault(name, []).append(value)
        if model is not None and model is not policy:
            _free(model)  # one reference model in memory at a time
        model = None
    scores = {
        split: {
            name: _stack_rows(vals) if name.endswith(("_logps", "_tail")) else vals[0]
            for name, vals in parts.items()
        }
        for split, parts in out.items()
    }
    return PrecomputedReferences(scores)


def _stack_rows(values: list[torch.Tensor]) -> torch.Tensor:
    """[K, N] from K memory-mapped [N] tensors; one reference stays a view of its file (no copy)."""
    return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)


class OnlineReferences:
    """Scores the references on every batch (no cache): for data that cannot be precomputed."""

    def __init__(self, views: list[ModelView], *, policy, device="cpu", autocast_dtype=None):
        self.views = views
        self.policy = policy
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.policy_root = None  # the sharded PolicyScorer under parallelism=fsdp (set by the trainer)
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
            prompts, completions = view.batch_sequences(split, sides, index)
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
                if model is None and self.policy_root is not None:  # FSDP: only the root may run
                    scores = self.policy_root(**batch, with_entropy=True)
                else:
                    scores = score_batch(scorer, **batch, with_entropy=(k == 0))
                scorer.train(was_training)
            for j, side in enumerate(sides):
                part = slice(j * len(index), (j + 1) * len(index))
                logps[side].append(scores.logps[part].float().cpu())
                if k == 0:
                    entropy[side] = scores.entropy[part].float().cpu()
        return ReferenceBatch(logps={s: torch.stack(v) for s, v in logps.items()}, entropy=entropy)
