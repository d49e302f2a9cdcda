"""TRL 1.16's ``DPOConfig.loss_type`` family as one function, :func:`dpo_family_loss`, and named losses.

Inputs follow the rest of :mod:`preftune.losses`: per-sequence **summed** completion log-probs ``[B]``
of the policy (with grad) and of the reference (``[B]``, or a ``[K, B]`` stack of which index 0, the
primary reference, is used); completion-token counts ``[B]`` where a loss normalises by length.
Every loss returns a :class:`LossOutput`; math runs in float32 (float64 when an input is float64).
See docs/methods.md#the-dpo-family for the formulas, papers, defaults and how each composes with MRPO,
MallowsPO-θ and RPO.

No formula is written here: each loss type is the registered link component of that name, the one the
trainer runs (:mod:`.links`, :mod:`.margin_links`, :mod:`.reward_links`, :mod:`.batch_links`); this
module adds TRL's conventions around them (one reference, ψ divided by length for ``ipo`` and
``sigmoid_norm``, ``loss_weights``, WPO pair weights). The per-pair losses ``ℓ_t,i`` of the types
(``r = logp_θ − logp_ref``, ψ the f-divergence score, ``m = ψ(r_w) − ψ(r_l)``, ``z = β m``,
ε = ``label_smoothing``, δ = ``bco_delta``, ``|y|`` = completion length):

=================  ================================================================  ===========
type               ``ℓ_i``                                                           paper
=================  ================================================================  ===========
``sigmoid``        ``−(1−ε) log σ(z) − ε log σ(−z)`` (TRL ignores ε here)            2305.18290
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

* :func:`dpo_family_loss`: any weighted sum of TRL's 15 loss types (``loss_types`` /
  ``loss_weights``, e.g. MPO), with an f-divergence and WPO pair weights;
* :func:`f_dpo` (an f-divergence) and :func:`mpo` (``sigmoid + bco_pair + sft``), named losses of it.

The named losses of one type (``robust``, ``nca_pair``, ``aot``, ...) are ``dpo_family_loss`` of that
type, written next to their links in :mod:`.margin_links`, :mod:`.reward_links` and
:mod:`.batch_links`; the modifiers live with their formulas: :func:`~.divergences.f_divergence_score`,
LD-DPO (:func:`~.length_weighting.ld_dpo`) and WPO in :mod:`.length_weighting`,
:func:`~.reward_links.bco_running_delta`. All are exported from :mod:`preftune.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .components import Component, lookup
from .divergences import F_DIVERGENCES, FDivergence, f_divergence_score
from .output import (
    LossOutput,
    as_float,
    as_ref_stack,
    checked_lengths,
    compute_dtype,
    reward_metrics,
    safe_mean,
)

__all__ = [
    "LOSS_TYPES",
    "MARGIN_LOSS_TYPES",
    "dpo_family_loss",
    "f_dpo",
    "mpo",
]

#: TRL 1.16's ``DPOConfig.loss_type`` values, all implemented by :func:`dpo_family_loss`; each is the
#: pipeline value of a registered link (``sigmoid`` is the ``dpo`` component).
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


def _checked_types(
    loss_types: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    beta: float,
    f_divergence: str,
    label_smoothing: float,
    pair_weights: Tensor | None,
) -> tuple[list[str], list[float]]:
    """The loss types and their weights, after every check of :func:`dpo_family_loss`'s settings."""
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
    return types, weights


def _primary(ref: Tensor | None, name: str, like: Tensor) -> Tensor:
    """The primary reference's log-probs ``[B]`` of a ``[B]`` or ``[K, B]`` input."""
    if ref is None:
        raise ValueError(f"{name} (reference log-probs) is required")
    stack = as_ref_stack(ref, like.dtype).to(like.device)
    if stack.shape[1] != like.shape[0]:
        raise ValueError(
            f"{name} has shape {tuple(stack.shape)}, which does not match a batch of {like.shape[0]}"
        )
    return stack[0]


