"""Method names, how they compose, and everything derived from the component declarations.

A method is a ``+``-joined list of components (:class:`~preftune.losses.components.Component`), each
filling one slot of the loss pipeline; a slot left empty takes its default (single reference,
diagonal pairing, no scale, the DPO sigmoid link). So ``"mrpo+mallows_theta+rpo"`` is RPO's contrast
matrix over an MRPO virtual reference with dispersion-scaled margins and the sigmoid link. Two
components for one slot are an error, except links: several links are a weighted sum
(``dpo+bco_pair+sft`` with ``loss_weights``, MPO). An unpaired component with one that needs pairs is
an error, and so is any combination a component refuses (:attr:`Component.refuses`, plus the rules of
its link kind, :data:`KIND_REFUSALS`), with the reason.
:func:`resolve_method` turns a name into a frozen :class:`MethodSpec`; the config validation, the
CLI's errors, ``preftune config`` and the methods table of docs/methods.md all come from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Importing the implementations registers their components (each module declares its own).
from . import aggregation as _aggregation  # noqa: F401
from . import batch_links as _batch_links  # noqa: F401
from . import kto as _kto  # noqa: F401
from . import links as _links  # noqa: F401
from . import mallows as _mallows  # noqa: F401
from . import margin_links as _margin_links  # noqa: F401
from . import pairing as _pairing  # noqa: F401
from . import reference_free as _reference_free  # noqa: F401
from . import reward_links as _reward_links  # noqa: F401
from .components import MODIFIERS, NEEDS, SLOTS, Component, Option, Slot, lookup, registered

__all__ = [
    "COMPONENTS",
    "NEEDS",
    "KIND_REFUSALS",
    "MethodError",
    "MethodSpec",
    "resolve_method",
    "parse_method",
    "method_needs",
    "method_names",
    "methods_help",
    "methods_table",
]

#: The order components are listed in (help text, docs): links first, the way users meet them.
_LISTING_ORDER: tuple[Slot, ...] = ("link", "reference", "scale", "pairing")
_DEFAULTS: dict[Slot, str | None] = {
    "reference": "single",
    "pairing": "diagonal",
    "scale": None,
    "link": "sigmoid",
}


#: What every link of a kind refuses, and why (a component's own ``refuses`` adds to these).
KIND_REFUSALS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "margin": {},
        "rewards": {
            "pairing": "it is a function of r(y_w) and r(y_l) separately, not of a contrast S_ij that "
            "RPO's pairing can form and weight",
            "scale": "MallowsPO-θ scales the margin β·Δ, and this loss is not a function of β·Δ (a "
            "per-prompt β would be an extension neither paper defines)",
            "f_divergence": "the f-divergence reward ψ(r) is defined for losses of the margin "
            "ψ(r_w) − ψ(r_l) only (as in TRL)",
        },
        "batch": {
            "pairing": "it sorts or pools over the whole batch, so there is no per-contrast margin for "
            "RPO's pairing",
            "scale": "it sorts or pools over the whole batch, so a per-pair scale c(x) has no pair to "
            "apply to",
            "f_divergence": "the f-divergence reward ψ(r) is defined for losses of the margin "
            "ψ(r_w) − ψ(r_l) only (as in TRL)",
            "wpo": "it sorts or pools over the batch and loses the pairs WPO weights",
        },
        "unpaired": {
            "f_divergence": "unpaired items have no pair margin ψ(r_w) − ψ(r_l)",
            "ld_alpha": "unpaired items have no pair whose shared length LD-DPO splits at",
            "wpo": "WPO weights pairs; unpaired items have none",
            "loss_weights": "an unpaired loss cannot be summed with pair losses",
        },
    }
)


def refusals(component: Component) -> dict[str, str]:
    """Everything ``component`` refuses (names, slots, modifiers) with the reason."""
    out = dict(KIND_REFUSALS[component.takes]) if component.slot == "link" else {}
    out.update(component.refuses)
    return out


def _listing() -> list[Component]:
    found = [c for c in registered().values() if c.selectable]
    return sorted(found, key=lambda c: _LISTING_ORDER.index(c.slot))


#: Every selectable component by name (read-only), in listing order.
COMPONENTS: Mapping[str, Component] = MappingProxyType({c.name: c for c in _listing()})


def method_names() -> tuple[str, ...]:
    """The names a method may be composed of."""
    return tuple(COMPONENTS)


class MethodError(ValueError):
    """An unknown, misspelled or impossible method; the message is one line."""


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: the component filling each slot (defaults included)."""

    method: str
    components: tuple[str, ...]
    reference: Component
    pairing: Component
    scale: Component | None
    link: Component
    #: Further links, summed with ``link`` (``loss_weights``); empty for one link.
    extra_links: tuple[Component, ...] = ()

    @property
    def links(self) -> tuple[Component, ...]:
        return (self.link, *self.extra_links)

    @property
    def parts(self) -> tuple[Component, ...]:
        """The components of every filled slot (defaults included), in pipeline order."""
        return tuple(c for c in (self.reference, self.pairing, self.scale, *self.links) if c is not None)

    @property
    def reference_free(self) -> bool:
        """No reference model at all (SimPO, ORPO)."""
        return any(c.reference_free for c in self.parts)

    @property
    def takes(self) -> str:
        """The link kind: ``unpaired`` if any link is unpaired, else the first link's."""
        return next((c.takes for c in self.links if c.takes == "unpaired"), self.link.takes)

    def refusal(self, modifier: str) -> str | None:
        """Why this method cannot use ``modifier`` (:data:`MODIFIERS`), or None if it can."""
        assert modifier in MODIFIERS, modifier
        for c in self.parts:
            reason = refusals(c).get(modifier)
            if reason is not None:
                return f"{c.name!r} cannot be combined with {modifier}: {reason}"
        return None

    @property
    def unpaired(self) -> bool:
        return any(c.unpaired for c in self.parts)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(c.needs for c in self.parts))

    @property
    def multi_reference(self) -> bool:
        return "multi_reference" in self.needs

    @property
    def needs_entropy(self) -> bool:
        return "entropy" in self.needs

    @property
    def needs_embeddings(self) -> bool:
        return "embeddings" in self.needs

    @property
    def length_normalize(self) -> bool:
        """Whether log-probs are length-normalised by default (IPO)."""
        return any(c.length_normalize for c in self.parts)

    @property
    def options(self) -> tuple[Option, ...]:
        """The config options the method reads (each once)."""
        return tuple(dict.fromkeys(o for c in self.parts for o in c.options))

    @property
    def loss_kwargs(self) -> dict[str, str | tuple[str, ...]]:
        """Slot settings for :func:`preference_loss` (or, unpaired, :func:`unpaired_preference_loss`)."""
        link: str | tuple[str, ...] = (
            self.link.value if not self.extra_links else tuple(c.value for c in self.links)
        )
        if self.unpaired:
            return {"pairing": self.pairing.value, "link": link}
        return {"reference": self.reference.value, "pairing": self.pairing.value, "link": link}

    def option_kwargs(self, get: Callable[[str], Any]) -> dict[str, Any]:
        """Loss keywords from the config options the method reads; ``get("rpo.tau")`` reads one.

        Options of a link's own implementation are collected under ``link_options``.
        """
        out: dict[str, Any] = {}
        link_options: dict[str, Any] = {}
        for o in self.options:
            if o.kwarg is not None:
                (link_options if o.link else out)[o.kwarg] = get(o.key)
        if link_options:
            out["link_options"] = link_options
        return out

    def check_options(self, get: Callable[[str], Any]) -> str | None:
        """The first complaint of a component about the config values it reads, or None."""
        for c in self.parts:
            if c.check is not None:
                reason = c.check(get)
                if reason:
                    return reason
        return None

    def step_kwargs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Loss keywords from the trainer's per-pair tensors (``c``, ``embeddings``)."""
        out: dict[str, Any] = {}
        for c in self.parts:
            if c.step_inputs is not None:
                out.update(c.step_inputs(inputs))
        return out

    def as_dict(self) -> dict[str, Any]:
        """The plain-dict form :func:`parse_method` returns."""
        return {
            "method": self.method,
            "components": self.components,
            "reference": self.reference.value,
            "pairing": self.pairing.value,
            "scale": None if self.scale is None else self.scale.value,
            "link": self.link.value,
            "links": tuple(c.value for c in self.links),
            "takes": self.takes,
            "reference_free": self.reference_free,
            "unpaired": self.unpaired,
            "needs": self.needs,
            "multi_reference": self.multi_reference,
            "needs_entropy": self.needs_entropy,
            "needs_embeddings": self.needs_embeddings,
            "loss_kwargs": self.loss_kwargs,
        }


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _canonical(name: str, lenient: bool) -> str | None:
    if name in COMPONENTS:
        return name
    if lenient:
        matches = [n for n in COMPONENTS if _norm(n) == _norm(name)]
        if len(matches) == 1:
            return matches[0]
    return None


