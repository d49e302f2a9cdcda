"""Named losses: thin wrappers that fix the settings of :func:`preference_loss` (no math here).

Every wrapper accepts ``**options``: further keyword arguments of :func:`preference_loss`
(``reference_free``, ``gamma``, ``sft_weight``, ``chosen_lengths``, ``label_smoothing`` where not
named, ...), so e.g. ``dpo(..., reference_free=True, gamma=1.0)`` is SimPO-style DPO.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .aggregation import ClipMode, WeightSpec
from .compose import preference_loss, unpaired_preference_loss
from .output import LossOutput

__all__ = [
    "dpo",
    "ipo",
    "hinge",
    "mrpo",
    "mdpo",
    "mallows_theta",
    "mallows_phi",
    "rpo",
    "rpo_uniform",
    "rpo_diagonal",
    "rpo_unpaired",
]


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **options: Any,
) -> LossOutput:
    """DPO: ``ℓ_i = −(1−ε)·log σ(β Δ_i) − ε·log σ(−β Δ_i)``, ``Δ_i = r(y_w,i) − r(y_l,i)``.

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy log-probs ``logp_θ(y_w|x)``, ``logp_θ(y_l|x)``.
        ref_chosen, ref_rejected: ``[B]`` reference log-probs (None with ``reference_free=True``).
        beta: β.
        label_smoothing: ε (conservative DPO; 0 is plain DPO).
        **options: further :func:`preference_loss` keywords.
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        link="sigmoid",
        label_smoothing=label_smoothing,
        **options,
    )


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """IPO: ``ℓ_i = (Δ_i − 1/(2β))²``.

    Pass **length-normalised** log-probs (summed log-prob / number of completion tokens, policy and
    reference alike), as TRL does internally; the caller normalises, this function does not.
    """
    return preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, link="ipo", **options
    )


def hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """Hinge (SLiC): ``ℓ_i = max(0, 1 − β Δ_i)``."""
    return preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, link="hinge", **options
    )


def mrpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    refs_chosen: Tensor,
    refs_rejected: Tensor,
    beta: float = 0.1,
    weights: WeightSpec = "adaptive",
    clip_eps: float = 0.1,
    clip: ClipMode = "adaptive",
    **options: Any,
) -> LossOutput:
    """MRPO: DPO against the virtual reference ``log π̃ = −logsumexp_k(log α_k − logp_k)`` (docs/methods.md#mrpo).

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy log-probs.
        refs_chosen, refs_rejected: ``[K, B]`` reference log-probs, index 0 the primary reference.
        beta: β.
        weights: ``"adaptive"`` (ARWC, per pair, from unclipped log-probs) or K fixed numbers.
        clip_eps: CTRO radius ε around the primary reference.
        clip: ``"adaptive"``, ``"fixed"`` or ``"none"`` (see :func:`ctro_clip`).
        **options: further :func:`preference_loss` keywords (``label_smoothing``, ``pairing``, ...).
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        refs_chosen,
        refs_rejected,
        beta=beta,
        reference="mrpo",
        weights=weights,
        clip_eps=clip_eps,
        clip=clip,
        **options,
    )


def mdpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    refs_chosen: Tensor,
    refs_rejected: Tensor,
    beta: float = 0.1,
    weights: WeightSpec = "adaptive",
    clip_eps: float = 0.1,
    clip: ClipMode = "adaptive",
    **options: Any,
) -> LossOutput:
    """Multi-DPO baseline: ``ℓ_i = Σ_k α_k,i · DPO_i(π_k)`` with MRPO's α and clipping (docs/methods.md#mdpo)."""
    return preference_loss(
        policy_chosen,
        policy_rejected,
        refs_chosen,
        refs_rejected,
        beta=beta,
        reference="mdpo",
        weights=weights,
        clip_eps=clip_eps,
        clip=clip,
        **options,
    )


def mallows_theta(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    neg_log_dispersion: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **options: Any,
) -> LossOutput:
    """MallowsPO-θ: ``ℓ_i = −log σ(c(x_i) · β · Δ_i)`` (docs/methods.md#mallows_theta).

    Args:
        neg_log_dispersion: ``[B]`` ``c(x) = −log φ(x)`` (see :func:`preftune.losses.neg_log_dispersion`);
            ``c ≡ 1`` is DPO.
        label_smoothing: ε, as in :func:`dpo`.
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        scale=neg_log_dispersion,
        link="sigmoid",
        label_smoothing=label_smoothing,
        **options,
    )


def mallows_phi(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    dispersion: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **options: Any,
) -> LossOutput:
    """MallowsPO-ϕ: ``ℓ_i = −log g_{φ(x_i)}(β Δ_i)`` with the Mallows link (docs/methods.md#mallows_phi).

    Args:
        dispersion: ``[B]`` ``φ(x) ∈ (0, 1)`` (``exp(−c)`` of :func:`neg_log_dispersion`).
        label_smoothing: ε: ``−(1−ε)·log g_φ(βΔ) − ε·log g_φ(−βΔ)``.
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        link="mallows_phi",
        dispersion=dispersion,
        label_smoothing=label_smoothing,
        **options,
    )


def rpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    prompt_embeddings: Tensor,
    beta: float = 0.1,
    tau: float = 0.5,
    **options: Any,
) -> LossOutput:
    """Relative Preference Optimization (Yin et al. 2024), paired (docs/methods.md#rpo).

    ``L = mean_i mean_j −log σ(β·W_ij·S_ij)``, ``S_ij = r(y_w,i) − r(y_l,j)``, ``W`` = row softmax of
    ``−(1 − ê_i·ê_j)/τ``. Not TRL's former ``rpo_alpha`` and not NeMo's reward-aware RPO.

    Args:
        prompt_embeddings: ``[B, d]`` prompt sentence embeddings (any scale; normalised here).
        tau: τ, the similarity temperature.
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        pairing="rpo",
        prompt_embeddings=prompt_embeddings,
        tau=tau,
        **options,
    )


def rpo_uniform(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float = 0.1,
    **options: Any,
) -> LossOutput:
    """RPO ablation with uniform weights ``W ≡ 1/B`` (docs/methods.md#rpo_uniform); needs no embeddings."""
    return preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, pairing="rpo_uniform", **options
    )


def rpo_diagonal(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float = 0.1,
    diagonal_weight: float = 0.8,
    **options: Any,
) -> LossOutput:
    """RPO ablation: ``ℓ_i = w·ℓ_ii + (1−w)·mean_{j≠i} ℓ_ij``, ``ℓ_ij = −log σ(β S_ij)`` (docs/methods.md#rpo_diagonal).

    With a single pair (B = 1) there is no off-diagonal term and ``ℓ_1 = ℓ_11`` (DPO).
    """
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        pairing="rpo_diagonal",
        diagonal_weight=diagonal_weight,
        **options,
    )


def rpo_unpaired(
    policy_chosen: Tensor,
    ref_chosen: Tensor | None,
    chosen_embeddings: Tensor,
    policy_rejected: Tensor,
    ref_rejected: Tensor | None,
    rejected_embeddings: Tensor,
    beta: float = 0.1,
    tau: float = 0.5,
    **options: Any,
) -> LossOutput:
    """Unpaired RPO (docs/methods.md#rpo_unpaired) over a batch of independent chosen and rejected items.

    See :func:`preftune.losses.unpaired_preference_loss`; an empty side gives loss 0 (no NaN).
    """
    return unpaired_preference_loss(
        policy_chosen,
        ref_chosen,
        chosen_embeddings,
        policy_rejected,
        ref_rejected,
        rejected_embeddings,
        beta=beta,
        tau=tau,
        **options,
    )
