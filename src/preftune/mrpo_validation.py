"""``mrpo.weights: validation``: reference weights fixed before training from a validation split.

The trainer carves the split out of the training data (:func:`preftune.data.prepare.carve_validation`,
seeded, never trained on), scores it with every reference like any other split (cached), and calls
:func:`fixed_weights` once: ``α = softmax_k(accuracy_k / mrpo.validation_temperature)``. From then on
the run is MRPO (or MDPO) with those K fixed weights, so CTRO clipping, MallowsPO and RPO compose as
with any fixed weights. See docs/methods.md#mrpo.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import TrainConfig
from .data.prepare import VALIDATION_SPLIT
from .losses.aggregation import validation_weights
from .losses.registry import MethodSpec

__all__ = ["uses_validation_weights", "fixed_weights", "with_weights"]


def uses_validation_weights(cfg: TrainConfig, spec: MethodSpec) -> bool:
    return spec.multi_reference and cfg.mrpo.weights == "validation"


def fixed_weights(cfg: TrainConfig, references, rows: list[int]) -> dict[str, Any]:
    """The weights and what they came from (logged and saved in run_state.json)."""
    n = len(rows)
    logps = references.batch(VALIDATION_SPLIT, list(range(n)), ("chosen", "rejected")).logps
    weights, accuracy = validation_weights(
        logps["chosen"], logps["rejected"], cfg.mrpo.validation_temperature
    )
    return {
        "weights": [float(w) for w in weights],
        "accuracies": [float(a) for a in accuracy],
        "temperature": cfg.mrpo.validation_temperature,
        "fraction": cfg.mrpo.validation_fraction,
        "rows": rows,
    }


def with_weights(cfg: TrainConfig, weights: list[float]) -> TrainConfig:
    """A copy of ``cfg`` whose ``mrpo.weights`` are the fixed numbers (the saved config keeps `validation`)."""
    return dataclasses.replace(cfg, mrpo=dataclasses.replace(cfg.mrpo, weights=list(weights)))
