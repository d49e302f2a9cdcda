"""KTO and unpaired APO-zero: losses over unpaired desirable / undesirable items.

A batch holds N items (x_i, y_i) with a binary label (desirable or not), not pairs. Inputs are the
per-item summed completion log-probs ``[N]`` of the policy (with grad) and of the reference, and
``labels`` ``[N]`` (True = desirable). KTO also needs its reference point from **mismatched** items:
M completions scored under a prompt they were not written for (TRL rotates the batch's completions by
one: ``(x_1, y_N), (x_2, y_1), …, (x_N, y_{N−1})``), under the policy and under the reference. Math in
float32 (float64 if an input is float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .output import LossOutput, as_float, as_ref_stack, compute_dtype, safe_mean

__all__ = ["kto", "kto_reference_point", "apo_zero_unpaired"]


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO's ``z_ref = max(0, (1/M) Σ_j [log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j)])``, detached.

    ``(x_j, y'_j)`` are mismatched pairs (completion of another prompt); the mean log-ratio over them
    is a biased but low-variance estimate of ``KL(π_θ ‖ π_ref)``, clamped at 0 as in the paper and TRL.
    Under data parallelism TRL averages the per-device means across ranks before clamping: reduce
    the unclamped mean yourself and pass ``reference_point`` to :func:`kto` to do the same.
    """
    with torch.no_grad():
        dtype = compute_dtype(kl_policy_logps, kl_ref_logps)
        policy = kl_policy_logps.detach().to(dtype).reshape(-1)
        reference = as_ref_stack(kl_ref_logps, dtype)[0].to(policy.device)
        if policy.shape != reference.shape:
            raise ValueError(
                f"mismatched-pair log-probs {tuple(policy.shape)} and {tuple(reference.shape)} differ in shape"
            )
        if policy.numel() == 0:
            raise ValueError("KTO's reference point needs at least one mismatched pair")
        return (policy - reference).mean().clamp(min=0.0)


