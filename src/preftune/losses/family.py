"""The DPO family of TRL 1.16's ``DPOConfig.loss_type``, with its modifiers, as pure functions.

Inputs follow the rest of :mod:`preftune.losses`: per-sequence **summed** completion log-probs ``[B]``
of the policy (with grad) and of the reference (``[B]``, or a ``[K, B]`` stack of which index 0, the
primary reference, is used); completion-token counts ``[B]`` where a loss normalises by length.
Every loss returns a :class:`LossOutput`; math runs in float32 (float64 when an input is float64).
See docs/methods.md#the-dpo-family for the formulas, papers, defaults and how each composes with MRPO,
MallowsPO-θ and RPO.

Notation: ``r = logp_θ(y) − logp_ref(y)`` (unscaled implicit reward), ``ψ`` the f-divergence score of
``r`` (``ψ(r) = r`` for the reverse KL, i.e. plain DPO), ``m = ψ(r_w) − ψ(r_l)`` the pair margin,
``z = β·m``, ``σ`` the logistic sigmoid.

* :func:`dpo_family_loss`: any weighted sum of TRL's 15 loss types (``loss_types`` /
  ``loss_weights``, e.g. MPO), with an f-divergence and WPO pair weights;
* named losses: :func:`robust`, :func:`exo_pair`, :func:`nca_pair`, :func:`bco_pair`,
  :func:`sppo_hard`, :func:`aot`, :func:`aot_unpaired`, :func:`apo_zero`, :func:`apo_down`,
  :func:`discopop`, :func:`sigmoid_norm`, :func:`sft`, :func:`f_dpo`, :func:`mpo`, :func:`ld_dpo`;
* links (functions of the margin only): :data:`FAMILY_LINKS`, :func:`margin_link`;
* modifiers: :func:`f_divergence_score`, :func:`ld_logps` / :func:`shared_length_split` (LD-DPO),
  :func:`wpo_weights` / :func:`wpo_aligned_logps` / :func:`log_sum_sq_probs` (WPO),
  :func:`bco_running_delta` (BCO's reward shift δ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .output import LossOutput, as_float, as_ref_stack, compute_dtype, reward_metrics, safe_mean

__all__ = [
    "LOSS_TYPES",
    "MARGIN_LOSS_TYPES",
    "F_DIVERGENCES",
    "FAMILY_LINKS",
    "f_divergence_score",
    "margin_link",
    "dpo_family_loss",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "bco_running_delta",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
    "f_dpo",
    "mpo",
    "ld_dpo",
    "ld_logps",
    "shared_length_split",
    "wpo_weights",
    "wpo_aligned_logps",
    "log_sum_sq_probs",
]

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: TRL 1.16's ``DPOConfig.loss_type`` values, all implemented by :func:`dpo_family_loss`.
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

#: Loss types built on the chosen − rejected score difference only: the f-divergence applies to them
#: (the f-DPO reparameterisation leaves a ``β·log Z(x)`` that cancels only in that difference).
MARGIN_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)

#: Links of this family: per-contrast loss as a function of the margin ``m`` only (``z = β·m``).
FAMILY_LINKS: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop")

# The exponent of the α-divergence score is clamped here so that exp stays finite in float32
# (TRL clamps at the same value); it only bites for |log-ratio| of ~100+ nats.
_ALPHA_EXP_MAX = 80.0


# --------------------------------------------------------------------------------------------------
# building blocks


def f_divergence_score(
    logratio: Tensor, divergence: FDivergence = "reverse_kl", alpha: float = 0.5
) -> Tensor:
    """``ψ(r) = f'(π_θ/π_ref)`` up to an additive constant, the f-DPO reward (arXiv 2309.16240).

    * ``reverse_kl``: ``ψ(r) = r`` (standard DPO);
    * ``forward_kl``: ``f'(u) = −1/u`` → ``ψ(r) = 1 − e^{−r}``;
    * ``js_divergence``: ``f'(u) = log(2u/(1+u))`` → ``ψ(r) = log 2 + log σ(r)``;
    * ``alpha_divergence``: ``ψ(r) = (e^{(α−1) r} − 1)/(α − 1)`` with TRL's ``f_alpha_divergence_coef``
      α (the paper's ``f'(u) = (1 − u^{−a})/a`` with ``a = 1 − α``); α = 1 is the reverse KL, α → 0 the
      forward KL. The exponent is clamped at 80.

    Each ψ is the paper's ``f'`` shifted so that ``ψ(0) = 0`` (``f'(u) − f'(1)``: no score when the
    policy equals the reference), as in TRL. The shift cancels in ``ψ(r_w) − ψ(r_l)`` but not after
    dividing by lengths (``ipo``, ``sigmoid_norm``), where this convention is what TRL computes.
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return -torch.expm1(-logratio)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        return torch.expm1(((alpha - 1.0) * logratio).clamp(max=_ALPHA_EXP_MAX)) / (alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {divergence!r}")


def margin_link(
    margin: Tensor, link: str, beta: float, *, label_smoothing: float = 0.0, tau: float = 0.05
) -> Tensor:
    """Per-contrast loss of a margin ``m`` (any shape) for the links of :data:`FAMILY_LINKS`.

    With ``z = β·m`` and ε = ``label_smoothing``:

    * ``sigmoid`` (DPO, cDPO): ``−(1−ε) log σ(z) − ε log σ(−z)``;
    * ``hinge`` (SLiC): ``max(0, 1 − z)``;
    * ``ipo``: ``(m − 1/(2β))²``;
    * ``robust`` (rDPO, arXiv 2403.00409): ``[−(1−ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)``, ε ∈ [0, ½);
    * ``exo_pair`` (EXO, arXiv 2402.00856): ``KL([σ(z), σ(−z)] ‖ [1−ε, ε])``, ε ∈ (0, 1);
    * ``discopop`` (DiscoPOP / LRML, arXiv 2406.08414): ``(1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z}``,
      the last term computed as ``exp(log σ(z/τ) − z)`` so it stays finite where ``e^{−z}`` overflows.
    """
    z = beta * margin
    if link == "sigmoid":
        out = -F.logsigmoid(z)
        if label_smoothing:
            out = (1 - label_smoothing) * out - label_smoothing * F.logsigmoid(-z)
        return out
    if link == "hinge":
        return F.relu(1 - z)
    if link == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if link == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust needs label_smoothing (flip rate ε) in [0, 0.5), got {label_smoothing}")
        clean = -(1 - label_smoothing) * F.logsigmoid(z)
        flipped = -label_smoothing * F.logsigmoid(-z)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if link == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(
                f"exo_pair needs label_smoothing ε in (0, 1) (the paper suggests 1e-3), got {label_smoothing}"
            )
        log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
        return log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
            log_ql - math.log(label_smoothing)
        )
    if link == "discopop":
        if tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {tau}")
        log_mod = F.logsigmoid(z / tau)
        return -torch.expm1(log_mod) * -F.logsigmoid(z) + torch.exp(log_mod - z)
    raise ValueError(f"link must be one of {FAMILY_LINKS}, got {link!r}")


