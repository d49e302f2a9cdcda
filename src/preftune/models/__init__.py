"""Model presets (real models shipped on PyPI as GGUF) and loading of causal LMs."""

from preftune.models.loading import check_causal_lm_config, load_causal_lm
from preftune.models.presets import (
    PRESETS,
    AssembledGGUF,
    LocalGGUF,
    MissingPackageError,
    ModelPreset,
    PackagedGGUF,
    default_cache_dir,
    ensure_preset,
    preset_dir,
    resolve_model,
    verify_preset_cache,
)

__all__ = [
    "PRESETS",
    "AssembledGGUF",
    "LocalGGUF",
    "MissingPackageError",
    "ModelPreset",
    "PackagedGGUF",
    "check_causal_lm_config",
    "default_cache_dir",
    "ensure_preset",
    "load_causal_lm",
    "preset_dir",
    "resolve_model",
    "verify_preset_cache",
]
