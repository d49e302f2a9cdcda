"""One training step's pieces, shared by the trainer and the benchmark (bench/workers.py).

A micro-batch goes: the rows' token ids and reference scores -> a :class:`MicroBatch`
(:func:`micro_batch`) -> a padded batch (one row per sequence, or one row per pair with a shared
prompt) -> the policy's per-sequence log-probs and completion lengths, per side (:class:`SideScores`)
-> (with a global contrast scope, gathered over processes) -> the configured method's loss
(:func:`micro_batch_loss`, through :class:`~preftune.method_adapter.LossAdapter`). Then the
optimiser update. The math of each method is docs/methods.md's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .data.collate import collate_sequences, collate_shared_prompt_pairs
from .losses import LossOutput
from .method_adapter import LossAdapter, SideScores
from .references import MISMATCHED_SIDE, ModelView, read_rows
from .scoring import SequenceScores, score_batch


class DataOrder:
    """Which training rows each optimiser step reads, on this process.

    One seeded permutation per epoch (``seed + epoch``); step ``pos`` of an epoch takes the next
    ``batch_size × processes × grad_accum`` of it, and each micro-batch is split over the processes.
    The permutation is kept as an int64 tensor (8 bytes a row) and built once per epoch, so a
    300k-row run neither holds a list of Python ints nor rebuilds it every step.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        steps_per_epoch: int,
        batch_size: int,
        grad_accum: int,
        processes: int,
        rank: int,
    ):
        self.n, self.seed, self.steps_per_epoch = n, seed, steps_per_epoch
        self.batch_size, self.grad_accum, self.processes, self.rank = batch_size, grad_accum, processes, rank
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def __call__(self, step: int) -> list[list[int]]:
        """This process's row indices for each micro-batch of optimiser step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        micro = self.batch_size * self.processes
        chunk = self._permutation(epoch)[pos * micro * self.grad_accum : (pos + 1) * micro * self.grad_accum]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [chunk[m * micro : (m + 1) * micro][mine].tolist() for m in range(self.grad_accum)]


class PolicyScorer(nn.Module):
    """Wraps the policy so that DDP sees one forward: chunked per-sequence log-probs.

    ``autocast_dtype`` runs the forward under autocast, for callers without accelerate (which
    otherwise wraps the forward itself).
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 0, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.autocast_dtype = autocast_dtype

    def forward(self, with_entropy: bool = False, **batch) -> SequenceScores:
        """A batch from ``collate_sequences`` or ``collate_shared_prompt_pairs`` -> its
        :class:`~preftune.scoring.SequenceScores` (``with_wpo=True`` and ``tail_from=[N]`` in the
        batch add the method's modifiers; ``with_entropy`` the entropies, for online references through
        a sharded policy, which only its root may run)."""
        device_type = batch["input_ids"].device.type
        dtype = self.autocast_dtype
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None) if dtype else nullcontext():
            return score_batch(self.model, **batch, chunk_tokens=self.chunk_tokens, with_entropy=with_entropy)


@dataclass
class StepInputs:
    """Per-example tensors for the whole dataset that the loss may need, indexed by example."""

    dispersion_c: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N, d]


@dataclass
class MicroBatch:
    """Everything one micro-batch's loss needs; :func:`micro_batch` builds it from a run's data.

    ``prompts``/``completions`` hold the first side's B rows of token ids, then the next side's.
    """

    prompts: list[list[int]]
    completions: list[list[int]]
    sides: tuple[str, ...]
    reference: SideScores  # [K, B] log-probs per side (zeros [1, B] without a reference)
    pad_token_id: int
    device: torch.device
    share: bool = False  # prompt sharing: one ``prompt | chosen | rejected`` row per pair
    dispersion: torch.Tensor | None = None  # MallowsPO's c(x) [B]
    embeddings: torch.Tensor | None = None  # RPO's prompt embeddings [B, d]
    labels: torch.Tensor | None = None  # unpaired data: which items are desirable [B]
    tail_from: list[int] | None = None  # LD-DPO: each scored row's shared completion length
    gather: Any = None  # an accelerate Accelerator: gather over processes first (global contrast scope)


class StepLoss(NamedTuple):
    """What :func:`micro_batch_loss` returns."""

    output: LossOutput
    tokens: int  # prompt + completion tokens scored (a shared prompt counts twice)
    policy: SideScores
    reference: SideScores


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph: the backward reduce-scatters (sums) every
    process's gradient of the gathered tensor into each local part, as
    ``torch.distributed.nn.functional.all_gather`` (deprecated) did. Through PyTorch's functional
    collectives, the API that deprecation names (``all_gather_single_autograd``; torch releases before
    it have ``all_gather_tensor_autograd``). Every process must pass the same shape."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gathered = gather(local.contiguous(), 0, dist.group.WORLD)
    return funcol.wait_tensor(gathered) if isinstance(gathered, funcol.AsyncCollectiveTensor) else gathered