def _unpaired_inputs(
    policy_logps: Tensor, ref_logps: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(policy_logps, ref_logps)
    policy = as_float(policy_logps, dtype, detach=False)
    if policy.dim() != 1:
        raise ValueError(f"policy log-probs must be [N], got {tuple(policy.shape)}")
    reference = as_ref_stack(ref_logps, dtype)[0].to(policy.device)
    if reference.shape != policy.shape:
        raise ValueError(
            f"reference log-probs have shape {tuple(reference.shape)}, expected {tuple(policy.shape)}"
        )
    label_tensor = torch.as_tensor(labels, device=policy.device)
    if label_tensor.shape != policy.shape:
        raise ValueError(f"labels have shape {tuple(label_tensor.shape)}, expected {tuple(policy.shape)}")
    return policy, reference, label_tensor.to(torch.bool)


def _output(
    beta: float, p: Tensor, reward: Tensor, desirable: Tensor, losses: Tensor, extra: dict[str, Tensor]
) -> LossOutput:
    with torch.no_grad():
        metrics = dict(extra)
        rewards = beta * reward.detach()
        n_d, n_u = int(desirable.sum()), int((~desirable).sum())
        if n_d:
            metrics["rewards/chosen"] = rewards[desirable].mean()
            metrics["logps/chosen"] = p.detach()[desirable].mean()
        if n_u:
            metrics["rewards/rejected"] = rewards[~desirable].mean()
            metrics["logps/rejected"] = p.detach()[~desirable].mean()
        if n_d and n_u:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    rewards = beta * reward.detach()
    return LossOutput(safe_mean(losses), losses, metrics, rewards[desirable], rewards[~desirable])


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    *,
    reference_point: Tensor | float | None = None,
) -> LossOutput:
    """KTO (Ethayarajh et al., arXiv 2402.01306, Eq. 7–8): prospect-theoretic loss on unpaired data.

    ``r_θ(x, y) = log π_θ(y|x)/π_ref(y|x)``, ``z_ref`` = :func:`kto_reference_point` of the
    mismatched pairs, and the value ``v(x, y) = λ_D σ(β(r_θ − z_ref))`` for desirable y,
    ``λ_U σ(β(z_ref − r_θ))`` for undesirable y. ``L = E[λ_y − v(x, y)]``, i.e. per item
    ``λ_D (1 − σ(β(r_θ − z_ref)))`` or ``λ_U (1 − σ(β(z_ref − r_θ)))``, averaged over all N items.
    ``z_ref`` is detached: no gradient flows through it (the paper and TRL compute it without grad).

    Args:
        policy_logps: ``[N]`` summed policy log-probs of the items (with grad).
        ref_logps: ``[N]`` (or ``[K, N]``, index 0 used) reference log-probs of the items.
        labels: ``[N]`` bool, True for desirable items.
        kl_policy_logps, kl_ref_logps: ``[M]`` policy / reference log-probs of the M mismatched pairs
            (``y'_j`` scored after prompt ``x_j``; M = N with TRL's rotation). Needed unless
            ``reference_point`` is given.
        beta: β (paper and TRL: 0.1).
        desirable_weight, undesirable_weight: λ_D, λ_U (1.0; the paper advises
            ``λ_D n_D / (λ_U n_U) ∈ [1, 4/3]``).
        reference_point: ``z_ref`` given directly (e.g. all-reduced across ranks); overrides the KL inputs.

    Returns:
        :class:`LossOutput`: ``losses`` per item in input order; ``chosen_rewards`` / ``rejected_rewards``
        the ``β·r_θ`` of the desirable / undesirable items; metrics ``kl`` (= z_ref) and, where the
        side is present, TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable/undesirable weights must be >= 0, got {desirable_weight}, {undesirable_weight}"
        )
    policy, reference, desirable = _unpaired_inputs(policy_logps, ref_logps, labels)
    if reference_point is not None:
        z = (
            torch.as_tensor(reference_point, dtype=policy.dtype, device=policy.device)
            .detach()
            .to(policy.dtype)
        )
    elif kl_policy_logps is None or kl_ref_logps is None:
        raise ValueError(
            "kto needs kl_policy_logps and kl_ref_logps (mismatched prompt/completion pairs) or reference_point"
        )
    else:
        z = kto_reference_point(kl_policy_logps, kl_ref_logps).to(device=policy.device, dtype=policy.dtype)
    reward = policy - reference
    value = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(beta * (reward - z)),
        undesirable_weight * torch.sigmoid(beta * (z - reward)),
    )
    lam = torch.where(
        desirable,
        torch.full_like(reward, desirable_weight),
        torch.full_like(reward, undesirable_weight),
    )
    losses = lam - value
    return _output(beta, policy, reward, desirable, losses, {"kl": z.detach().clone()})


def apo_zero_unpaired(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Unpaired APO-zero (arXiv 2408.06266, Eq. 7 split per item), TRL's KTOTrainer ``apo_zero_unpaired``.

    Per item: ``λ_D (1 − σ(β r_θ))`` if desirable, ``λ_U σ(β r_θ)`` if undesirable; no reference point.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    policy, reference, desirable = _unpaired_inputs(policy_logps, ref_logps, labels)
    reward = policy - reference
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * reward)),
        undesirable_weight * torch.sigmoid(beta * reward),
    )
    return _output(beta, policy, reward, desirable, losses, {})


# --------------------------------------------------------------------------------------------------
# Registration as method components: unpaired links (the trainer feeds labelled items and, for KTO,
# the mismatched items of its reference point).


def _register() -> None:
    from . import links as _links  # noqa: F401  (registers dpo, ipo, hinge first: the listing order)
    from .components import Component, Option, register

    weights = (
        Option("kto.desirable_weight", "desirable_weight", link=True),
        Option("kto.undesirable_weight", "undesirable_weight", link=True),
    )
    alone = "it values each item on its own (against a reference point), not against other items"
    register(
        Component(
            "kto",
            "link",
            "kto",
            kto,
            summary="KTO: prospect-theoretic loss on unpaired desirable/undesirable items",
            formula="ℓ = λ_D(1 − σ(β(r − z_ref))) or λ_U(1 − σ(β(z_ref − r))),  z_ref = max(0, mean r(x, y′))",
            paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv:2402.01306)",
            needs=frozenset({"unpaired", "mismatched"}),
            options=weights,
            takes="unpaired",
            unpaired=True,
            refuses={"pairing": alone},
        )
    )
    register(
        Component(
            "apo_zero_unpaired",
            "link",
            "apo_zero_unpaired",
            apo_zero_unpaired,
            summary="APO-zero on unpaired items (TRL's KTOTrainer loss): raise desirable, lower undesirable",
            formula="ℓ = λ_D(1 − σ(β r)) or λ_U σ(β r)",
            paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization (arXiv:2408.06266)",
            needs=frozenset({"unpaired"}),
            options=weights,
            takes="unpaired",
            unpaired=True,
            refuses={"pairing": alone},
        )
    )


_register()
