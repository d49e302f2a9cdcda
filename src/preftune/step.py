"""One training step's pieces, shared by the trainer and the benchmark (bench/workers.py).

A micro-batch goes: token ids -> a batch (one row per sequence, or one row per pair with a shared
prompt) -> the policy's per-sequence log-probs and completion lengths, per side -> (with a global
contrast scope, gathered over processes) -> the configured method's loss. Then the optimiser
update. The math of each method is docs/methods.md's; :class:`LossComputer` maps a config onto
:func:`preftune.losses.preference_loss`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses as L
from .config import TrainConfig
from .data.collate import collate_sequences, collate_shared_prompt_pairs
from .scoring import score_batch, sharing_pays


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

    def forward(self, with_entropy: bool = False, **batch):
        """A batch from ``collate_sequences`` or ``collate_shared_prompt_pairs``.

        Returns ``(logps, n_tokens)``, plus ``{"wpo": ..., "tail": ...}`` when the batch asks for them
        (``with_wpo=True``, ``tail_from=[N]``: the method's modifiers, see :func:`score_batch`).
        ``with_entropy``: the whole :class:`preftune.scoring.SequenceScores` instead, entropies
        included (online references through a sharded policy, which only its root may run).
        """
        device_type = batch["input_ids"].device.type
        dtype = self.autocast_dtype
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None) if dtype else nullcontext():
            scores = score_batch(
                self.model, **batch, chunk_tokens=self.chunk_tokens, with_entropy=with_entropy
            )
        if with_entropy:
            return scores
        extras = {k: v for k, v in (("wpo", scores.wpo), ("tail", scores.tail)) if v is not None}
        return (scores.logps, scores.n_tokens, extras) if extras else (scores.logps, scores.n_tokens)


@dataclass
class StepInputs:
    """Per-example tensors for the whole dataset that the loss may need, indexed by example."""

    dispersion_c: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N, d]


class LossComputer:
    """Turns per-sequence tensors of a micro-batch into the configured method's LossOutput.

    A thin shell over :class:`preftune.method_adapter.LossAdapter`, which derives everything from the
    method registry (``spec`` and ``unpaired`` are kept in the signature for the callers).
    """

    def __init__(self, cfg: TrainConfig, spec: dict, num_references: int, unpaired: bool):
        from .method_adapter import LossAdapter

        self.adapter = LossAdapter.from_config(cfg, num_references)
        self.length_normalize = self.adapter.length_normalize

    def __call__(self, policy, lengths, refs, c=None, embeddings=None) -> L.LossOutput:
        return self.adapter(policy, lengths, refs, c=c, embeddings=embeddings)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph (gradient flows back to the local part)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(all_gather(x), dim=0)


def shares_prompt(share_prompt: bool | None, prompts: list, completions: list) -> bool:
    """Whether a paired micro-batch (chosen rows, then rejected rows) goes as shared-prompt rows.

    ``share_prompt`` True/False forces it; None decides by :func:`preftune.scoring.sharing_pays`.
    """
    b = len(prompts) // 2
    if not all(prompts[:b]):  # an empty prompt has nothing to share (and no position to predict from)
        return False
    if share_prompt is not None:
        return share_prompt
    return sharing_pays(prompts[:b], completions[:b], completions[b:])


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
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The policy's log-probs and completion token counts per side, each [B].

    ``prompts``/``completions`` hold the first side's B rows, then the next side's; ``share`` puts
    each pair into one ``prompt | chosen | rejected`` row (paired data only). ``with_wpo`` /
    ``tail_from`` (one count per row) add ``<side>_wpo`` / ``<side>_tail`` entries (WPO, LD-DPO).
    """
    b = len(prompts) // len(sides)
    if share:
        batch = collate_shared_prompt_pairs(
            prompts[:b], completions[:b], completions[b:], pad_token_id, device
        )
    else:
        batch = collate_sequences(prompts, completions, pad_token_id, device)
    if with_wpo:
        batch["with_wpo"] = True
    if tail_from is not None:
        batch["tail_from"] = torch.tensor(tail_from, device=device)
    with nullcontext() if grad else torch.no_grad():
        out = scorer(**batch)
    logps, n_tok = out[0], out[1]
    policy = {s: logps[j * b : (j + 1) * b] for j, s in enumerate(sides)}
    for name, values in (out[2] if len(out) > 2 else {}).items():
        policy.update({f"{s}_{name}": values[j * b : (j + 1) * b] for j, s in enumerate(sides)})
    lengths = {s: n_tok[j * b : (j + 1) * b] for j, s in enumerate(sides)}
    return policy, lengths


def micro_batch_loss(
    scorer: nn.Module,
    loss_fn: LossComputer,
    prompts: list,
    completions: list,
    refs: dict[str, torch.Tensor],
    *,
    sides: tuple[str, ...],
    pad_token_id: int,
    device,
    share: bool,
    grad: bool,
    c: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    gather=None,
    tail_from: list[int] | None = None,
):
    """Score one micro-batch and compute its loss; returns (LossOutput, tokens, policy, refs).

    ``refs`` maps each side to reference log-probs [K, B]; ``labels`` marks desirable items of an
    unpaired batch. ``gather`` (an accelerate Accelerator) gathers every per-example tensor over
    processes first, for a global contrast scope: every process then computes the same loss,
    all_gather's backward sums their gradients into each local part (P x) and DDP's average divides
    by P, so the gathered loss needs no rescaling.

    The method's extra inputs: a last side ``kl`` (KTO's mismatched items) is scored without
    gradient; ``tail_from`` (per row of the scored sides) asks for LD-DPO's tails; WPO's aligned sums
    come when ``loss_fn.wpo`` is set.
    """
    adapter = getattr(loss_fn, "adapter", None)
    b = len(prompts) // len(sides)
    kl = sides[-1] == "kl"
    if kl:  # only KTO's reference point uses them: no gradient, no activations kept
        n = b * (len(sides) - 1)
        kl_prompts, kl_completions = prompts[n:], completions[n:]
        prompts, completions, sides = prompts[:n], completions[:n], sides[:-1]
    policy, lengths = score_sides(
        scorer,
        prompts,
        completions,
        sides,
        pad_token_id,
        device,
        share=share,
        grad=grad,
        with_wpo=bool(getattr(adapter, "wpo", False)),
        tail_from=tail_from,
    )
    if kl:
        kl_policy, kl_lengths = score_sides(
            scorer, kl_prompts, kl_completions, ("kl",), pad_token_id, device, share=False, grad=False
        )
        policy.update(kl_policy)
        lengths.update(kl_lengths)
    if labels is not None:
        lengths["label"] = labels
    if gather is not None:
        policy = {s: gather_with_grad(v) for s, v in policy.items()}
        lengths = {s: gather.gather(v) for s, v in lengths.items()}
        refs = {s: gather.gather(v.T.contiguous()).T for s, v in refs.items()}
        c = gather.gather(c) if c is not None else None
        embeddings = gather.gather(embeddings) if embeddings is not None else None
    out = loss_fn(policy, lengths, refs, c=c, embeddings=embeddings)
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))  # a shared prompt counts twice
    return out, tokens, policy, refs


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
