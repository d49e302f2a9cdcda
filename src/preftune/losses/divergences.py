"""The f-divergence reward ψ(r) of f-DPO (arXiv 2309.16240): a modifier of every margin link.

The pipeline (:func:`preftune.losses.preference_loss`) and :func:`preftune.losses.dpo_family_loss`
replace each implicit reward ``r = logp_θ(y) − logp_ref(y)`` by ``ψ(r)`` before the margin
``ψ(r_w) − ψ(r_l)``; ``reverse_kl`` (``ψ(r) = r``) is plain DPO. See docs/methods.md#the-dpo-family.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["F_DIVERGENCES", "f_divergence_score"]

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# The exponent of the α-divergence score is clamped here so that exp stays finite in float32
# (TRL clamps at the same value); it only bites for |log-ratio| of ~100+ nats.
_ALPHA_EXP_MAX = 80.0


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
