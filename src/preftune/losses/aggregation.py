"""Reference aggregation: one reference, the MRPO virtual reference, or MDPO's weighted references.

All functions here work on detached ``[K, B]`` stacks of reference log-probs (index 0 is the primary
reference) and never carry gradient. See docs/methods.md#mrpo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .components import Component, Option, lookup, register
from .output import as_ref_stack, compute_dtype

__all__ = [
    "ReferenceMode",
    "ClipMode",
    "WeightSpec",
    "arwc_weights",
    "released_weights",
    "validation_weights",
    "ctro_clip",
    "reference_weights",
    "virtual_reference",
    "aggregate_references",
]

ReferenceMode = Literal["single", "mrpo", "mdpo"]
ClipMode = Literal["adaptive", "fixed", "none"]
#: ``"adaptive"`` (ARWC), ``"adaptive_released"`` (ARWC paired as in the authors' released code), K
#: fixed numbers, or a Tensor: ``[K]`` fixed or ``[K, B]`` per-pair weights (normalised per pair).
WeightSpec = Literal["adaptive", "adaptive_released"] | Sequence[float] | Tensor


def arwc_weights(refs_chosen: Tensor, refs_rejected: Tensor) -> Tensor:
    """Adaptive reference weights (ARWC), per pair: ``α_k = |m_k| / Σ_j |m_j|``.

    Args:
        refs_chosen: ``[K, B]`` reference log-probs ``logp_k(y_w|x)``.
        refs_rejected: ``[K, B]`` reference log-probs ``logp_k(y_l|x)``.

    Returns:
        ``[K, B]`` detached weights, each column summing to 1. ``m_k = logp_k(y_w) − logp_k(y_l)``.
        Where every ``m_k`` of a pair is 0 the weights fall back to uniform ``1/K`` (the paper's "tiny ε
        in the sum" would give all-zero weights and an infinite virtual reference there; dividing
        exactly also makes ``K = 1`` give ``α = 1`` bit for bit).
    """
    margins = (refs_chosen - refs_rejected).detach().abs()
    total = margins.sum(dim=0, keepdim=True)
    k = margins.shape[0]
    uniform = torch.full_like(margins, 1.0 / k)
    return torch.where(total > 0, margins / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def released_weights(refs_chosen: Tensor, refs_rejected: Tensor) -> Tensor:
    """ARWC as paired by the MRPO authors' released two-reference code: ``[K=2, B]`` weights.

    The released code multiplies the *primary* reference's term by the weight computed from the second
    reference's margin (and vice versa): ``α_0 = |m_1|/(|m_0|+|m_1|)``, ``α_1 = |m_0|/(|m_0|+|m_1|)``,
    i.e. :func:`arwc_weights` with its two rows swapped. The paper (and ``"adaptive"``) attaches each
    weight to its own reference. Defined for exactly two references, as the released code is.
    """
    if refs_chosen.shape[0] != 2:
        raise ValueError(
            f"weights='adaptive_released' is defined for exactly 2 references (the released code's), "
            f"got K = {refs_chosen.shape[0]}"
        )
    return arwc_weights(refs_chosen, refs_rejected).flip(0)


def validation_weights(
    refs_chosen: Tensor, refs_rejected: Tensor, temperature: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Fixed reference weights from a validation split: ``α = softmax_k(acc_k / T)``.

    ``acc_k`` is reference k's preference accuracy on the validation pairs, the fraction with
    ``logp_k(y_w|x) > logp_k(y_l|x)`` (a tie counts one half). The weights are computed once, before
    training, on rows that are never trained on, so no pair sets its own weight (unlike ARWC).

    Args:
        refs_chosen, refs_rejected: ``[K, N]`` reference log-probs of the N validation pairs.
        temperature: T > 0; T → 0 puts all weight on the most accurate reference(s), T → ∞ is uniform.

    Returns:
        ``(weights [K], accuracies [K])`` in float64.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if refs_chosen.shape != refs_rejected.shape or refs_chosen.dim() != 2 or refs_chosen.shape[1] == 0:
        raise ValueError(
            f"validation log-probs must be two equal [K, N] stacks with N >= 1, got "
            f"{tuple(refs_chosen.shape)} and {tuple(refs_rejected.shape)}"
        )
    c, r = refs_chosen.detach().double(), refs_rejected.detach().double()
    accuracy = ((c > r).double() + 0.5 * (c == r).double()).mean(dim=1)
    return torch.softmax(accuracy / temperature, dim=0), accuracy


def reference_weights(weights: WeightSpec, refs_chosen: Tensor, refs_rejected: Tensor) -> Tensor:
    """``[K, B]`` weights α: ``"adaptive"`` (ARWC), ``"adaptive_released"``, K fixed non-negative numbers,
    or a ``[K, B]`` tensor of per-pair weights; fixed and per-pair weights are normalised per pair."""
    if isinstance(weights, str):
        if weights == "adaptive":
            return arwc_weights(refs_chosen, refs_rejected)
        if weights == "adaptive_released":
            return released_weights(refs_chosen, refs_rejected)
        hint = (
            " ('validation' weights are computed by the trainer before training; pass them as K numbers)"
            if weights == "validation"
            else ""
        )
        raise ValueError(
            f"weights must be 'adaptive', 'adaptive_released', K numbers or [K, B] per-pair weights, "
            f"got {weights!r}{hint}"
        )
    k, b = refs_chosen.shape
    if isinstance(weights, Tensor):
        w = weights.detach().to(device=refs_chosen.device, dtype=refs_chosen.dtype)
        if w.dim() == 2:
            return _per_pair(w, k, b)
        w = w.flatten()
    else:  # straight to the compute dtype: a float32 detour would round 0.2
        w = torch.tensor([float(x) for x in weights], dtype=refs_chosen.dtype, device=refs_chosen.device)
    if w.numel() != k:
        raise ValueError(f"got {w.numel()} reference weights for K = {k} references")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"reference weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return (w / w.sum()).unsqueeze(1).expand(k, b)


def _per_pair(w: Tensor, k: int, b: int) -> Tensor:
    """Per-pair weights ``[K, B]``, each column normalised to sum 1 (validated column by column)."""
    if w.shape != (k, b):
        raise ValueError(f"per-pair reference weights must be [K, B] = [{k}, {b}], got {tuple(w.shape)}")
    total = w.sum(dim=0, keepdim=True)
    bad = (w < 0).any(dim=0) | ~torch.isfinite(w).all(dim=0) | (total[0] <= 0)
    if bool(bad.any()):
        col = int(bad.nonzero()[0])
        raise ValueError(
            f"per-pair reference weights must be finite, non-negative and not all zero in every column; "
            f"pair {col} has {w[:, col].tolist()}"
        )
    return w / total


def ctro_clip(
    refs_chosen: Tensor, refs_rejected: Tensor, clip_eps: float = 0.1, clip: ClipMode = "adaptive"
) -> tuple[Tensor, Tensor]:
    """Clipped trust region (CTRO): clip every non-primary reference into a band around the primary.

    ``logp_k(y) ← clamp(logp_k(y), logp_0(y) − ε_y·|logp_0(y)|, logp_0(y) + ε_y·|logp_0(y)|)`` for
    ``k ≥ 1``, separately for chosen (``ε_w``) and rejected (``ε_l``). For the usual negative
    log-probs this is the paper's ``clamp(logp_k, logp_0·(1+ε), logp_0·(1−ε))``.

    Args:
        refs_chosen, refs_rejected: ``[K, B]`` unclipped reference log-probs.
        clip_eps: ε, the total relative radius.
        clip: ``"adaptive"`` (default): ``ε_w = ε·|b_w|/(|b_w|+|b_l|)``, ``ε_l = ε − ε_w`` with
            ``b_w = mean_k logp_k(y_w)``, ``b_l = mean_k logp_k(y_l)`` per pair (``ε/2`` each when both
            are 0); ``"fixed"``: ``ε_w = ε_l = ε``; ``"none"``: no clipping.
    """
    if clip == "none" or refs_chosen.shape[0] == 1:
        return refs_chosen, refs_rejected
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if clip == "adaptive":
        b_w = refs_chosen.mean(dim=0).abs()
        b_l = refs_rejected.mean(dim=0).abs()
        denom = b_w + b_l
        share = torch.where(denom > 0, b_w / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.5)
        eps_w = clip_eps * share
        eps_l = clip_eps - eps_w
    elif clip == "fixed":
        eps_w = eps_l = torch.full_like(refs_chosen[0], clip_eps)
    else:
        raise ValueError(f"clip must be 'adaptive', 'fixed' or 'none', got {clip!r}")

    def _clip(refs: Tensor, eps: Tensor) -> Tensor:
        primary = refs[0]
        radius = eps * primary.abs()
        others = torch.minimum(torch.maximum(refs[1:], primary - radius), primary + radius)
        return torch.cat([refs[:1], others], dim=0)

    return _clip(refs_chosen, eps_w), _clip(refs_rejected, eps_l)


def _log_harmonic_mix(refs: Tensor, alpha: Tensor) -> Tensor:
    """``−logsumexp_k(log α_k − logp_k)``; terms with ``α_k = 0`` are dropped (never ``−inf + inf``)."""
    log_alpha = torch.log(alpha.clamp(min=torch.finfo(alpha.dtype).tiny))
    terms = torch.where(alpha > 0, log_alpha - refs, torch.full_like(refs, -torch.inf))
    return -torch.logsumexp(terms, dim=0)


def virtual_reference(
    refs_chosen: Tensor,
    refs_rejected: Tensor,
    weights: WeightSpec = "adaptive",
    clip_eps: float = 0.1,
    clip: ClipMode = "adaptive",
) -> tuple[Tensor, Tensor]:
    """MRPO virtual reference log-probs ``log π̃(y|x) = −logsumexp_k(log α_k − logp_k(y|x))``.

    α comes from the *unclipped* log-probs (ARWC, or the fixed ``weights``); the CTRO-clipped
    log-probs enter the mix (docs/methods.md#mrpo, "decisions"). The result is a weighted harmonic mean of the
    reference probabilities, so it lies between ``min_k`` and ``max_k`` of the clipped references.

    Args:
        refs_chosen, refs_rejected: ``[K, B]`` (or ``[B]`` for ``K = 1``) reference log-probs.
        weights: ``"adaptive"``, ``"adaptive_released"``, K fixed non-negative numbers or ``[K, B]``
            per-pair weights (normalised per pair).
        clip_eps, clip: see :func:`ctro_clip`.

    Returns:
        ``(chosen [B], rejected [B])`` detached virtual-reference log-probs.
    """
    dtype = compute_dtype(torch.as_tensor(refs_chosen), torch.as_tensor(refs_rejected))
    agg = aggregate_references(
        as_ref_stack(refs_chosen, dtype), as_ref_stack(refs_rejected, dtype), "mrpo", weights, clip_eps, clip
    )
    return agg.chosen[0], agg.rejected[0]


@dataclass
class ReferenceAggregate:
    """Per-response reference log-probs after aggregation.

    ``chosen``/``rejected`` are ``[K', B]``: ``K' = 1`` for single/MRPO, ``K' = K`` (clipped) for MDPO,
    whose per-reference losses are then mixed with ``weights`` ``[K', B]`` (all ones when ``K' = 1``).
    ``reward_chosen``/``reward_rejected`` ``[B]`` are the references used for logged rewards.
    """

    chosen: Tensor
    rejected: Tensor
    weights: Tensor
    reward_chosen: Tensor
    reward_rejected: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def aggregate_references(
    refs_chosen: Tensor,
    refs_rejected: Tensor,
    mode: ReferenceMode | str = "single",
    weights: WeightSpec = "adaptive",
    clip_eps: float = 0.1,
    clip: ClipMode = "adaptive",
) -> ReferenceAggregate:
    """Combine detached ``[K, B]`` reference stacks with the registered reference aggregator ``mode``."""
    if refs_chosen.shape != refs_rejected.shape:
        raise ValueError(
            f"refs_chosen {tuple(refs_chosen.shape)} and refs_rejected {tuple(refs_rejected.shape)} differ"
        )
    return lookup("reference", mode).impl(refs_chosen, refs_rejected, weights, clip_eps, clip)


def _single(
    refs_chosen: Tensor, refs_rejected: Tensor, weights: WeightSpec, clip_eps: float, clip: ClipMode
) -> ReferenceAggregate:
    chosen, rejected = refs_chosen[:1], refs_rejected[:1]
    return ReferenceAggregate(chosen, rejected, torch.ones_like(chosen), chosen[0], rejected[0])


def _weighted_clipped(
    mode: str,
    refs_chosen: Tensor,
    refs_rejected: Tensor,
    weights: WeightSpec,
    clip_eps: float,
    clip: ClipMode,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """α (from the unclipped log-probs), the CTRO-clipped stacks and the logged α / clip metrics."""
    alpha = reference_weights(weights, refs_chosen, refs_rejected)
    clipped_c, clipped_r = ctro_clip(refs_chosen, refs_rejected, clip_eps, clip)
    with torch.no_grad():
        metrics = {f"{mode}/alpha_{k}": alpha[k].mean() for k in range(alpha.shape[0])}
        if refs_chosen.shape[0] > 1:
            moved = torch.cat([clipped_c[1:] != refs_chosen[1:], clipped_r[1:] != refs_rejected[1:]])
            metrics[f"{mode}/clip_fraction"] = moved.to(alpha.dtype).mean()
    return alpha, clipped_c, clipped_r, metrics


def _mrpo(
    refs_chosen: Tensor, refs_rejected: Tensor, weights: WeightSpec, clip_eps: float, clip: ClipMode
) -> ReferenceAggregate:
    alpha, clipped_c, clipped_r, metrics = _weighted_clipped(
        "mrpo", refs_chosen, refs_rejected, weights, clip_eps, clip
    )
    virtual_chosen = _log_harmonic_mix(clipped_c, alpha)
    virtual_rejected = _log_harmonic_mix(clipped_r, alpha)
    return ReferenceAggregate(
        virtual_chosen[None],
        virtual_rejected[None],
        torch.ones_like(virtual_chosen[None]),
        virtual_chosen,
        virtual_rejected,
        metrics,
    )


def _mdpo(
    refs_chosen: Tensor, refs_rejected: Tensor, weights: WeightSpec, clip_eps: float, clip: ClipMode
) -> ReferenceAggregate:
    alpha, clipped_c, clipped_r, metrics = _weighted_clipped(
        "mdpo", refs_chosen, refs_rejected, weights, clip_eps, clip
    )
    # Keep every (clipped) reference; rewards are logged against the α-weighted arithmetic mean.
    mix_c = torch.where(alpha > 0, alpha * clipped_c, 0.0).sum(0)
    mix_r = torch.where(alpha > 0, alpha * clipped_r, 0.0).sum(0)
    return ReferenceAggregate(clipped_c, clipped_r, alpha, mix_c, mix_r, metrics)


_MRPO_OPTIONS = (
    Option("mrpo.weights", "weights"),
    Option("mrpo.clip_eps", "clip_eps"),
    Option("mrpo.clip", "clip"),
    Option("mrpo.allow_single_reference"),
)
register(
    Component(
        "single",
        "reference",
        "single",
        _single,
        summary="the primary reference alone (default)",
        formula="log π_ref = logp_0",
        supports_unpaired=True,
        selectable=False,
    )
)
register(
    Component(
        "mrpo",
        "reference",
        "mrpo",
        _mrpo,
        summary="MRPO: one virtual reference, a weighted harmonic mix of K clipped references",
        formula="log π̃(y|x) = −logsumexp_k(log α_k − logp_k(y|x))",
        paper="Le et al. 2024, Multi-Reference Preference Optimization for Large Language Models (arXiv:2405.16388)",
        needs=frozenset({"multi_reference"}),
        options=_MRPO_OPTIONS,
    )
)
register(
    Component(
        "mdpo",
        "reference",
        "mdpo",
        _mdpo,
        summary="multi-DPO baseline: α-weighted sum of the per-reference losses",
        formula="ℓ = Σ_k α_k · ℓ(reference k)",
        paper="the multi-reference baseline of Le et al. 2024 (arXiv:2405.16388)",
        needs=frozenset({"multi_reference"}),
        options=_MRPO_OPTIONS,
    )
)
