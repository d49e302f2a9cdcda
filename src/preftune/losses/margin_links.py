"""The DPO family's margin links: per-contrast losses of the margin ``m`` only (``z = β·m``).

Like the links of :mod:`.links` (``sigmoid``, ``ipo``, ``hinge``, ``mallows_phi``), each is a
function ``(margin, beta, label_smoothing, phi, **own_options) -> loss`` registered as a component,
so it composes with every reference aggregator, scale and pairing of the pipeline. ε is
``label_smoothing``; see docs/methods.md#the-dpo-family for the papers and defaults.

* ``robust`` (rDPO, arXiv 2403.00409): ``[−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)``, ε ∈ [0, ½);
* ``exo_pair`` (EXO, arXiv 2402.00856): ``KL([σ(z), σ(−z)] ‖ [1−ε, ε])``, ε ∈ (0, 1);
* ``discopop`` (DiscoPOP / LRML, arXiv 2406.08414): ``(1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z}``;
* ``sigmoid_norm`` (TRL's length-normalised DPO): the ``sigmoid`` link of a margin of
  length-normalised log-probs (the caller normalises; the component asks for it).

:func:`margin_link` evaluates any link of :data:`FAMILY_LINKS` through these registered components.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .components import Component, Option, lookup, register
from .family import dpo_family_loss
from .links import sigmoid_link  # importing links registers dpo, ipo, hinge first (the listing order)
from .output import LossOutput

__all__ = ["FAMILY_LINKS", "margin_link", "robust", "exo_pair", "discopop", "sigmoid_norm"]

#: Links of this family: per-contrast loss as a function of the margin ``m`` only (``z = β·m``).
FAMILY_LINKS: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop")


def margin_link(
    margin: Tensor, link: str, beta: float, *, label_smoothing: float = 0.0, tau: float = 0.05
) -> Tensor:
    """Per-contrast loss of a margin ``m`` (any shape) for the links of :data:`FAMILY_LINKS`.

    With ``z = β·m`` and ε = ``label_smoothing`` (passed to the links that take one, ignored by the
    others; ``tau`` reaches ``discopop`` only):

    * ``sigmoid`` (DPO, cDPO): ``−(1−ε) log σ(z) − ε log σ(−z)``;
    * ``hinge`` (SLiC): ``max(0, 1 − z)``;
    * ``ipo``: ``(m − 1/(2β))²``;
    * ``robust`` (rDPO, arXiv 2403.00409): ``[−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)``, ε ∈ [0, ½);
    * ``exo_pair`` (EXO, arXiv 2402.00856): ``KL([σ(z), σ(−z)] ‖ [1−ε, ε])``, ε ∈ (0, 1);
    * ``discopop`` (DiscoPOP / LRML, arXiv 2406.08414): ``(1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z}``,
      the last term computed as ``exp(log σ(z/τ) − z)`` so it stays finite where ``e^{−z}`` overflows.

    Each is the registered link component of that pipeline value (the function training runs).
    """
    if link not in FAMILY_LINKS:
        raise ValueError(f"link must be one of {FAMILY_LINKS}, got {link!r}")
    component = lookup("link", link)
    eps = label_smoothing if component.label_smoothing else 0.0
    return component.impl(margin, beta, eps, None, **component.own_options({"tau": tau}))


def _robust_link(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs label_smoothing (flip rate ε) in [0, 0.5), got {label_smoothing}")
    z = beta * margin
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def _exo_pair_link(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs label_smoothing ε in (0, 1) (the paper suggests 1e-3), got {label_smoothing}"
        )
    z = beta * margin
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
        log_ql - math.log(label_smoothing)
    )


def _discopop_link(
    margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None, tau: float = 0.05
) -> Tensor:
    if tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    z = beta * margin
    log_mod = F.logsigmoid(z / tau)
    return -torch.expm1(log_mod) * -F.logsigmoid(z) + torch.exp(log_mod - z)


def _sigmoid_norm_link(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    return sigmoid_link(margin, beta, 0.0, phi)  # the margin is of length-normalised log-probs


def _exo_check(get) -> str | None:
    eps = get("label_smoothing")
    if not 0.0 < eps < 1.0:
        return f"label_smoothing: exo_pair needs ε in (0, 1) (the paper uses 1e-3), got {eps}"
    return None


register(
    Component(
        "robust",
        "link",
        "robust",
        _robust_link,
        summary="Robust DPO: unbiased DPO under a label-flip rate ε (`label_smoothing`)",
        formula="ℓ = [−(1−ε) log σ(β m) + ε log σ(−β m)] / (1−2ε)",
        paper="Chowdhury et al. 2024, Provably Robust DPO (arXiv:2403.00409)",
        label_smoothing=True,
    )
)
register(
    Component(
        "exo_pair",
        "link",
        "exo_pair",
        _exo_pair_link,
        summary="EXO (pairwise): reverse KL between the model's and the ε-smoothed label distribution",
        formula="ℓ = σ(βm) log(σ(βm)/(1−ε)) + σ(−βm) log(σ(−βm)/ε)",
        paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (arXiv:2402.00856)",
        label_smoothing=True,
        check=_exo_check,
    )
)
register(
    Component(
        "discopop",
        "link",
        "discopop",
        _discopop_link,
        summary="DiscoPOP: log-ratio modulated blend of the logistic and exponential losses",
        formula="ℓ = (1 − σ(βm/τ))·(−log σ(βm)) + σ(βm/τ)·e^{−βm}",
        paper="Chris Lu et al. 2024, Discovering Preference Optimization Algorithms with and for LLMs (arXiv:2406.08414)",
        options=(Option("discopop.tau", "tau", link=True),),
    )
)
register(
    Component(
        "sigmoid_norm",
        "link",
        "sigmoid_norm",
        _sigmoid_norm_link,
        summary="length-normalised DPO (TRL's sigmoid_norm): DPO on log-probs divided by length",
        formula="ℓ = −log σ(β (r_w/|y_w| − r_l/|y_l|))",
        paper="TRL's loss_type; the LN-DPO ablation of Meng et al. 2024, SimPO (arXiv:2405.14734)",
        length_normalize=True,
    )
)


# --------------------------------------------------------------------------------------------------
# the named losses: dpo_family_loss of one type, as TRL computes it (exported from preftune.losses)


def robust(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    **options: Any,
) -> LossOutput:
    """Robust DPO (Chowdhury et al., arXiv 2403.00409), unbiased under label-flip rate ε.

    ``ℓ̂ = [(1−ε)·ℓ(y_w ≻ y_l) − ε·ℓ(y_l ≻ y_w)] / (1−2ε)`` with ``ℓ(y_w ≻ y_l) = −log σ(βΔ)``:
    ``ℓ̂ = [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)``. ε ∈ [0, ½) (paper: 0.1); ε = 0 is DPO.
    ``**options``: further :func:`dpo_family_loss` keywords (``f_divergence``, ``pair_weights``, ...).
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="robust",
        beta=beta,
        label_smoothing=label_smoothing,
        **options,
    )