def _type_loss(
    component: Component,
    beta: float,
    label_smoothing: float,
    options: dict[str, Any],
    logps: tuple[Tensor, Tensor, Tensor, Tensor],
    scores: tuple[Tensor, Tensor],
    lengths: tuple[Tensor | None, Tensor | None],
) -> Tensor:
    """``ℓ_t,i`` of one loss type: its registered link, on the inputs of its kind (TRL's conventions).

    ``logps``: policy chosen, policy rejected, reference chosen, reference rejected ``[B]``;
    ``scores``: ``ψ(r_w)``, ``ψ(r_l)`` (the rewards themselves unless an f-divergence is set).
    """
    eps = label_smoothing if component.label_smoothing else 0.0
    score_w, score_l = scores
    if component.takes == "rewards":
        return component.impl(score_w, score_l, beta, **options)
    if component.takes == "batch":
        return component.impl(*logps, beta, eps, lengths[0], **options)
    if component.length_normalize:  # ipo, sigmoid_norm: as TRL, each score divided by its length
        why = f"loss type {component.value!r}"
        chosen_n = checked_lengths(lengths[0], "chosen_lengths", logps[0], why)
        rejected_n = checked_lengths(lengths[1], "rejected_lengths", logps[0], why)
        return component.impl(score_w / chosen_n - score_l / rejected_n, beta, eps, None, **options)
    return component.impl(score_w - score_l, beta, eps, None, **options)


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

    ``ℓ_t,i`` is the per-pair loss of type t in the table of this module's docstring: the registered
    link of that name (``sigmoid`` is ``dpo``), which the trainer runs for the same method.

    Args:
        policy_chosen, policy_rejected: ``[B]`` summed policy log-probs (with grad). For LD-DPO pass
            :func:`~.length_weighting.ld_logps` of them (and of the references).
        ref_chosen, ref_rejected: ``[B]`` (or ``[K, B]``, index 0 used) reference log-probs.
        loss_types: one type or a list (:data:`LOSS_TYPES`); MPO is ``["sigmoid", "bco_pair", "sft"]``.
        loss_weights: ``w_t`` per type (default all 1).
        beta: β (IPO: its τ).
        label_smoothing: ε of ``robust`` (flip rate, [0, ½)), ``exo_pair`` ((0, 1), paper 1e-3),
            ``aot``/``aot_unpaired`` and — unlike TRL 1.16, which ignores it there — ``sigmoid``
            (conservative DPO, as :func:`preftune.losses.dpo`).
        f_divergence: ψ (:func:`~.divergences.f_divergence_score`); a non-default value is allowed only when every
            type is in :data:`MARGIN_LOSS_TYPES`, as in TRL.
        f_alpha: α of ``alpha_divergence`` (TRL's ``f_alpha_divergence_coef``).
        discopop_tau: τ of ``discopop`` (paper and TRL: 0.05).
        bco_delta: δ, BCO's reward shift in β-scaled reward units (TRL 1.16 uses 0; see
            :func:`~.reward_links.bco_running_delta` for the paper's running mean).
        chosen_lengths, rejected_lengths: ``[B]`` completion-token counts (``ipo``, ``sigmoid_norm``,
            ``sft``); clamped to ≥ 1.
        pair_weights: ``[B]`` per-pair weights ``ω_i`` multiplying every type's ``ℓ_t,i`` (WPO:
            :func:`~.length_weighting.wpo_weights`); detached here. Not allowed with ``aot``/``aot_unpaired`` (they sort).

    Returns:
        :class:`LossOutput`: ``losses[i] = Σ_t w_t ω_i ℓ_t,i`` (for ``aot`` types, position i of the
        sorted contrasts, not pair i); metrics with TRL's names (``rewards/*`` = β·r regardless of ψ,
        ``logps/*``), ``loss/<type>`` per type when several are combined, ``bco/delta`` and
        ``wpo/weight`` where used.
    """
    types, weights = _checked_types(
        loss_types, loss_weights, beta, f_divergence, label_smoothing, pair_weights
    )
    dtype = compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    policy_chosen = as_float(policy_chosen, dtype, detach=False)
    policy_rejected = as_float(policy_rejected, dtype, detach=False)
    if policy_chosen.dim() != 1 or policy_chosen.shape != policy_rejected.shape:
        raise ValueError(
            f"policy log-probs must both be [B], got {tuple(policy_chosen.shape)} and {tuple(policy_rejected.shape)}"
        )
    ref_chosen = _primary(ref_chosen, "ref_chosen", policy_chosen)
    ref_rejected = _primary(ref_rejected, "ref_rejected", policy_chosen)
    r_w, r_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    scores = f_divergence_score(r_w, f_divergence, f_alpha), f_divergence_score(r_l, f_divergence, f_alpha)
    omega = None
    if pair_weights is not None:
        omega = as_float(
            torch.as_tensor(pair_weights, dtype=dtype, device=policy_chosen.device), dtype, detach=True
        )
        if omega.shape != policy_chosen.shape:
            raise ValueError(
                f"pair_weights has shape {tuple(omega.shape)}, expected {tuple(policy_chosen.shape)}"
            )
    # a Python float must not pass through float32 on its way to a float64 computation
    delta = as_float(torch.as_tensor(bco_delta, dtype=dtype, device=policy_chosen.device), dtype, detach=True)
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    lengths = (chosen_lengths, rejected_lengths)
    total: Tensor | None = None
    per_type: dict[str, Tensor] = {}
    for loss_type, weight in zip(types, weights, strict=True):
        component = lookup("link", loss_type)
        options = component.own_options({"tau": discopop_tau, "delta": delta})
        ell = _type_loss(component, beta, label_smoothing, options, logps, scores, lengths)
        if omega is not None:
            ell = ell * omega
        per_type[loss_type] = ell
        total = weight * ell if total is None else total + weight * ell
    assert total is not None
    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if policy_chosen.numel():
            metrics = reward_metrics(beta, r_w.detach(), r_l.detach(), policy_chosen, policy_rejected)
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
# named losses of several types or a modifier (the single-type ones live with their links)


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
    :func:`~.divergences.f_divergence_score`; ``divergence="reverse_kl"`` is DPO. ``**options`` may pick another
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
