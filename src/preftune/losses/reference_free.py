"""Reference-free preference losses: SimPO and ORPO, on length-normalised policy log-probs.

Inputs are the policy's per-sequence **summed** completion log-probs ``[B]`` and completion-token
counts ``[B]`` (pass ones if the log-probs are already averaged); ``ā(y) = logp_θ(y|x)/|y|``. No
reference model is used: ``ref_chosen``/``ref_rejected`` exist only so that the signature matches
the other losses, and are ignored. Math in float32 (float64 if an input is float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .output import LossOutput, as_float, compute_dtype, reward_metrics, safe_mean

__all__ = ["simpo", "orpo", "log1mexp"]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for ``x < 0``, stable at both ends (``−inf`` at ``x = 0``)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _averaged(
    policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = compute_dtype(policy_chosen, policy_rejected)
    chosen = as_float(policy_chosen, dtype, detach=False)
    rejected = as_float(policy_rejected, dtype, detach=False)
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"policy log-probs must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    out = []
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is None:
            raise ValueError(
                f"{name} (completion-token counts [B]) is required; pass ones if already averaged"
            )
        counts = torch.as_tensor(lengths, device=chosen.device).detach().to(dtype)
        if counts.shape != chosen.shape:
            raise ValueError(f"{name} has shape {tuple(counts.shape)}, expected {tuple(chosen.shape)}")
        out.append(counts.clamp(min=1.0))
    return chosen, rejected, chosen / out[0], rejected / out[1]


def simpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    beta: float = 2.0,
    gamma: float = 1.0,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al., arXiv 2405.14734, Eq. 6): reference-free, length-normalised, target margin γ.

    ``ℓ = −log σ(β/|y_w| · log π_θ(y_w|x) − β/|y_l| · log π_θ(y_l|x) − γ)`` (γ in SimPO's own reward
    units; TRL's CPOTrainer writes the same as ``β·(ā_w − ā_l − γ/β)``). With ε = ``label_smoothing``
    (TRL's conservative variant): ``−(1−ε) log σ(z) − ε log σ(−z)``.

    Args:
        ref_chosen, ref_rejected: ignored (SimPO has no reference).
        beta: β (paper: 2.0–2.5; TRL's CPOConfig default 0.1).
        gamma: γ, the target reward margin (paper: γ/β ≈ 0.3–0.8, so γ ≈ 0.5–1.6 at β = 2; TRL 0.5).
        chosen_lengths, rejected_lengths: ``[B]`` completion-token counts.
        sft_weight: λ of the CPO-SimPO add-on ``λ·(−ā_w)`` per pair (TRL's ``cpo_alpha``, but per pair).

    Returns:
        :class:`LossOutput`; rewards are ``β·ā`` as TRL logs them (``logps/*`` are the averages ā);
        ``nll_loss`` (TRL's CPO name: the token-mean NLL −ā_w) when λ > 0.
    """
    del ref_chosen, ref_rejected
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    _, _, avg_c, avg_r = _averaged(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    losses = _simpo_link(avg_c - avg_r, beta, label_smoothing, None, gamma)
    metrics: dict[str, Tensor] = {}
    if sft_weight:
        losses = losses + sft_weight * (-avg_c)
    with torch.no_grad():
        if avg_c.numel():
            metrics = reward_metrics(beta, avg_c.detach(), avg_r.detach(), avg_c, avg_r)
            if sft_weight:
                metrics["nll_loss"] = -avg_c.detach().mean()
    return LossOutput(safe_mean(losses), losses, metrics, beta * avg_c.detach(), beta * avg_r.detach())


def orpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    nll: Tensor | float | None = None,
) -> LossOutput:
    """ORPO (Hong et al., arXiv 2403.07691, Eqs. 6–7): SFT plus an odds-ratio penalty, no reference.

    ``odds_θ(y|x) = P_θ(y|x)/(1 − P_θ(y|x))`` with ``P_θ(y|x) = exp(ā(y))`` (length-normalised, as in
    the paper's implementation and TRL), ``L_OR = −log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))`` and
    ``L = L_SFT + λ·L_OR``, ``log odds = ā − log(1 − e^ā)``.

    Args:
        ref_chosen, ref_rejected: ignored (ORPO has no reference).
        beta: λ (TRL's ORPOConfig ``beta``, default 0.1; the paper uses 0.1–1.0).
        chosen_lengths, rejected_lengths: ``[B]`` completion-token counts.
        nll: ``L_SFT`` override: a scalar or ``[B]``. Default: ``−ā(y_w)`` per pair (the chosen
            completion's token-mean NLL, as LLaMA-Factory's ``orpo``). TRL's ORPOTrainer instead uses
            one cross-entropy pooled over all tokens of the chosen sequences **including the prompt**;
            a trainer that wants that passes it here.

    Returns:
        :class:`LossOutput` with ``losses = L_SFT + λ·L_OR`` per pair; TRL's metrics: ``rewards/*``
        = ``λ·ā``, ``logps/*`` = ā, ``nll_loss``, ``log_odds_ratio`` (mean ``log σ(log-odds ratio)``)
        and ``log_odds_chosen`` (mean log-odds ratio).
    """
    del ref_chosen, ref_rejected
    if beta < 0:
        raise ValueError(f"beta (λ) must be >= 0, got {beta}")
    _, _, avg_c, avg_r = _averaged(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    if bool((avg_c.detach() >= 0).any()) or bool((avg_r.detach() >= 0).any()):
        raise ValueError("orpo needs log-probs < 0 (a sequence probability of 1 has infinite odds)")
    log_odds = _log_odds_ratio(avg_c, avg_r)
    ratio = F.logsigmoid(log_odds)
    if nll is None:
        sft_losses = -avg_c
    else:
        sft_losses = torch.as_tensor(nll, dtype=avg_c.dtype, device=avg_c.device)
        if sft_losses.dim() == 0:
            sft_losses = sft_losses.expand(avg_c.shape)
        elif sft_losses.shape != avg_c.shape:
            raise ValueError(f"nll must be a scalar or [B], got shape {tuple(sft_losses.shape)}")
    losses = sft_losses - beta * ratio
    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if avg_c.numel():
            metrics = reward_metrics(beta, avg_c.detach(), avg_r.detach(), avg_c, avg_r)
            metrics["nll_loss"] = sft_losses.detach().mean()
            metrics["log_odds_ratio"] = ratio.detach().mean()
            metrics["log_odds_chosen"] = log_odds.detach().mean()
    return LossOutput(safe_mean(losses), losses, metrics, beta * avg_c.detach(), beta * avg_r.detach())


# --------------------------------------------------------------------------------------------------
# Registration as method components (links of the pipeline, which hands them the length-normalised
# policy log-probs ā as rewards: these methods set ``reference_free`` and ``length_normalize``).


def _log_odds_ratio(a_w: Tensor, a_l: Tensor) -> Tensor:
    """``log odds(y_w) − log odds(y_l)`` with ``log odds = ā − log(1 − e^ā)`` (ā < 0)."""
    return (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))