SHARE_PROMPT_MIN_SAVING = 0.25


def sharing_pays(prompts: Sequence[Sequence[int]], chosen: Sequence, rejected: Sequence) -> bool:
    """Whether shared-prompt rows are worth it for these pairs (automatic ``share_prompt``).

    True when the prompts' second copies are at least SHARE_PROMPT_MIN_SAVING of the two-row
    batch's tokens. Measured on a 2-core CPU (SmolLM2-135M, 4 pairs of 256 tokens, forward +
    backward): a 37.5 % saving made the step 0.66x as long; 12.5 % broke even, because attention
    under a custom mask over the longer rows costs more than causal attention over the short ones
    (bench/NOTES.md).
    """
    saved = sum(len(p) for p in prompts)
    total = 2 * saved + sum(len(c) for c in chosen) + sum(len(r) for r in rejected)
    return saved >= SHARE_PROMPT_MIN_SAVING * total


def shares_prompt(share_prompt: bool | None, prompts: list, completions: list) -> bool:
    """Whether a paired micro-batch (chosen rows, then rejected rows) goes as shared-prompt rows.

    ``share_prompt`` True/False forces it; None decides by :func:`sharing_pays`.
    """
    pairs = len(prompts) // 2
    if not all(prompts[:pairs]):  # an empty prompt has nothing to share (and no position to predict from)
        return False
    if share_prompt is not None:
        return share_prompt
    return sharing_pays(prompts[:pairs], completions[:pairs], completions[pairs:])


def micro_batch(
    view: ModelView,
    references,
    inputs: StepInputs,
    split: str,
    index: list[int],
    *,
    sides: tuple[str, ...],
    share_prompt: bool | None,
    tails: bool,
    device,
    gather=None,
) -> MicroBatch:
    """The micro-batch of examples ``index`` of ``split``: the policy's token ids (``view``) and the
    reference scores (``references``: precomputed, online, or None without a reference), read in one
    call (:func:`~preftune.references.read_rows`), the per-example inputs of the method, and whether
    the prompts are shared (``share_prompt``: see :func:`shares_prompt`).

    ``tails``: LD-DPO's tails are asked for; ``gather``: see :class:`MicroBatch`.
    """
    rows = read_rows(view, references, split, index, sides, tails=tails)
    size = len(index)
    if rows.reference is None:
        reference = SideScores({side: torch.zeros(1, size, device=device) for side in sides})
    else:
        reference = SideScores(
            {side: rows.reference.logps[side].to(device) for side in sides},
            tail={side: tail.to(device) for side, tail in rows.reference.tail.items()},
        )
    index_tensor = torch.tensor(index)
    dispersion = inputs.dispersion_c[split][index_tensor].to(device) if split in inputs.dispersion_c else None
    embeddings = inputs.embeddings[split][index_tensor].to(device) if split in inputs.embeddings else None
    return MicroBatch(
        rows.prompts,
        rows.completions,
        sides,
        reference,
        rows.pad_token_id,
        device,
        share=shares_prompt(share_prompt, rows.prompts, rows.completions),
        dispersion=dispersion,
        embeddings=embeddings,
        labels=None if rows.labels is None else torch.tensor(rows.labels, device=device),
        tail_from=None if rows.shared_lengths is None else rows.shared_lengths * 2,
        gather=gather,
    )