def _suggestion(name: str) -> str | None:
    normalised = {_norm(n): n for n in COMPONENTS}
    if _norm(name) in normalised:
        return normalised[_norm(name)]
    close = difflib.get_close_matches(_norm(name), list(normalised), n=1, cutoff=0.6)
    return normalised[close[0]] if close else None


def _valid() -> str:
    return f"valid names: {', '.join(COMPONENTS)} (combine one per slot with '+')"


def resolve_method(method: str | Iterable[str], *, lenient: bool = False) -> MethodSpec:
    """Resolve ``"comp1+comp2+..."`` (any order, whitespace ignored) into a :class:`MethodSpec`.

    Args:
        method: Component names joined by ``+``, or a list of them.
        lenient: Also accept a spelling that differs only in case or ``-``/``_`` (``MRPO``,
            ``mallows-theta``) when it names exactly one component; the result is canonical.

    Raises:
        MethodError: an empty or unknown component (with a "did you mean" suggestion and the valid
            names), two components for one slot (naming both), or an unpaired component combined
            with one that needs pairs.
    """
    text = method if isinstance(method, str) else "+".join(method)
    names = [n.strip() for n in text.split("+")]
    if not text.strip() or any(not n for n in names):
        raise MethodError(f"empty method component in {text!r}; {_valid()}")
    resolved: list[str] = []
    for name in names:
        canonical = _canonical(name, lenient)
        if canonical is None:
            hint = _suggestion(name)
            did_you_mean = f"did you mean {hint!r}? " if hint else ""
            raise MethodError(f"unknown method component {name!r} in {text!r}; {did_you_mean}{_valid()}")
        resolved.append(canonical)

    chosen: dict[str, Component] = {}
    extra_links: list[Component] = []
    for name in resolved:
        component = COMPONENTS[name]
        if component.slot == "link" and "link" in chosen:
            if component is chosen["link"] or component in extra_links:
                raise MethodError(f"method component {name!r} appears twice in {text!r}")
            extra_links.append(component)  # several links: a weighted sum (loss_weights)
            continue
        if component.slot in chosen:
            raise MethodError(
                f"conflicting method components {chosen[component.slot].name!r} and {name!r}: both set "
                f"the {component.slot}; choose one"
            )
        chosen[component.slot] = component
    unpaired = [c for c in chosen.values() if c.unpaired]
    if unpaired:
        bad = [c.name for c in chosen.values() if not c.unpaired and not c.supports_unpaired]
        if bad:
            raise MethodError(
                f"{unpaired[0].name!r} cannot be combined with {', '.join(map(repr, bad))}: unpaired rows "
                "have no pair-level reference margins or dispersion"
            )
    every = [*chosen.values(), *extra_links]
    if extra_links:
        for c in every:
            reason = refusals(c).get("loss_weights")
            if reason:
                raise MethodError(f"{c.name!r} cannot be summed with other links: {reason}")
    for a in every:
        for key, reason in refusals(a).items():
            for b in every:
                if b is not a and key in (b.name, b.slot):
                    raise MethodError(f"{a.name!r} cannot be combined with {b.name!r}: {reason}")

    def slot(s: Slot) -> Component | None:
        if s in chosen:
            return chosen[s]
        default = _DEFAULTS[s]
        return None if default is None else lookup(s, default)

    reference, pairing, link = slot("reference"), slot("pairing"), slot("link")
    assert reference is not None and pairing is not None and link is not None  # defaults exist
    return MethodSpec(
        "+".join(resolved), tuple(resolved), reference, pairing, slot("scale"), link, tuple(extra_links)
    )


