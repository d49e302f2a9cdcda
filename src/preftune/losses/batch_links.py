"""The DPO family's batch links: losses that sort or pool over the whole batch.

Each is a function ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
label_smoothing, chosen_lengths) -> [K', B]`` registered with ``takes="batch"``: it composes with the
reference aggregators only (sorting and pooling lose the pair ↔ row correspondence that a scale,
RPO's pairing and WPO need). ``u``, ``v`` below are the policy's and the reference's margins; see
docs/methods.md#the-dpo-family.

* ``aot`` (AOT paired, arXiv 2406.05882): the ``sigmoid`` link (with ε) of ``sort(u)_i − sort(v)_i``;
* ``aot_unpaired`` (arXiv 2406.05882): the ``sigmoid`` link (with ε) of ``sort(r_w)_i − sort(r_l)_i``;
* ``sft`` (TRL's loss type): ``−Σ_i logp_θ(y_w,i) / Σ_i |y_w,i|``, the same value for every row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .components import Component, register
from .family import dpo_family_loss
from .links import sigmoid_link  # importing links registers dpo, ipo, hinge first (the listing order)
from .output import LossOutput, checked_lengths

__all__ = ["aot", "aot_unpaired", "sft"]

_AOT = (
    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (arXiv:2406.05882)"
)


def _aot(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float,
    chosen_lengths: Tensor | None,
) -> Tensor:
    policy_margins = torch.sort(policy_chosen - policy_rejected)[0]
    ref_margins = torch.sort(ref_chosen - ref_rejected, dim=-1)[0]  # [K', B]: each reference's, sorted
    return sigmoid_link(policy_margins - ref_margins, beta, label_smoothing, None)


register(
    Component(
        "aot",
        "link",
        "aot",
        _aot,
        summary="AOT (paired): stochastic dominance of the policy's over the reference's margins, by sorting",
        formula="ℓ_i = −log σ(β (sort(u)_i − sort(v)_i)),  u = logp_θ(y_w) − logp_θ(y_l), v the same for the reference",
        paper=_AOT,
        label_smoothing=True,
        takes="batch",
    )
)


def _aot_unpaired(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float,
    chosen_lengths: Tensor | None,
) -> Tensor:
    sorted_chosen = torch.sort(policy_chosen - ref_chosen, dim=-1)[0]
    sorted_rejected = torch.sort(policy_rejected - ref_rejected, dim=-1)[0]
    return sigmoid_link(sorted_chosen - sorted_rejected, beta, label_smoothing, None)


register(
    Component(
        "aot_unpaired",
        "link",
        "aot_unpaired",
        _aot_unpaired,
        summary="AOT (unpaired): stochastic dominance of the chosen over the rejected rewards, by sorting",
        formula="ℓ_i = −log σ(β (sort(r_w)_i − sort(r_l)_i))",
        paper=_AOT,
        label_smoothing=True,
        takes="batch",
    )
)


def _sft_pooled(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float,
    chosen_lengths: Tensor | None,
) -> Tensor:
    lengths = checked_lengths(chosen_lengths, "chosen_lengths", policy_chosen, "loss type 'sft'")
    # TRL's token mean over the whole batch, not a mean of per-sequence means
    pooled = -policy_chosen.sum() / lengths.sum() if policy_chosen.numel() else policy_chosen.sum()
    return pooled.expand(ref_chosen.shape)


register(
    Component(
        "sft",
        "link",
        "sft",
        _sft_pooled,
        summary="TRL's sft loss type: token-mean NLL of the chosen responses over the batch (a term of sums)",
        formula="ℓ = −Σ_i logp_θ(y_w,i) / Σ_i |y_w,i|",
        paper="supervised fine-tuning; a term of MPO (Wang et al. 2024, arXiv:2411.10442)",
        takes="batch",
    )
)


# --------------------------------------------------------------------------------------------------
# the named losses: dpo_family_loss of one type, as TRL computes it (exported from preftune.losses)


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