def _lengths(x: Tensor | None, name: str, like: Tensor, why: str) -> Tensor:
    if x is None:
        raise ValueError(f"{why} needs {name} (completion-token counts, shape [B])")
    out = torch.as_tensor(x, device=like.device).detach().to(like.dtype)
    if out.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out.clamp(min=1.0)


def _ref(ref: Tensor | None, name: str, like: Tensor) -> Tensor:
    if ref is None:
        raise ValueError(f"{name} (reference log-probs) is required")
    stack = as_ref_stack(ref, like.dtype).to(like.device)
    if stack.shape[1] != like.shape[0]:
        raise ValueError(
            f"{name} has shape {tuple(stack.shape)}, which does not match a batch of {like.shape[0]}"
        )
    return stack[0]


# --------------------------------------------------------------------------------------------------
# the combined loss


def dpo_family_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    loss_types: str | Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: float | Tensor = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> LossOutput:
    """``L = Σ_t w_t · mean_i(ω_i · ℓ_t,i)``: TRL 1.16's ``loss_type=[...]``, ``loss_weights=[...]``.

    Per-pair losses ``ℓ_t,i`` for each type t (``r = logp_θ − logp_ref``, ``m = ψ(r_w) − ψ(r_l)``,
    ``z = β m``, ε = ``label_smoothing``, δ = ``bco_delta``, ``|y|`` = completion length):

    =================  ================================================================  ===========
    type               ``ℓ_i``                                                           paper
    =================  ================================================================  ===========
    ``sigmoid``        ``−(1−ε) log σ(z) − ε log σ(−z)`` (ε ignored by TRL, see below)   2305.18290
    ``hinge``          ``max(0, 1 − z)``                                                  2305.10425
    ``ipo``            ``(ψ_w/|y_w| − ψ_l/|y_l| − 1/(2β))²``                              2310.12036
    ``exo_pair``       ``KL([σ(z), σ(−z)] ‖ [1−ε, ε])``                                   2402.00856
    ``nca_pair``       ``−log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)``              2402.05369
    ``robust``         ``[−(1−ε) log σ(z) + ε log σ(−z)] / (1−2ε)``                        2403.00409
    ``bco_pair``       ``−log σ(β r_w − δ) − log σ(−(β r_l − δ))``                         2404.04656
    ``sppo_hard``      ``(r_w − 1/(2β))² + (r_l + 1/(2β))²``                               2405.00675
    ``aot``            sigmoid (with ε) of ``β(sort(u)_i − sort(v)_i)``, ``u = logp_θ(y_w) −
                       logp_θ(y_l)``, ``v`` the same for the reference, sorted over the batch  2406.05882
    ``aot_unpaired``   sigmoid (with ε) of ``β(sort(r_w)_i − sort(r_l)_i)``                 2406.05882
    ``apo_zero``       ``1 − σ(β r_w) + σ(β r_l)``                                         2408.06266
    ``apo_down``       ``σ(β r_w) + 1 − σ(β(r_w − r_l))``                                  2408.06266
    ``discopop``       ``(1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·e^{−z}``                         2406.08414
    ``sft``            ``−Σ_j logp_θ(y_w,j) / Σ_j |y_w,j|`` (token mean over the batch,
                       the same value for every i, as TRL)
    ``sigmoid_norm``   ``−log σ(β(ψ_w/|y_w| − ψ_l/|y_l|))``
    =================  ================================================================  ===========

    Args:
        policy_chosen, policy_rejected: ``[B]`` summed policy log-probs (with grad). For LD-DPO pass
            :func:`ld_logps` of them (and of the references).
        ref_chosen, ref_rejected: ``[B]`` (or ``[K, B]``, index 0 used) reference log-probs.
        loss_types: one type or a list (:data:`LOSS_TYPES`); MPO is ``["sigmoid", "bco_pair", "sft"]``.
        loss_weights: ``w_t`` per type (default all 1).
        beta: β (IPO: its τ).
        label_smoothing: ε of ``robust`` (flip rate, [0, ½)), ``exo_pair`` ((0, 1), paper 1e-3),
            ``aot``/``aot_unpaired`` and — unlike TRL 1.16, which ignores it there — ``sigmoid``
            (conservative DPO, as :func:`preftune.losses.dpo`).
        f_divergence: ψ (:func:`f_divergence_score`); a non-default value is allowed only when every
            type is in :data:`MARGIN_LOSS_TYPES`, as in TRL.
        f_alpha: α of ``alpha_divergence`` (TRL's ``f_alpha_divergence_coef``).
        discopop_tau: τ of ``discopop`` (paper and TRL: 0.05).
        bco_delta: δ, BCO's reward shift in β-scaled reward units (TRL 1.16 uses 0; see
            :func:`bco_running_delta` for the paper's running mean).
        chosen_lengths, rejected_lengths: ``[B]`` completion-token counts (``ipo``, ``sigmoid_norm``,
            ``sft``); clamped to ≥ 1.
        pair_weights: ``[B]`` per-pair weights ``ω_i`` multiplying every type's ``ℓ_t,i`` (WPO:
            :func:`wpo_weights`); detached here. Not allowed with ``aot``/``aot_unpaired`` (they sort).

    Returns:
        :class:`LossOutput`: ``losses[i] = Σ_t w_t ω_i ℓ_t,i`` (for ``aot`` types, position i of the
        sorted contrasts, not pair i); metrics with TRL's names (``rewards/*`` = β·r regardless of ψ,
        ``logps/*``), ``loss/<type>`` per type when several are combined, ``bco/delta`` and
        ``wpo/weight`` where used.
    """
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not types:
        raise ValueError(f"loss_types is empty; choose from {LOSS_TYPES}")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss type(s) {unknown}; valid: {', '.join(LOSS_TYPES)}")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types {types}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    if f_divergence != "reverse_kl" and not set(types) <= MARGIN_LOSS_TYPES:
        raise ValueError(
            f"f_divergence={f_divergence!r} applies only to {sorted(MARGIN_LOSS_TYPES)}, got {types}: the other "
            "types have no f-divergence generalisation"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if pair_weights is not None and {"aot", "aot_unpaired"} & set(types):
        raise ValueError(
            "pair_weights (WPO) cannot be used with aot/aot_unpaired: they sort and lose the pairs"
        )

    dtype = compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    pc = as_float(policy_chosen, dtype, detach=False)
    pr = as_float(policy_rejected, dtype, detach=False)
    if pc.dim() != 1 or pc.shape != pr.shape:
        raise ValueError(f"policy log-probs must both be [B], got {tuple(pc.shape)} and {tuple(pr.shape)}")
    rc, rr = _ref(ref_chosen, "ref_chosen", pc), _ref(ref_rejected, "ref_rejected", pc)
    r_w, r_l = pc - rc, pr - rr
    psi_w = f_divergence_score(r_w, f_divergence, f_alpha)
    psi_l = f_divergence_score(r_l, f_divergence, f_alpha)
    omega = None
    if pair_weights is not None:
        omega = as_float(torch.as_tensor(pair_weights, dtype=dtype, device=pc.device), dtype, detach=True)
        if omega.shape != pc.shape:
            raise ValueError(f"pair_weights has shape {tuple(omega.shape)}, expected {tuple(pc.shape)}")
    # a Python float must not pass through float32 on its way to a float64 computation
    delta = as_float(torch.as_tensor(bco_delta, dtype=dtype, device=pc.device), dtype, detach=True)

    def sigmoid_eps(z: Tensor) -> Tensor:
        return margin_link(z, "sigmoid", 1.0, label_smoothing=label_smoothing)

    total: Tensor | None = None
    per_type: dict[str, Tensor] = {}
    for loss_type, w in zip(types, weights, strict=True):
        if loss_type in ("sigmoid", "hinge", "robust", "exo_pair", "discopop"):
            eps = label_smoothing if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0
            ell = margin_link(psi_w - psi_l, loss_type, beta, label_smoothing=eps, tau=discopop_tau)
        elif loss_type in ("ipo", "sigmoid_norm"):
            why = f"loss type {loss_type!r}"
            norm = psi_w / _lengths(chosen_lengths, "chosen_lengths", pc, why) - psi_l / _lengths(
                rejected_lengths, "rejected_lengths", pc, why
            )
            ell = margin_link(norm, "ipo" if loss_type == "ipo" else "sigmoid", beta)
        elif loss_type == "nca_pair":
            ell = (
                -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)
            )
        elif loss_type == "bco_pair":
            ell = -F.logsigmoid(beta * r_w - delta) - F.logsigmoid(-(beta * r_l - delta))
        elif loss_type == "sppo_hard":
            ell = (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2
        elif loss_type == "aot":
            u, _ = torch.sort(pc - pr)
            v, _ = torch.sort(rc - rr)
            ell = sigmoid_eps(beta * (u - v))
        elif loss_type == "aot_unpaired":
            ell = sigmoid_eps(beta * (torch.sort(r_w)[0] - torch.sort(r_l)[0]))
        elif loss_type == "apo_zero":
            ell = (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)
        elif loss_type == "apo_down":
            ell = torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))
        else:  # sft
            lengths = _lengths(chosen_lengths, "chosen_lengths", pc, "loss type 'sft'")
            # TRL's token mean over the whole batch, not a mean of per-sequence means
            pooled = -pc.sum() / lengths.sum() if pc.numel() else pc.sum()
            ell = pooled.expand(pc.shape)
        if omega is not None:
            ell = ell * omega
        per_type[loss_type] = ell
        total = w * ell if total is None else total + w * ell

    assert total is not None
    with torch.no_grad():
        metrics = reward_metrics(beta, r_w.detach(), r_l.detach(), pc, pr) if pc.numel() else {}
        if pc.numel():
            if len(types) > 1:
                for name, ell in per_type.items():
                    metrics[f"loss/{name}"] = ell.detach().mean()
            if "bco_pair" in types:
                metrics["bco/delta"] = delta.clone()
            if omega is not None:
                metrics["wpo/weight"] = omega.mean()
    return LossOutput(
        loss=safe_mean(total),
        losses=total,
        metrics=metrics,
        chosen_rewards=beta * r_w.detach(),
        rejected_rewards=beta * r_l.detach(),
    )


