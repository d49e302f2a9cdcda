"""Typed run configuration: loaded from YAML, overridden with ``a.b=value``, validated, saved resolved.

The story of a config, one module a stage: :mod:`.fields` (what a key is: its help, range and
choices), :mod:`.keys` (every key, section by section, up to ``TrainConfig``, and ``describe()``,
which ``preftune config`` prints and docs/config.md is generated from; ``rounds:`` is
:mod:`.rounds`), :mod:`.loading` (YAML and overrides into a ``TrainConfig``, and back) and
:mod:`.validation` (every value checked). Unknown keys are errors that suggest the closest valid
key; every bad value is a :class:`ConfigError` naming its key, raised before anything is loaded or
written.
"""

from .fields import MATCH_MODES, ConfigError
from .keys import (
    BCOConfig,
    ColumnsConfig,
    DataConfig,
    DiscoPOPConfig,
    KTOConfig,
    LoraConfig,
    MallowsConfig,
    MRPOConfig,
    ReferenceConfig,
    RPOConfig,
    SimPOConfig,
    TrainConfig,
    describe,
)
from .loading import apply_overrides, load_config, load_yaml, save_config, to_dict
from .rounds import JudgeConfig, RoundsConfig
from .validation import NO_EVAL_FOR_GENERATION, config_value, resolved_method, validate

__all__ = [
    "BCOConfig",
    "ColumnsConfig",
    "ConfigError",
    "DataConfig",
    "DiscoPOPConfig",
    "JudgeConfig",
    "KTOConfig",
    "LoraConfig",
    "MATCH_MODES",
    "MRPOConfig",
    "MallowsConfig",
    "NO_EVAL_FOR_GENERATION",
    "RPOConfig",
    "ReferenceConfig",
    "RoundsConfig",
    "SimPOConfig",
    "TrainConfig",
    "apply_overrides",
    "config_value",
    "describe",
    "load_config",
    "load_yaml",
    "resolved_method",
    "save_config",
    "to_dict",
    "validate",
]
