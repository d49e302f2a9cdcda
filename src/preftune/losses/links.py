"""Links: from a margin ``m`` (in log-prob units) to a per-contrast loss.

The pipeline hands every link the fully assembled margin ``m = c · W · (S − γ)`` (dispersion scale
``c``, RPO weight ``W``, contrast ``S``, SimPO margin ``γ``); a plain DPO pair has ``m = Δ``. See
docs/methods.md#links.

* ``sigmoid`` (DPO): ``−(1−ε)·log σ(β m) − ε·log σ(−β m)``  (ε = label smoothing, conservative DPO)
* ``ipo``: ``(m − 1/(2β))²``
* ``hinge`` (SLiC): ``max(0, 1 − β m)``
* ``mallows_phi``: ``−(1−ε)·log g_φ(β m) − ε·log g_φ(−β m)``

A new link is one function plus one :func:`register` call, in this file or next to its implementation
(the DPO family's links in :mod:`.margin_links`, :mod:`.reward_links` and :mod:`.batch_links` by what
they are a function of, SimPO/ORPO in :mod:`.reference_free`, KTO in :mod:`.kto`), and its tests and docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .components import Component, Option, lookup, register, registered
from .mallows import mallows_log_link

__all__ = ["Link", "LINKS", "apply_link"]

Link = Literal["sigmoid", "ipo", "hinge", "mallows_phi"]


def sigmoid_link(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    """DPO's link (the ``dpo`` component); the DPO family's sigmoid-based links call it too."""
    z = beta * margin
    out = -F.logsigmoid(z)
    if label_smoothing:
        out = (1 - label_smoothing) * out - label_smoothing * F.logsigmoid(-z)
    return out


def _ipo(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    return (margin - 1 / (2 * beta)) ** 2


def _hinge(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    return F.relu(1 - beta * margin)


def _mallows_phi(margin: Tensor, beta: float, label_smoothing: float, phi: Tensor | None) -> Tensor:
    if phi is None:
        raise ValueError("the mallows_phi link needs the dispersion φ (dispersion=...)")
    z = beta * margin
    out = -mallows_log_link(z, phi)
    if label_smoothing:
        out = (1 - label_smoothing) * out - label_smoothing * mallows_log_link(-z, phi)
    return out


def _dispersion_from_c(inputs: Mapping[str, Any]) -> dict[str, Any]:
    # φ(x) = exp(−c(x)): the trainer provides c, the link wants φ.
    return {"dispersion": torch.exp(-inputs["c"])}


register(
    Component(
        "dpo",
        "link",
        "sigmoid",
        sigmoid_link,
        summary="DPO: logistic (Bradley–Terry) link",
        formula="ℓ = −(1−ε)·log σ(β m) − ε·log σ(−β m)",
        paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)",
        supports_unpaired=True,
        label_smoothing=True,
    )
)
register(
    Component(
        "ipo",
        "link",
        "ipo",
        _ipo,
        summary="IPO: squared loss towards the margin 1/(2β), length-normalised log-probs",
        formula="ℓ = (m − 1/(2β))²",
        paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (arXiv:2310.12036)",
        supports_unpaired=True,
        length_normalize=True,
    )
)
register(
    Component(
        "hinge",
        "link",
        "hinge",
        _hinge,
        summary="SLiC hinge link",
        formula="ℓ = max(0, 1 − β m)",
        paper="Zhao et al. 2023, SLiC-HF (arXiv:2305.10425)",
        supports_unpaired=True,
    )
)
register(
    Component(
        "mallows_phi",
        "link",
        "mallows_phi",
        _mallows_phi,
        summary="MallowsPO-φ: Mallows pairwise link with per-prompt dispersion φ(x)",
        formula="ℓ = −(1−ε)·log g_φ(β m) − ε·log g_φ(−β m),  φ(x) = exp(−c(x))",
        paper="Chen et al. 2024, MallowsPO: Fine-Tune Your LLM with Preference Dispersions (arXiv:2405.14953)",
        needs=frozenset({"entropy"}),
        options=(Option("mallows.phi_star"),),
        step_inputs=_dispersion_from_c,
        label_smoothing=True,
    )
)

#: The pipeline values of the links registered here.
LINKS: tuple[str, ...] = tuple(c.value for c in registered().values() if c.slot == "link")


def apply_link(
    margin: Tensor,
    link: Link | str,
    beta: float,
    *,
    label_smoothing: float = 0.0,
    phi: Tensor | None = None,
    **options,
) -> Tensor:
    """Elementwise loss of ``margin`` under ``link`` (see the module docstring).

    Args:
        margin: ``m``, any shape.
        link: The pipeline value of a registered link (:data:`LINKS` and any registered later).
        beta: β (for IPO, the regularisation parameter τ of the IPO paper).
        label_smoothing: ε, the assumed probability that a label is flipped (sigmoid and mallows_phi).
        phi: Dispersion φ ∈ (0, 1) broadcastable against ``margin`` (mallows_phi only).
        **options: the link's own options (``tau`` of discopop), as its component declares them.
    """
    component = lookup("link", link)
    if label_smoothing and not component.label_smoothing:
        smoothed = [c.value for c in registered().values() if c.slot == "link" and c.label_smoothing]
        raise ValueError(f"label_smoothing applies to the {', '.join(smoothed)} links, not {link!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if component.takes != "margin":
        raise ValueError(f"the {link!r} link is not a function of a margin (it takes {component.takes})")
    return component.impl(margin, beta, label_smoothing, phi, **options)