# --------------------------------------------------------------------------------------------------
# named losses (thin wrappers)


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


def nca_pair(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """NCA, pairwise (Chen et al., arXiv 2402.05369): absolute, not relative, likelihood.

    ``ℓ = −log σ(r_θ(y_w)) − ½ log σ(−r_θ(y_w)) − ½ log σ(−r_θ(y_l))`` with ``r_θ = β·r``.
    """
    return dpo_family_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_types="nca_pair", beta=beta, **options
    )


def bco_pair(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    delta: float | Tensor = 0.0,
    **options: Any,
) -> LossOutput:
    """BCO on pairs (Jung et al., arXiv 2404.04656): binary classifier with reward shift δ.

    ``ℓ = −log σ(r_θ(y_w) − δ) − log σ(−(r_θ(y_l) − δ))``, ``r_θ = β·r``. δ, in the same units as
    ``r_θ``, is the paper's running mean of the rewards (:func:`bco_running_delta`); TRL 1.16's
    ``bco_pair`` keeps no running state and uses δ = 0, the default here.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="bco_pair",
        beta=beta,
        bco_delta=delta,
        **options,
    )


def bco_running_delta(
    delta: float | Tensor, count: int, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> tuple[Tensor, int]:
    """BCO's reward shift: running mean, over training steps, of each batch's mean reward.

    Convention (that of TRL's former BCO implementation): the batch reward is the mean of
    ``r_θ = β·r`` over the batch's chosen *and* rejected responses; δ is the equally weighted mean of
    these batch rewards over all steps so far, **including the current one** (update first, then
    compute the loss with the new δ). Start with ``delta=0, count=0``.

    Args:
        delta: current δ.
        count: number of batches δ averages.
        chosen_rewards, rejected_rewards: this batch's ``β·r`` (e.g. ``LossOutput.chosen_rewards``).

    Returns:
        ``(new_delta, count + 1)``, δ detached (no gradient flows through the shift).
    """
    batch = torch.cat([chosen_rewards.detach().reshape(-1), rejected_rewards.detach().reshape(-1)])
    batch_mean = batch.to(compute_dtype(batch)).mean()
    old = torch.as_tensor(delta, dtype=batch_mean.dtype, device=batch_mean.device)
    return old + (batch_mean - old) / (count + 1), count + 1


def sppo_hard(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """SPPO with hard labels (Wu et al., arXiv 2405.00675, Eq. 4.7 with P(y_w ≻ π_t) = 1, P(y_l ≻ π_t) = 0).

    ``ℓ = (log(π_θ/π_t)(y_w) − η/2)² + (log(π_θ/π_t)(y_l) + η/2)²`` with ``η = 1/β`` and the
    reference as π_t (the previous iteration's policy in the paper).
    """
    return dpo_family_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_types="sppo_hard", beta=beta, **options
    )


def aot(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **options: Any,
) -> LossOutput:
    """AOT, paired (Melnyk et al., arXiv 2406.05882): first-order stochastic dominance via sorting.

    ``u_i = log π_θ(y_w,i) − log π_θ(y_l,i)``, ``v_i`` the same under the reference; with
    ``u_(i)``, ``v_(i)`` sorted ascending over the batch, ``ℓ_i = −(1−ε) log σ(β(u_(i) − v_(i))) −
    ε log σ(−β(u_(i) − v_(i)))``. Couples the batch: ``losses[i]`` belongs to the i-th order statistic.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="aot",
        beta=beta,
        label_smoothing=label_smoothing,
        **options,
    )


def aot_unpaired(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **options: Any,
) -> LossOutput:
    """AOT, unpaired (arXiv 2406.05882): the chosen log-ratios dominate the rejected ones.

    ``ℓ_i = −(1−ε) log σ(β(r_w,(i) − r_l,(i))) − ε log σ(−β(r_w,(i) − r_l,(i)))`` with ``r_w`` and
    ``r_l`` each sorted ascending over the batch (pairing is discarded).
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="aot_unpaired",
        beta=beta,
        label_smoothing=label_smoothing,
        **options,
    )


def apo_zero(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266, Eq. 7): raise y_w, lower y_l, each absolutely.

    ``ℓ = (1 − σ(β r_w)) + σ(β r_l)``; for data whose chosen outputs beat the model's own.
    """
    return dpo_family_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_types="apo_zero", beta=beta, **options
    )


