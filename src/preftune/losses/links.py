"""Links: from a margin ``m`` (in log-prob units) to a per-contrast loss (SPEC §1, §3.3, §5).

The pipeline hands every link the fully assembled margin ``m = c · W · (S − γ)`` (dispersion scale
``c``, RPO weight ``W``, contrast ``S``, SimPO margin ``γ``); a plain DPO pair has ``m = Δ``.

* ``sigmoid`` (DPO): ``−(1−ε)·log σ(β m) − ε·log σ(−β m)``  (ε = label smoothing, conservative DPO)
* ``ipo``: ``(m − 1/(2β))²``
* ``hinge`` (SLiC): ``max(0, 1 − β m)``
* ``mallows_phi``: ``−(1−ε)·log g_φ(β m) − ε·log g_φ(−β m)``
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from .mallows import mallows_log_link

__all__ = ["Link", "LINKS", "apply_link"]

Link = Literal["sigmoid", "ipo", "hinge", "mallows_phi"]
LINKS: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "mallows_phi")


def apply_link(
    margin: Tensor,
    link: Link,
    beta: float,
    *,
    label_smoothing: float = 0.0,
    phi: Tensor | None = None,
) -> Tensor:
    """Elementwise loss of ``margin`` under ``link`` (see the module docstring).

    Args:
        margin: ``m``, any shape.
        link: One of :data:`LINKS`.
        beta: β (for IPO, the regularisation parameter τ of the IPO paper).
        label_smoothing: ε, the assumed probability that a label is flipped (sigmoid and mallows_phi).
        phi: Dispersion φ ∈ (0, 1) broadcastable against ``margin`` (mallows_phi only).
    """
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if label_smoothing and link not in ("sigmoid", "mallows_phi"):
        raise ValueError(f"label_smoothing applies to the sigmoid and mallows_phi links, not {link!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    z = beta * margin
    if link == "sigmoid":
        out = -F.logsigmoid(z)
        if label_smoothing:
            out = (1 - label_smoothing) * out - label_smoothing * F.logsigmoid(-z)
        return out
    if link == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if link == "hinge":
        return F.relu(1 - z)
    if phi is None:
        raise ValueError("the mallows_phi link needs the dispersion φ (dispersion=...)")
    out = -mallows_log_link(z, phi)
    if label_smoothing:
        out = (1 - label_smoothing) * out - label_smoothing * mallows_log_link(-z, phi)
    return out
