"""The result type shared by every loss, and the small helpers all losses use.

Conventions (see docs/methods.md):

* inputs are per-sequence *summed* completion log-probs, shape ``[B]``; reference stacks are
  ``[K, B]`` with index 0 the primary reference;
* all math runs in float32, or in float64 when any input is float64, whatever the model dtype;
* reference quantities, weights, dispersion and embeddings are detached: gradient reaches only the
  policy log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LossOutput", "TIE_TOLERANCE", "preference_accuracy"]

# Two implicit rewards (β-scaled) closer than this are a tie, counted 1/2 by ``rewards/accuracies``.
# A policy equal to its reference has every reward 0 up to float noise (~1e-6 in float32 at β = 0.1):
# the strict ``>`` of TRL turns that noise into 0.25 or 0.75, the tie rule gives 0.5 as it should.
TIE_TOLERANCE = 1e-4


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: Scalar training loss (the mean of ``losses``), differentiable w.r.t. the policy log-probs.
        losses: Per-pair losses ``[B]`` (per row ``i`` for the RPO pairings, per chosen item for unpaired
            RPO), with the optional SFT term already added.
        metrics: Detached 0-dim tensors named as TRL logs them (``rewards/chosen``,
            ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (ties count 1/2),
            ``rewards/accuracies_strict`` (TRL's), ``logps/chosen``, ``logps/rejected``) plus method-specific extras (``mrpo/alpha_0`` ...).
        chosen_rewards: Detached ``β·r(y_w)`` per pair ``[B]`` (per chosen item for unpaired RPO).
        rejected_rewards: Detached ``β·r(y_l)`` per pair ``[B]`` (per rejected item for unpaired RPO).
    """

    loss: Tensor
    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (never lower)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_float(x: Tensor, dtype: torch.dtype, *, detach: bool) -> Tensor:
    """Cast to the compute dtype; reference-like quantities are detached here, once."""
    if detach:
        x = x.detach()
    return x.to(dtype)


def as_ref_stack(refs: Tensor, dtype: torch.dtype) -> Tensor:
    """Reference log-probs as a detached ``[K, B]`` stack (a ``[B]`` tensor is ``K = 1``)."""
    refs = as_float(torch.as_tensor(refs), dtype, detach=True)
    if refs.dim() == 1:
        return refs.unsqueeze(0)
    if refs.dim() != 2:
        raise ValueError(f"reference log-probs must have shape [B] or [K, B], got {tuple(refs.shape)}")
    return refs


def safe_mean(x: Tensor) -> Tensor:
    """Mean that is 0 (still attached to the graph) for an empty tensor instead of NaN."""
    return x.mean() if x.numel() > 0 else x.sum()


def preference_accuracy(
    chosen: Tensor, rejected: Tensor, *, strict: bool = False, tol: float = TIE_TOLERANCE
) -> Tensor:
    """Mean of 1 where ``chosen > rejected``, 0 where below and 1/2 for ties (``|difference| < tol``).

    ``strict=True`` is TRL's comparison (``chosen > rejected``, ties count 0). Shapes broadcast, so
    ``chosen[:, None]`` against ``rejected[None, :]`` compares every pair.
    """
    dtype = compute_dtype(chosen, rejected)
    diff = chosen.detach().to(dtype) - rejected.detach().to(dtype)
    wins = (diff > 0).to(dtype)
    if strict:
        return wins.mean()
    return torch.where(diff.abs() < tol, torch.full_like(wins, 0.5), wins).mean()


def reward_metrics(
    beta: float,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
) -> dict[str, Tensor]:
    """TRL-named metrics from per-pair implicit rewards ``r`` (unscaled) and policy log-probs.

    ``rewards/accuracies`` counts ties (β-scaled margin below :data:`TIE_TOLERANCE`) as 1/2;
    ``rewards/accuracies_strict`` is TRL's number (ties count 0).
    """
    with torch.no_grad():
        scaled_chosen = beta * chosen_rewards.detach()
        scaled_rejected = beta * rejected_rewards.detach()
        return {
            "rewards/chosen": scaled_chosen.mean(),
            "rewards/rejected": scaled_rejected.mean(),
            "rewards/margins": (scaled_chosen - scaled_rejected).mean(),
            "rewards/accuracies": preference_accuracy(scaled_chosen, scaled_rejected).to(scaled_chosen.dtype),
            "rewards/accuracies_strict": (scaled_chosen > scaled_rejected).to(scaled_chosen.dtype).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }


def sft_term(policy_chosen: Tensor, chosen_lengths: Tensor | None, sft_weight: float) -> Tensor | None:
    """``λ · (−logp_θ(y_w) / |y_w|)`` per pair, or None when λ = 0."""
    if sft_weight == 0.0:
        return None
    if chosen_lengths is None:
        raise ValueError(
            "sft_weight > 0 needs chosen_lengths (number of completion tokens of each chosen response; "
            "pass ones if the log-probs are already length-normalised)"
        )
    lengths = torch.as_tensor(chosen_lengths, device=policy_chosen.device).detach().to(policy_chosen.dtype)
    if lengths.shape != policy_chosen.shape:
        raise ValueError(
            f"chosen_lengths has shape {tuple(lengths.shape)}, expected {tuple(policy_chosen.shape)}"
        )
    return sft_weight * (-policy_chosen / lengths.clamp(min=1.0))


def checked_lengths(lengths: Tensor | None, name: str, like: Tensor, why: str) -> Tensor:
    """Completion-token counts ``[B]`` (detached, in ``like``'s dtype, clamped to ≥ 1) for ``why``."""
    if lengths is None:
        raise ValueError(f"{why} needs {name} (completion-token counts, shape [B])")
    out = torch.as_tensor(lengths, device=like.device).detach().to(like.dtype)
    if out.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out.clamp(min=1.0)