def apo_down(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """APO-down (arXiv 2408.06266, Eq. 8): lower y_w, and y_l more.

    ``ℓ = σ(β r_w) + (1 − σ(β(r_w − r_l)))``; for data whose chosen outputs are worse than the model's.
    """
    return dpo_family_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_types="apo_down", beta=beta, **options
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


def sft(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor,
    **options: Any,
) -> LossOutput:
    """TRL's ``sft`` loss type: the token-mean NLL of the chosen responses over the whole batch.

    ``L = −Σ_i logp_θ(y_w,i) / Σ_i |y_w,i|`` (every ``losses[i]`` holds this value, as in TRL). Meant
    as a term of :func:`dpo_family_loss`; the references only feed the reward metrics. preftune's
    ``sft_weight`` option of the other losses instead adds the per-pair mean ``−logp_θ(y_w,i)/|y_w,i|``.
    """
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types="sft",
        beta=beta,
        chosen_lengths=chosen_lengths,
        **options,
    )


def f_dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
    **options: Any,
) -> LossOutput:
    """f-DPO (Wang et al., arXiv 2309.16240): DPO under an f-divergence regulariser.

    ``ℓ = −log σ(β·(f'(π_θ(y_w)/π_ref(y_w)) − f'(π_θ(y_l)/π_ref(y_l))))``, ψ as in
    :func:`f_divergence_score`; ``divergence="reverse_kl"`` is DPO. ``**options`` may pick another
    margin loss (``loss_types="hinge"``, ...).
    """
    options.setdefault("loss_types", "sigmoid")
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        f_divergence=divergence,
        f_alpha=alpha,
        **options,
    )


def mpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_weights: Sequence[float] = (0.8, 0.2, 1.0),
    *,
    chosen_lengths: Tensor,
    **options: Any,
) -> LossOutput:
    """MPO (Wang et al., arXiv 2411.10442): ``0.8·sigmoid + 0.2·bco_pair + 1.0·sft``, TRL's example."""
    return dpo_family_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_types=("sigmoid", "bco_pair", "sft"),
        loss_weights=loss_weights,
        beta=beta,
        chosen_lengths=chosen_lengths,
        **options,
    )


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
        x = per_token_logps if per_token_log_sum_sq is None else per_token_logps - per_token_log_sum_sq
        return torch.where(completion_mask.to(torch.bool), x, torch.zeros_like(x)).sum(dim=1)


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
        c = chosen_logps.detach().to(dtype)
        r = rejected_logps.detach().to(dtype)
        lc = torch.as_tensor(chosen_lengths, device=c.device).to(dtype).clamp(min=1.0)
        lr = torch.as_tensor(rejected_lengths, device=c.device).to(dtype).clamp(min=1.0)
        return torch.exp(c / lc + r / lr)


# --------------------------------------------------------------------------------------------------
# Registration as method components (docs/methods.md#the-dpo-family). Each is a link; the pipeline
# (:func:`preftune.losses.preference_loss`) supplies the margin, the pair's rewards or the batch.

