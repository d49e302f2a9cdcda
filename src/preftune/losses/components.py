"""What a method component is, and the table they are registered in.

A method (``"mrpo+mallows_theta+rpo"``) is a ``+``-joined list of components; each fills one slot of
the loss pipeline (see :mod:`preftune.losses.compose` and docs/methods.md#one-pipeline-many-methods):

* ``reference``: builds the reference log-probs from the ``[K, B]`` stacks (one reference, the MRPO
  virtual reference, MDPO's per-reference mix);
* ``pairing``: which (chosen, rejected) contrasts enter the loss and their weight ``W``;
* ``scale``: a per-pair factor ``c`` multiplying the margin;
* ``link``: the per-row loss. A link ``takes`` one of: ``"margin"``, a function of the contrast's
  margin ``m`` (composes with every reference, scale and pairing); ``"rewards"``, a function of the
  two implicit rewards ``r_w``, ``r_l`` of a pair (composes with references and scales, not with RPO's
  contrasts); ``"batch"``, a function of the whole batch (sorting, pooling; references only);
  ``"unpaired"``, a function of labelled single items (KTO). Several links in one method are a
  weighted sum (``loss_weights``, e.g. MPO = ``dpo+bco_pair+sft``).

Each component is declared ONCE, next to the function implementing it, with :func:`register`; the
registry (:mod:`preftune.losses.registry`) derives method resolution, error messages, documentation
and the trainer's inputs from these declarations. This module imports nothing else from preftune.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Slot",
    "SLOTS",
    "NEEDS",
    "TAKES",
    "MODIFIERS",
    "Option",
    "Component",
    "register",
    "registered",
    "lookup",
]

Slot = Literal["reference", "pairing", "scale", "link"]
SLOTS: tuple[Slot, ...] = ("reference", "pairing", "scale", "link")

#: Inputs a component needs the trainer to provide besides policy / primary-reference log-probs.
#: ``multi_reference``: K > 1 reference models; ``entropy``: the primary reference's token entropies
#: (MallowsPO dispersion); ``embeddings``: prompt sentence embeddings; ``unpaired``: unpaired rows
#: (one completion with a desirable/undesirable label) instead of pairs; ``mismatched``: log-probs of
#: mismatched prompt/completion items under the policy and the reference (KTO's reference point).
NEEDS: tuple[str, ...] = ("multi_reference", "entropy", "embeddings", "unpaired", "mismatched")

#: What a link is a function of (see the module docstring).
Takes = Literal["margin", "rewards", "batch", "unpaired"]
TAKES: tuple[str, ...] = ("margin", "rewards", "batch", "unpaired")

#: Config modifiers that apply to the whole loss; a component may refuse one (:attr:`Component.refuses`).
MODIFIERS: tuple[str, ...] = ("f_divergence", "ld_alpha", "wpo", "loss_weights")


@dataclass(frozen=True)
class Option:
    """A config key a component reads; ``kwarg`` is the loss keyword it feeds (None: read elsewhere)."""

    key: str
    kwarg: str | None = None
    #: The keyword goes to the link's own implementation (``discopop.tau``), not to the pipeline.
    link: bool = False


@dataclass(frozen=True)
class Component:
    """One method component (see the module docstring for the slots).

    Attributes:
        name: The method name users write (``"mrpo"``); unique over all components.
        slot: The pipeline slot it fills.
        value: The pipeline setting it selects (``link="sigmoid"`` for ``dpo``).
        impl: The implementation. link: ``(margin, beta, label_smoothing, phi) -> loss``; pairing:
            ``(batch, prompt_embeddings, tau, dtype, device) -> W or None``; reference:
            ``(refs_chosen, refs_rejected, weights, clip_eps, clip) -> ReferenceAggregate``; scale:
            ``(entropy_chosen, entropy_rejected, phi_star) -> c``.
        summary: One line for tables and ``preftune config``.
        formula: The math in one line (plain text).
        paper: Where the method comes from.
        needs: Subset of :data:`NEEDS`.
        options: Config keys it reads.
        step_inputs: Maps the trainer's per-pair tensors (``c``, ``embeddings``) to keyword arguments
            of :func:`preference_loss` (``scale=c``); None when it needs none.
        unpaired: Trains on unpaired rows (uses :func:`unpaired_preference_loss`).
        supports_unpaired: May be combined with an unpaired component.
        label_smoothing: (links) accepts a label-smoothing ε.
        length_normalize: Log-probs are length-normalised by default with this component (IPO).
        selectable: False for the implicit defaults (single reference, diagonal pairing).
        takes: (links) what the link is a function of (:data:`TAKES`); the impl's signature follows:
            margin ``(margin, beta, label_smoothing, phi, **link_options)``; rewards ``(r_w, r_l,
            beta, **link_options)`` with ``[K', B]`` rewards; batch ``(policy_chosen,
            policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing, chosen_lengths,
            **link_options)`` returning ``[K', B]``; unpaired: a :mod:`~preftune.losses.kto`-style loss.
        reference_free: The method uses no reference model (SimPO, ORPO).
        refuses: ``{name: reason}``: a component name, a slot (any component filling it) or a
            modifier of :data:`MODIFIERS` this component cannot be combined with, and why (the
            registry's and the config's error repeat the reason).
        check: ``get -> reason or None``: validates the config values the component reads (``get``
            reads a dotted key), so a bad value fails before any model loads.

    Its section in docs/methods.md has the anchor ``#<name>``.
    """

    name: str
    slot: Slot
    value: str
    impl: Callable[..., Any]
    summary: str
    formula: str = ""
    paper: str = ""
    needs: frozenset[str] = frozenset()
    options: tuple[Option, ...] = ()
    step_inputs: Callable[[Mapping[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)
    unpaired: bool = False
    supports_unpaired: bool = False
    label_smoothing: bool = False
    length_normalize: bool = False
    selectable: bool = True
    takes: Takes = "margin"
    reference_free: bool = False
    refuses: Mapping[str, str] = field(default_factory=dict, compare=False)
    check: Callable[[Callable[[str], Any]], str | None] | None = field(default=None, compare=False)

    def own_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The entries of ``options`` that this component's implementation declares as its own.

        Those of its :attr:`options` with ``link=True``, by keyword (``discopop.tau`` → ``tau``).
        """
        if not options:
            return {}
        names = {o.kwarg for o in self.options if o.link}
        return {k: v for k, v in options.items() if k in names}

    def __post_init__(self) -> None:
        if self.slot not in SLOTS:
            raise ValueError(f"component {self.name!r}: slot must be one of {SLOTS}, got {self.slot!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"component {self.name!r}: unknown needs {sorted(unknown)}; known: {NEEDS}")
        if self.takes not in TAKES:
            raise ValueError(f"component {self.name!r}: takes must be one of {TAKES}, got {self.takes!r}")


_BY_NAME: dict[str, Component] = {}
_BY_VALUE: dict[tuple[str, str], Component] = {}


def register(component: Component) -> Component:
    """Add ``component`` to the registry (import time, next to its implementation)."""
    if component.name in _BY_NAME:
        raise ValueError(f"method component {component.name!r} is registered twice")
    _BY_NAME[component.name] = component
    # Several components may share a pipeline value (rpo, rpo_unpaired): the first one implements it.
    _BY_VALUE.setdefault((component.slot, component.value), component)
    return component


def registered() -> dict[str, Component]:
    """Every registered component by name, in registration order (a copy)."""
    return dict(_BY_NAME)


def lookup(slot: Slot, value: str) -> Component:
    """The component implementing pipeline setting ``value`` of ``slot`` (ValueError if none)."""
    try:
        return _BY_VALUE[(slot, value)]
    except KeyError:
        valid = [v for (s, v) in _BY_VALUE if s == slot]
        raise ValueError(f"{slot} must be one of {tuple(valid)}, got {value!r}") from None