def score_sides(
    scorer: nn.Module,
    prompts: list,
    completions: list,
    sides: tuple[str, ...],
    pad_token_id: int,
    device,
    *,
    share: bool,
    grad: bool,
    with_wpo: bool = False,
    tail_from: list[int] | None = None,
) -> SideScores:
    """The policy's log-probs and completion token counts per side, each [B].

    ``prompts``/``completions`` hold the first side's B rows, then the next side's; ``share`` puts
    each pair into one ``prompt | chosen | rejected`` row (paired data only). ``with_wpo`` /
    ``tail_from`` (one count per row) add WPO's aligned sums / LD-DPO's tails.
    """
    if share:
        pairs = len(prompts) // 2
        batch = collate_shared_prompt_pairs(
            prompts[:pairs], completions[:pairs], completions[pairs:], pad_token_id, device
        )
    else:
        batch = collate_sequences(prompts, completions, pad_token_id, device)
    if with_wpo:
        batch["with_wpo"] = True
    if tail_from is not None:
        batch["tail_from"] = torch.tensor(tail_from, device=device)
    with nullcontext() if grad else torch.no_grad():
        scores = scorer(**batch)
    size = len(prompts) // len(sides)

    def per_side(values: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if values is None:
            return {}
        return {side: values[j * size : (j + 1) * size] for j, side in enumerate(sides)}

    return SideScores(
        per_side(scores.logps), per_side(scores.n_tokens), per_side(scores.wpo), per_side(scores.tail)
    )


def _gathered(scores: SideScores, gather, *, policy: bool) -> SideScores:
    """``scores`` gathered over processes: the policy's log-probs keep their graph; a reference's
    ``[K, B]`` tensors are gathered along B."""

    def per_side(values: dict[str, torch.Tensor], how) -> dict[str, torch.Tensor]:
        return {side: how(tensor) for side, tensor in values.items()}

    def along_batch(tensor: torch.Tensor) -> torch.Tensor:  # [K, B]: gathered along B
        return gather.gather(tensor.T.contiguous()).T

    how = gather_with_grad if policy else along_batch
    return SideScores(
        per_side(scores.logps, how),
        per_side(scores.lengths, gather.gather),
        per_side(scores.wpo, gather_with_grad),
        per_side(scores.tail, how),
    )


def micro_batch_loss(
    scorer: nn.Module, adapter: LossAdapter, batch: MicroBatch, *, grad: bool = True
) -> StepLoss:
    """Score one micro-batch with the policy (``scorer``, a :class:`PolicyScorer`) and compute the
    method's loss (``adapter``); ``grad=False`` scores without gradient (evaluation).

    ``batch.gather`` (an accelerate Accelerator) gathers every per-example tensor over processes
    first, for a global contrast scope: every process then computes the same loss, all_gather's
    backward sums their gradients into each local part (P x) and DDP's average divides by P, so the
    gathered loss needs no rescaling.

    The method's extra inputs: a last side :data:`MISMATCHED_SIDE` (KTO's mismatched items) is scored
    without gradient; ``batch.tail_from`` (per row of the scored sides) asks for LD-DPO's tails; WPO's
    aligned sums come when ``adapter.wpo`` is set.
    """
    prompts, completions, sides = batch.prompts, batch.completions, batch.sides
    mismatched = sides[-1] == MISMATCHED_SIDE
    if mismatched:  # only KTO's reference point uses them: no gradient, no activations kept
        scored = len(prompts) // len(sides) * (len(sides) - 1)
        prompts, completions, sides = prompts[:scored], completions[:scored], sides[:-1]
    policy = score_sides(
        scorer,
        prompts,
        completions,
        sides,
        batch.pad_token_id,
        batch.device,
        share=batch.share,
        grad=grad,
        with_wpo=adapter.wpo,
        tail_from=batch.tail_from,
    )
    if mismatched:  # its log-probs and lengths join the scored sides' (no WPO sums, no tails)
        mismatched_scores = score_sides(
            scorer,
            batch.prompts[scored:],
            batch.completions[scored:],
            (MISMATCHED_SIDE,),
            batch.pad_token_id,
            batch.device,
            share=False,
            grad=False,
        )
        policy.logps.update(mismatched_scores.logps)
        policy.lengths.update(mismatched_scores.lengths)
    reference, labels = batch.reference, batch.labels
    dispersion, embeddings = batch.dispersion, batch.embeddings
    if batch.gather is not None:
        gather = batch.gather
        policy = _gathered(policy, gather, policy=True)
        reference = _gathered(reference, gather, policy=False)
        labels = gather.gather(labels) if labels is not None else None
        dispersion = gather.gather(dispersion) if dispersion is not None else None
        embeddings = gather.gather(embeddings) if embeddings is not None else None
    output = adapter(policy, reference, labels=labels, dispersion=dispersion, embeddings=embeddings)
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))  # a shared prompt counts twice
    return StepLoss(output, tokens, policy, reference)


def make_optimizer(
    params, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, device
):
    """AdamW as the trainer uses it: one fused kernel per step on CPU and CUDA (TRL's adamw_torch_fused)."""
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        fused=torch.device(device).type in ("cpu", "cuda") or None,
    )


def apply_update(optimizer, scheduler, params, max_grad_norm: float, clip=torch.nn.utils.clip_grad_norm_):
    """Clip (when max_grad_norm > 0), step optimizer and scheduler, clear gradients.

    Returns (grad norm before clipping or None, the learning rate this step used or None).
    ``clip`` is accelerate's ``clip_grad_norm_`` in the trainer (it unscales fp16 gradients first).
    """
    grad_norm = clip(params, max_grad_norm) if max_grad_norm > 0 else None
    lr = scheduler.get_last_lr()[0] if scheduler is not None else None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