_T = Tensor


def _margin(name: str):
    def impl(margin: _T, beta: float, label_smoothing: float, phi: _T | None, **options: Any) -> _T:
        return margin_link(margin, name, beta, label_smoothing=label_smoothing, **options)

    impl.__name__ = f"_{name}_link"
    return impl


def _discopop_link(margin: _T, beta: float, label_smoothing: float, phi: _T | None, tau: float = 0.05) -> _T:
    return margin_link(margin, "discopop", beta, tau=tau)


def _sigmoid_norm_link(margin: _T, beta: float, label_smoothing: float, phi: _T | None) -> _T:
    return margin_link(margin, "sigmoid", beta)


def _nca_pair(r_w: _T, r_l: _T, beta: float) -> _T:
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


def _bco_pair(r_w: _T, r_l: _T, beta: float, delta: float | _T = 0.0) -> _T:
    d = torch.as_tensor(delta, dtype=r_w.dtype, device=r_w.device).detach()
    return -F.logsigmoid(beta * r_w - d) - F.logsigmoid(-(beta * r_l - d))


def _sppo_hard(r_w: _T, r_l: _T, beta: float) -> _T:
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


def _apo_zero(r_w: _T, r_l: _T, beta: float) -> _T:
    return (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)


def _apo_down(r_w: _T, r_l: _T, beta: float) -> _T:
    return torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))