def exo_pair(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    **options: Any,
) -> LossOutput:
    """EXO-pref (Ji et al., arXiv 2402.00856, Eq. 16 with K = 2): ``KL(p_fθ ‖ p_rh)``.

    ``p_fθ = softmax(β·r) over {y_w, y_l} = [σ(βΔ), σ(−βΔ)]``, ``p_rh = [1−ε, ε]`` (the preference
    label smoothed by ε > 0; paper 1e-3): ``ℓ = σ(βΔ) log(σ(βΔ)/(1−ε)) + σ(−βΔ) log(σ(−βΔ)/ε)``.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="exo_pair",
        beta=beta,
        label_smoothing=label_smoothing,
        **options,
    )


def discopop(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    tau: float = 0.05,
    **options: Any,
) -> LossOutput:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al., arXiv 2406.08414, Eq. 5).

    With ``ρ = βΔ``: ``ℓ = (1 − σ(ρ/τ))·(−log σ(ρ)) + σ(ρ/τ)·e^{−ρ}``, a blend of the logistic
    (DPO) and exponential losses gated by the sign of the margin; τ = 0.05 in the paper and TRL.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="discopop",
        beta=beta,
        discopop_tau=tau,
        **options,
    )


def sigmoid_norm(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **options: Any,
) -> LossOutput:
    """Length-normalised DPO, TRL's ``sigmoid_norm``: ``ℓ = −log σ(β(ψ(r_w)/|y_w| − ψ(r_l)/|y_l|))``.

    TRL cites no paper for it; it is the length-normalised DPO ("LN-DPO") that the SimPO paper
    (arXiv 2405.14734) ablates. With equal lengths n it is DPO with β/n.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="sigmoid_norm",
        beta=beta,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        **options,
    )
