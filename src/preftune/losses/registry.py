"""Method names and how they compose (SPEC §5).

A method is a ``+``-joined list of components, each filling one slot of the pipeline:

==============  ==========================================  =========================
slot            components                                  default when not given
==============  ==========================================  =========================
reference       ``mrpo``, ``mdpo``                          ``single``
pairing         ``rpo``, ``rpo_uniform``, ``rpo_diagonal``,  ``diagonal``
                ``rpo_unpaired``
scale           ``mallows_theta``                           none (c ≡ 1)
link            ``dpo``, ``ipo``, ``hinge``, ``mallows_phi``  ``dpo`` (sigmoid)
==============  ==========================================  =========================

So ``"mrpo+mallows_theta+rpo"`` is RPO's contrast matrix over an MRPO virtual reference with
dispersion-scaled rows and the sigmoid link. Two components for one slot are an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["METHODS", "NEEDS", "parse_method", "method_needs"]

#: What a method needs the trainer to precompute besides policy / primary-reference log-probs.
#: ``multi_reference``: K > 1 references are used (K = 1 still works and reduces to DPO);
#: ``entropy``: reference entropies → MallowsPO dispersion (``scale`` c and/or ``dispersion`` φ);
#: ``embeddings``: prompt sentence embeddings (RPO); ``unpaired``: KTO-style unpaired data.
NEEDS = ("multi_reference", "entropy", "embeddings", "unpaired")


def _entry(slot: str, value: str, needs: Iterable[str] = (), summary: str = "", **extra: Any) -> dict:
    return {
        "slot": slot,
        slot: value,
        "needs": frozenset(needs),
        "summary": summary,
        "unpaired": False,
        **extra,
    }


METHODS: dict[str, dict] = {
    "dpo": _entry("link", "sigmoid", summary="DPO: -log sigmoid(beta * margin)"),
    "ipo": _entry("link", "ipo", summary="IPO: (margin - 1/(2 beta))^2 on length-normalised log-probs"),
    "hinge": _entry("link", "hinge", summary="SLiC hinge: max(0, 1 - beta * margin)"),
    "mallows_phi": _entry(
        "link", "mallows_phi", ["entropy"], "MallowsPO-phi: -log g_phi(beta * margin), Mallows pairwise link"
    ),
    "mrpo": _entry(
        "reference", "mrpo", ["multi_reference"], "MRPO: virtual reference -logsumexp_k(log a_k - logp_k)"
    ),
    "mdpo": _entry("reference", "mdpo", ["multi_reference"], "multi-DPO: sum_k a_k * DPO(reference k)"),
    "mallows_theta": _entry(
        "scale", "mallows_theta", ["entropy"], "MallowsPO-theta: margin scaled by c(x) = -log phi(x)"
    ),
    "rpo": _entry(
        "pairing", "rpo", ["embeddings"], "Relative PO: all chosen x rejected contrasts, similarity-weighted"
    ),
    "rpo_uniform": _entry("pairing", "rpo_uniform", summary="RPO ablation: uniform weights 1/M"),
    "rpo_diagonal": _entry(
        "pairing", "rpo_diagonal", summary="RPO ablation: w * own pair + (1 - w) * mean of the others"
    ),
    "rpo_unpaired": _entry(
        "pairing",
        "rpo",
        ["embeddings", "unpaired"],
        "Relative PO on unpaired (KTO-style) chosen/rejected items",
        unpaired=True,
    ),
}

_DEFAULTS = {"reference": "single", "pairing": "diagonal", "scale": None, "link": "sigmoid"}


def parse_method(method: str | Iterable[str]) -> dict[str, Any]:
    """Resolve ``"comp1+comp2+..."`` into the settings of :func:`preference_loss`.

    Args:
        method: Component names joined by ``+`` (any order, whitespace ignored), or a list of them.

    Returns:
        A dict with ``method`` (the normalised name), ``components``, the four slots ``reference``,
        ``pairing``, ``scale`` (``"mallows_theta"`` or None) and ``link``; ``unpaired`` (use
        :func:`unpaired_preference_loss`); ``needs`` (a frozenset of :data:`NEEDS`) and the flags
        ``multi_reference``, ``needs_entropy``, ``needs_embeddings``; and ``loss_kwargs``, the
        keyword arguments to splat into :func:`preference_loss` (``reference``, ``pairing``,
        ``link``) or, for unpaired methods, into :func:`unpaired_preference_loss` (``pairing``,
        ``link``). With ``scale == "mallows_theta"`` pass ``scale=c``; with ``link ==
        "mallows_phi"`` pass ``dispersion=exp(-c)``; with ``needs_embeddings`` pass the embeddings.

    Raises:
        ValueError: unknown component (the message lists the valid names), two components for one
            slot (the message names both), or an unpaired method combined with a component it
            cannot take.
    """
    names = method.split("+") if isinstance(method, str) else list(method)
    components = tuple(n.strip() for n in names)
    if not components or any(not n for n in components):
        raise ValueError(f"empty method component in {method!r}; valid names: {', '.join(METHODS)}")
    unknown = [n for n in components if n not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method component(s) {', '.join(map(repr, unknown))} in {method!r}; "
            f"valid names: {', '.join(METHODS)} (combine with '+')"
        )
    settings: dict[str, Any] = dict(_DEFAULTS)
    owner: dict[str, str] = {}
    needs: set[str] = set()
    unpaired = False
    for name in components:
        entry = METHODS[name]
        slot = entry["slot"]
        if slot in owner:
            raise ValueError(
                f"conflicting method components {owner[slot]!r} and {name!r}: both set the {slot}; choose one"
            )
        owner[slot] = name
        settings[slot] = entry[slot]
        needs |= entry["needs"]
        unpaired |= entry["unpaired"]
    if unpaired:
        bad = [n for n in components if METHODS[n]["slot"] in ("reference", "scale") or n == "mallows_phi"]
        if bad:
            raise ValueError(
                f"'rpo_unpaired' cannot be combined with {', '.join(map(repr, bad))}: unpaired items have no "
                "pair-level reference margins or dispersion"
            )
    if unpaired:
        loss_kwargs = {"pairing": settings["pairing"], "link": settings["link"]}
    else:
        loss_kwargs = {k: settings[k] for k in ("reference", "pairing", "link")}
    return {
        "method": "+".join(components),
        "components": components,
        **settings,
        "unpaired": unpaired,
        "needs": frozenset(needs),
        "multi_reference": "multi_reference" in needs,
        "needs_entropy": "entropy" in needs,
        "needs_embeddings": "embeddings" in needs,
        "loss_kwargs": loss_kwargs,
    }


def method_needs(method: str | Iterable[str]) -> set[str]:
    """What the trainer must precompute for ``method``: a subset of :data:`NEEDS`."""
    return set(parse_method(method)["needs"])
