"""The DPO family's reward-pair links: losses of a pair's two implicit rewards, not of their difference.

Each is a function ``(r_w, r_l, beta, **own_options) -> loss`` of the unscaled rewards
``r = logp_θ(y) − logp_ref(y)`` of the chosen and the rejected response (any shape, ``[K', B]`` in the
pipeline), registered as a component with ``takes="rewards"``: it composes with the reference
aggregators, not with RPO's contrasts or a MallowsPO-θ scale (see
:data:`preftune.losses.registry.KIND_REFUSALS`). See docs/methods.md#the-dpo-family.

* ``nca_pair`` (arXiv 2402.05369): ``−log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)``;
* ``bco_pair`` (arXiv 2404.04656): ``−log σ(β r_w − δ) − log σ(−(β r_l − δ))``, with
  :func:`bco_running_delta` for the paper's running δ;
* ``sppo_hard`` (arXiv 2405.00675): ``(r_w − 1/(2β))² + (r_l + 1/(2β))²``;
* ``apo_zero`` / ``apo_down`` (arXiv 2408.06266): ``1 − σ(β r_w) + σ(β r_l)`` /
  ``σ(β r_w) + 1 − σ(β(r_w − r_l))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .components import Component, Option, register
from .family import dpo_family_loss
from .output import LossOutput, compute_dtype

__all__ = ["nca_pair", "bco_pair", "bco_running_delta", "sppo_hard", "apo_zero", "apo_down"]


_APO = "D'Oosterlinck et al. 2024, Anchored Preference Optimization (arXiv:2408.06266)"


def _nca_pair(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


register(
    Component(
        "nca_pair",
        "link",
        "nca_pair",
        _nca_pair,
        summary="NCA (pairwise): absolute likelihoods of both responses, not only their difference",
        formula="ℓ = −log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)",
        paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (arXiv:2402.05369)",
        takes="rewards",
    )
)


def _bco_pair(r_w: Tensor, r_l: Tensor, beta: float, delta: float | Tensor = 0.0) -> Tensor:
    shift = torch.as_tensor(delta, dtype=r_w.dtype, device=r_w.device).detach()
    return -F.logsigmoid(beta * r_w - shift) - F.logsigmoid(-(beta * r_l - shift))


register(
    Component(
        "bco_pair",
        "link",
        "bco_pair",
        _bco_pair,
        summary="BCO (pairwise): a binary classifier of chosen vs rejected rewards with shift δ",
        formula="ℓ = −log σ(β r_w − δ) − log σ(−(β r_l − δ))",
        paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (arXiv:2404.04656)",
        options=(Option("bco.delta", "delta", link=True),),
        takes="rewards",
    )
)


def _sppo_hard(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


register(
    Component(
        "sppo_hard",
        "link",
        "sppo_hard",
        _sppo_hard,
        summary="SPPO with hard labels: squared distance of each reward from ±1/(2β)",
        formula="ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))²",
        paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675)",
        takes="rewards",
    )
)


def _apo_zero(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    return (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)


register(
    Component(
        "apo_zero",
        "link",
        "apo_zero",
        _apo_zero,
        summary="APO-zero: raise the chosen and lower the rejected likelihood, each absolutely",
        formula="ℓ = 1 − σ(β r_w) + σ(β r_l)",
        paper=_APO,
        takes="rewards",
    )
)


def _apo_down(r_w: Tensor, r_l: Tensor, beta: float) -> Tensor:
    return torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))


register(
    Component(
        "apo_down",
        "link",
        "apo_down",
        _apo_down,
        summary="APO-down: lower the chosen likelihood, and the rejected one more",
        formula="ℓ = σ(β r_w) + 1 − σ(β (r_w − r_l))",
        paper=_APO,
        takes="rewards",
    )
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


# --------------------------------------------------------------------------------------------------
# the named losses: dpo_family_loss of one type, as TRL computes it (exported from preftune.losses)


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