def _aot(pc: _T, pr: _T, rc: _T, rr: _T, beta: float, eps: float, lengths: _T | None) -> _T:
    u = torch.sort(pc - pr)[0]
    v = torch.sort(rc - rr, dim=-1)[0]  # [K', B]: each reference's margins sorted
    return margin_link(u - v, "sigmoid", beta, label_smoothing=eps)


def _aot_unpaired(pc: _T, pr: _T, rc: _T, rr: _T, beta: float, eps: float, lengths: _T | None) -> _T:
    diff = torch.sort(pc - rc, dim=-1)[0] - torch.sort(pr - rr, dim=-1)[0]
    return margin_link(diff, "sigmoid", beta, label_smoothing=eps)


def _sft_pooled(pc: _T, pr: _T, rc: _T, rr: _T, beta: float, eps: float, lengths: _T | None) -> _T:
    n = _lengths(lengths, "chosen_lengths", pc, "the sft link")
    pooled = -pc.sum() / n.sum() if pc.numel() else pc.sum()
    return pooled.expand(rc.shape)


def _exo_check(get) -> str | None:
    eps = get("label_smoothing")
    if not 0.0 < eps < 1.0:
        return f"label_smoothing: exo_pair needs ε in (0, 1) (the paper uses 1e-3), got {eps}"
    return None


