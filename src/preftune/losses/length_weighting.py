"""Per-sequence modifiers built from per-token log-probs: LD-DPO's length desensitisation and WPO's weights.

Both apply to any paired loss (the trainer's ``ld_alpha`` and ``wpo`` keys) and need from the scorer
more than the summed log-prob of each sequence: LD-DPO the part beyond the pair's shared length
(:func:`shared_length_split`), WPO the per-token ``log Σ_v π(v|·)²`` (:func:`log_sum_sq_probs`). See
docs/methods.md#the-dpo-family; :func:`ld_dpo` is DPO on :func:`ld_logps`.

* LD-DPO (Liu et al., arXiv 2409.06411): ``logp̂ = logp_prefix + α·logp_tail``;
* WPO (Zhou et al., arXiv 2406.11827): pair weight ``w(x, y_w)·w(x, y_l)``,
  ``w(x, y) = exp((1/|y|) Σ_t log[π_θ(y_t|·) / Σ_v π_θ(v|·)²])``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .family import dpo_family_loss
from .output import LossOutput, compute_dtype

__all__ = [
    "ld_dpo",
    "ld_logps",
    "shared_length_split",
    "wpo_weights",
    "wpo_aligned_logps",
    "log_sum_sq_probs",
]


# --------------------------------------------------------------------------------------------------
# LD-DPO (arXiv 2409.06411)


def shared_length_split(
    per_token_logps: Tensor, completion_mask: Tensor, shared_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Split each sequence's log-prob into its first ``shared_lengths`` completion tokens and the rest.

    What the scorer must provide for LD-DPO. For pair i the shared length is
    ``l_p,i = min(|y_w,i|, |y_l,i|)``; the chosen and the rejected sequence of the pair are both split
    at it, under the policy and under every reference.

    Args:
        per_token_logps: ``[N, T]`` log-probs of each target token (any value where the mask is 0).
        completion_mask: ``[N, T]`` 1 on completion tokens (prompt and padding 0), aligned with
            ``per_token_logps``.
        shared_lengths: ``[N]`` number of leading completion tokens that form the prefix.

    Returns:
        ``(prefix, tail)``, each ``[N]``: sums over completion tokens with rank ``≤ l_p`` and ``> l_p``
        (``prefix + tail`` is the usual summed log-prob).
    """
    mask = completion_mask.to(torch.bool)
    rank = mask.long().cumsum(dim=1)
    shared = torch.as_tensor(shared_lengths, device=rank.device).long().unsqueeze(1)
    zero = torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device)
    prefix = torch.where(mask & (rank <= shared), per_token_logps, zero).sum(dim=1)
    tail = torch.where(mask & (rank > shared), per_token_logps, zero).sum(dim=1)
    return prefix, tail


def ld_logps(logps: Tensor, tail_logps: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's desensitised log-prob ``logp̂ = logp_prefix + α·logp_tail = logp − (1−α)·logp_tail``.

    Args:
        logps: summed log-probs (``[B]`` or a ``[K, B]`` reference stack).
        tail_logps: the part of ``logps`` beyond the pair's shared length (same shape;
            :func:`shared_length_split`), 0 for the shorter response of each pair.
        ld_alpha: α ∈ [0, 1]; 1 gives ``logps`` back (DPO), 0 drops the tail.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    if torch.as_tensor(tail_logps).shape != logps.shape:
        raise ValueError(
            f"tail log-probs have shape {tuple(tail_logps.shape)}, expected {tuple(logps.shape)}"
        )
    if ld_alpha == 1.0:
        return logps
    return logps - (1.0 - ld_alpha) * tail_logps


# --------------------------------------------------------------------------------------------------
# WPO (arXiv 2406.11827)


def log_sum_sq_probs(logits: Tensor) -> Tensor:
    """``log Σ_v π(v|·)²`` per position from logits ``[..., V]`` (float32 at least), for WPO's alignment."""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    return torch.logsumexp(2.0 * torch.log_softmax(logits, dim=-1), dim=-1)


