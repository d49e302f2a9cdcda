"""Preference losses as pure functions of per-sequence tensors (no models, no I/O).

Inputs are per-sequence summed completion log-probs ``[B]``; reference stacks are ``[K, B]`` with
index 0 the primary reference. Every loss returns a :class:`LossOutput`. All methods are
configurations of one pipeline, :func:`preference_loss` (docs/methods.md#one-pipeline-many-methods); the named functions (``dpo``,
``mrpo``, ``mallows_theta``, ``rpo``, ...) are thin wrappers over it, and :func:`parse_method` turns a
method name such as ``"mrpo+mallows_theta+rpo"`` into its settings (:func:`resolve_method` into a typed
:class:`MethodSpec`). Each method component is declared once, next to its implementation, in the
registry of :mod:`.components`. See docs/methods.md.

Name clash: ``rpo`` here is *Relative* Preference Optimization (Yin et al. 2024), not TRL's former
``rpo_alpha`` (DPO + NLL) nor NeMo-Aligner's reward-aware RPO.
"""

# Importing a module registers the components it declares, and the methods table lists them in that
# order: these first (the links of DPO, IPO, hinge and MallowsPO-ϕ, then the DPO family's).
from . import links as _links  # noqa: F401  # isort: skip
from . import margin_links as _margin_links  # isort: skip
from . import reward_links as _reward_links  # isort: skip
from . import batch_links as _batch_links  # isort: skip

from . import family as _family
from . import functional as _functional
from . import length_weighting as _length_weighting
from .aggregation import arwc_weights, ctro_clip, virtual_reference
from .batch_links import *  # noqa: F403  (aot, aot_unpaired, sft)
from .components import Component, Option
from .compose import preference_loss, unpaired_preference_loss
from .divergences import F_DIVERGENCES, f_divergence_score
from .family import *  # noqa: F403  (dpo_family_loss, TRL's loss types, f_dpo, mpo)
from .functional import *  # noqa: F403  (the named losses, one per component; see functional.__all__)
from .kto import apo_zero_unpaired, kto, kto_reference_point
from .length_weighting import *  # noqa: F403  (LD-DPO and WPO)
from .links import LINKS, apply_link
from .mallows import calibrate_phi_star, mallows_link, mallows_log_link, neg_log_dispersion
from .margin_links import *  # noqa: F403  (FAMILY_LINKS, margin_link, robust, exo_pair, discopop, sigmoid_norm)
from .output import LossOutput
from .pairing import PAIRINGS, rpo_weights
from .reference_free import orpo, simpo
from .registry import (
    COMPONENTS,
    NEEDS,
    MethodError,
    MethodSpec,
    method_needs,
    parse_method,
    resolve_method,
)
from .reward_links import *  # noqa: F403  (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, bco_running_delta)

__all__ = [
    "LossOutput",
    "preference_loss",
    "unpaired_preference_loss",
    "COMPONENTS",
    "Component",
    "Option",
    "MethodSpec",
    "MethodError",
    "resolve_method",
    "NEEDS",
    "parse_method",
    "method_needs",
    *_functional.__all__,  # the named losses (dpo, mrpo, ...): one per component name
    *_family.__all__,  # dpo_family_loss: TRL 1.16's loss types; f_dpo, mpo
    *_margin_links.__all__,  # the DPO family's links, by kind, and their named losses
    *_reward_links.__all__,
    *_batch_links.__all__,
    *_length_weighting.__all__,  # LD-DPO and WPO
    "F_DIVERGENCES",
    "f_divergence_score",
    "simpo",
    "orpo",
    "kto",
    "kto_reference_point",
    "apo_zero_unpaired",
    "virtual_reference",
    "arwc_weights",
    "ctro_clip",
    "mallows_link",
    "mallows_log_link",
    "neg_log_dispersion",
    "calibrate_phi_star",
    "rpo_weights",
    "apply_link",
    "LINKS",
    "PAIRINGS",
]