def _simpo_link(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None, gamma: float = 0.5):
    z = beta * margin - gamma
    out = -F.logsigmoid(z)
    if label_smoothing:
        out = (1 - label_smoothing) * out - label_smoothing * F.logsigmoid(-z)
    return out


def _orpo_link(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    # r = ā (no reference, length-normalised); ā → 0 would be an infinite odds: keep it just below 0
    below = -torch.finfo(r_w.dtype).eps
    a_w, a_l = r_w.clamp(max=below), r_l.clamp(max=below)
    log_odds = _log_odds_ratio(a_w, a_l)
    return -a_w - beta * F.logsigmoid(log_odds)


def _register() -> None:
    from . import links as _links  # noqa: F401  (registers dpo, ipo, hinge first: the listing order)
    from .components import Component, Option, register

    no_reference = "it uses no reference model, so there are no references to aggregate"
    register(
        Component(
            "simpo",
            "link",
            "simpo",
            _simpo_link,
            summary="SimPO: reference-free, length-normalised, target margin γ (`simpo.gamma`)",
            formula="ℓ = −log σ(β ā_w − β ā_l − γ),  ā = logp_θ(y|x)/|y|",
            paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734)",
            options=(Option("simpo.gamma", "gamma", link=True),),
            label_smoothing=True,
            length_normalize=True,
            reference_free=True,
            refuses={"reference": no_reference},
        )
    )
    register(
        Component(
            "orpo",
            "link",
            "orpo",
            _orpo_link,
            summary="ORPO: SFT on the chosen plus λ = β times an odds-ratio penalty, no reference",
            formula="ℓ = −ā_w − β·log σ(log odds(y_w) − log odds(y_l)),  odds = e^ā/(1 − e^ā)",
            paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (arXiv:2403.07691)",
            takes="rewards",
            length_normalize=True,
            reference_free=True,
            refuses={
                "reference": no_reference,
                "scale": "its odds need probabilities e^ā; a scaled log-prob c·ā is not one",
            },
        )
    )


_register()