def wpo_aligned_logps(
    per_token_logps: Tensor, completion_mask: Tensor, per_token_log_sum_sq: Tensor | None = None
) -> Tensor:
    """Per-sequence ``Σ_t [log π_θ(y_t|·) − log Σ_v π_θ(v|·)²]`` over completion tokens, detached.

    Without ``per_token_log_sum_sq`` this is the plain summed log-prob (WPO without alignment).
    """
    with torch.no_grad():
        aligned = per_token_logps if per_token_log_sum_sq is None else per_token_logps - per_token_log_sum_sq
        return torch.where(completion_mask.to(torch.bool), aligned, torch.zeros_like(aligned)).sum(dim=1)


def wpo_weights(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """WPO pair weights (Zhou et al., arXiv 2406.11827): ``w(x, y_w)·w(x, y_l)``, detached, ``[B]``.

    ``w(x, y) = exp((1/|y|) Σ_t log[π_θ(y_t|x, y_<t) / Σ_v π_θ(v|x, y_<t)²])`` — the policy's
    length-normalised probability of y, aligned by the per-token ``Σ_v π²`` (TRL's ``use_weighting``).

    Args:
        chosen_logps, rejected_logps: ``[B]`` the sums of :func:`wpo_aligned_logps` (or plain summed
            log-probs for unaligned weights), from the policy being trained.
        chosen_lengths, rejected_lengths: ``[B]`` completion-token counts (clamped to ≥ 1).
    """
    with torch.no_grad():
        dtype = compute_dtype(chosen_logps, rejected_logps)
        chosen = chosen_logps.detach().to(dtype)
        rejected = rejected_logps.detach().to(dtype)
        chosen_n = torch.as_tensor(chosen_lengths, device=chosen.device).to(dtype).clamp(min=1.0)
        rejected_n = torch.as_tensor(rejected_lengths, device=chosen.device).to(dtype).clamp(min=1.0)
        return torch.exp(chosen / chosen_n + rejected / rejected_n)


# --------------------------------------------------------------------------------------------------
# LD-DPO as a loss: dpo_family_loss of the desensitised log-probs


def ld_dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    ld_alpha: float = 0.5,
    *,
    policy_chosen_tail: Tensor,
    policy_rejected_tail: Tensor,
    ref_chosen_tail: Tensor,
    ref_rejected_tail: Tensor,
    **options: Any,
) -> LossOutput:
    """LD-DPO (Liu et al., arXiv 2409.06411): DPO on length-desensitised log-probs.

    Each response of a pair is split at the shared length ``l_p = min(|y_w|, |y_l|)``:
    ``log π̂(y|x) = Σ_{t ≤ l_p} log π(y_t|·) + α·Σ_{t > l_p} log π(y_t|·)`` for the policy and the
    reference alike, then ``ℓ = −log σ(β(log π̂_θ/π̂_ref(y_w) − log π̂_θ/π̂_ref(y_l)))``. ``α = 1`` is DPO.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: the usual **full** summed log-probs.
        ld_alpha: α ∈ [0, 1] (the paper tunes it per model, 0.2–0.8; TRL has no default).
        policy_chosen_tail, ...: the same four quantities summed over the tokens beyond ``l_p`` only
            (:func:`shared_length_split`); reference tails may be ``[K, B]`` like the references.
        **options: further :func:`dpo_family_loss` keywords (another ``loss_types``, ...).
    """
    options.setdefault("loss_types", "sigmoid")
    return dpo_family_loss(
        ld_logps(policy_chosen, policy_chosen_tail, ld_alpha),
        ld_logps(policy_rejected, policy_rejected_tail, ld_alpha),
        ld_logps(torch.as_tensor(ref_chosen), torch.as_tensor(ref_chosen_tail), ld_alpha),
        ld_logps(torch.as_tensor(ref_rejected), torch.as_tensor(ref_rejected_tail), ld_alpha),
        beta=beta,
        **options,
    )