def parse_method(method: str | Iterable[str]) -> dict[str, Any]:
    """:func:`resolve_method` as a plain dict (see :meth:`MethodSpec.as_dict`)."""
    return resolve_method(method).as_dict()


def method_needs(method: str | Iterable[str]) -> set[str]:
    """What the trainer must precompute for ``method``: a subset of :data:`NEEDS`."""
    return set(resolve_method(method).needs)


def methods_help() -> str:
    """One paragraph for ``preftune config``: the components by slot and how to compose them."""
    by_slot = {s: [c.name for c in COMPONENTS.values() if c.slot == s] for s in _LISTING_ORDER}
    listed = "; ".join(f"{s}: {', '.join(names)}" for s, names in by_slot.items() if names)
    return (
        f"A method component, or several joined with `+`, at most one per slot ({listed}); "
        "e.g. `mrpo+mallows_theta+rpo`. Several links are a weighted sum (`loss_weights`), e.g. "
        "`dpo+bco_pair+sft` (MPO). Case and `-`/`_` are forgiven. See docs/methods.md."
    )


def methods_table() -> str:
    """The markdown table of every component, as docs/methods.md shows it."""
    rows = [
        "| method | slot | what it does | formula | needs | config options | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in COMPONENTS.values():
        needs = ", ".join(n for n in NEEDS if n in c.needs) or "—"
        options = ", ".join(f"`{o.key}`" for o in c.options) or "—"
        formula = f"`{c.formula}`" if c.formula else "—"
        cells = [f"[`{c.name}`](#{c.name})", c.slot, c.summary, formula, needs, options, c.paper or "—"]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


assert set(_DEFAULTS) == set(SLOTS)