def _register_family() -> None:
    from . import links as _links  # noqa: F401  (registers dpo, ipo, hinge first: the listing order)
    from .components import Component, Option, register

    register(
        Component(
            "robust",
            "link",
            "robust",
            _margin("robust"),
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
            _margin("exo_pair"),
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
    rewards = [
        (
            "nca_pair",
            _nca_pair,
            "NCA (pairwise): absolute likelihoods of both responses, not only their difference",
            "ℓ = −log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)",
            "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (arXiv:2402.05369)",
            (),
        ),
        (
            "bco_pair",
            _bco_pair,
            "BCO (pairwise): a binary classifier of chosen vs rejected rewards with shift δ",
            "ℓ = −log σ(β r_w − δ) − log σ(−(β r_l − δ))",
            "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (arXiv:2404.04656)",
            (Option("bco.delta", "delta", link=True),),
        ),
        (
            "sppo_hard",
            _sppo_hard,
            "SPPO with hard labels: squared distance of each reward from ±1/(2β)",
            "ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))²",
            "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675)",
            (),
        ),
        (
            "apo_zero",
            _apo_zero,
            "APO-zero: raise the chosen and lower the rejected likelihood, each absolutely",
            "ℓ = 1 − σ(β r_w) + σ(β r_l)",
            "D'Oosterlinck et al. 2024, Anchored Preference Optimization (arXiv:2408.06266)",
            (),
        ),
        (
            "apo_down",
            _apo_down,
            "APO-down: lower the chosen likelihood, and the rejected one more",
            "ℓ = σ(β r_w) + 1 − σ(β (r_w − r_l))",
            "D'Oosterlinck et al. 2024, Anchored Preference Optimization (arXiv:2408.06266)",
            (),
        ),
    ]
    for name, impl, summary, formula, paper, options in rewards:
        register(
            Component(
                name,
                "link",
                name,
                impl,
                summary=summary,
                formula=formula,
                paper=paper,
                options=options,
                takes="rewards",
            )
        )
    aot_paper = "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (arXiv:2406.05882)"
    batch: list[tuple[str, Callable[..., Tensor], str, str, str, bool]] = [
        (
            "aot",
            _aot,
            "AOT (paired): stochastic dominance of the policy's over the reference's margins, by sorting",
            "ℓ_i = −log σ(β (sort(u)_i − sort(v)_i)),  u = logp_θ(y_w) − logp_θ(y_l), v the same for the reference",
            aot_paper,
            True,
        ),
        (
            "aot_unpaired",
            _aot_unpaired,
            "AOT (unpaired): stochastic dominance of the chosen over the rejected rewards, by sorting",
            "ℓ_i = −log σ(β (sort(r_w)_i − sort(r_l)_i))",
            aot_paper,
            True,
        ),
        (
            "sft",
            _sft_pooled,
            "TRL's sft loss type: token-mean NLL of the chosen responses over the batch (a term of sums)",
            "ℓ = −Σ_i logp_θ(y_w,i) / Σ_i |y_w,i|",
            "supervised fine-tuning; a term of MPO (Wang et al. 2024, arXiv:2411.10442)",
            False,
        ),
    ]
    for name, impl, summary, formula, paper, smoothing in batch:
        register(
            Component(
                name,
                "link",
                name,
                impl,
                summary=summary,
                formula=formula,
                paper=paper,
                label_smoothing=smoothing,
                takes="batch",
            )
        )


_register_family()
