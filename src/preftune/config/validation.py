"""Checks of a whole :class:`~.keys.TrainConfig` after loading: :func:`validate`.

Each key's range and choices (from its field metadata), then what ties keys together: the method
against the references, MRPO's weights, the trackers, generation_eval's data, the method's own
options and the modifiers it refuses. Every failure is a one-line :class:`~.fields.ConfigError`
naming the key, raised before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, get_type_hints

from ..losses.registry import MethodError, MethodSpec, resolve_method
from ..reference_identity import duplicate_references, policy_entry_error
from ..trackers import report_to_error
from .fields import ConfigError, _is_dataclass_type
from .keys import TrainConfig

# generation_eval without data.eval: said by validate() and by the data check, which may see a config
# that was built without validate().
NO_EVAL_FOR_GENERATION = (
    "generation_eval: true needs data.eval, held-out rows of which those with an 'answer' field are "
    "answered after training; set data.eval or generation_eval: false"
)


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` (``"rpo.tau"``) in ``cfg``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def resolved_method(cfg: TrainConfig) -> MethodSpec:
    """``cfg.method`` resolved by the method registry (case and ``-``/``_`` forgiven)."""
    try:
        return resolve_method(cfg.method, lenient=True)
    except MethodError as e:
        raise ConfigError(f"method: {e}") from None


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Ranges and choices from the field metadata, for every field of ``obj`` and its sections."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if _is_dataclass_type(hints[f.name]):
            _check_fields(value, key + ".")
            continue
        choices, allowed = f.metadata.get("choices"), f.metadata.get("range")
        if isinstance(value, str) and choices is not None:
            if value not in choices:
                what = "one of " + ", ".join(choices) if len(choices) > 1 else f"`{choices[0]}`"
                also = " or a number" if allowed is not None else ""
                raise ConfigError(f"{key}: {value!r} is not {what}{also}")
        elif allowed is not None and value is not None and not isinstance(value, (str, bool)):
            for i, x in enumerate(value if isinstance(value, list) else [value]):
                if not math.isfinite(x) or x not in allowed:
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    raise ConfigError(f"{where} must be {allowed}, got {x!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value (ranges, choices, method, method vs references); canonicalise the method."""
    _check_fields(cfg)
    if len(cfg.adam_betas) != 2:
        raise ConfigError(f"adam_betas: expected two numbers, got {cfg.adam_betas!r}")
    spec = resolved_method(cfg)
    cfg.method = spec.method
    num_references = max(len(cfg.references), 1)  # none configured: the initial policy alone
    if spec.multi_reference and num_references < 2 and not cfg.mrpo.allow_single_reference:
        raise ConfigError(
            f"method: {spec.method!r} needs at least 2 references, got {num_references} "
            "(with one it is exactly DPO); add references or set mrpo.allow_single_reference=true"
        )
    if num_references > 1 and not spec.multi_reference:
        raise ConfigError(
            f"references: method {spec.method!r} uses one reference but {num_references} are configured; "
            "use mrpo or mdpo (optionally composed, e.g. mrpo+mallows_theta)"
        )
    _check_duplicate_references(cfg)
    if spec.multi_reference and isinstance(cfg.mrpo.weights, list):
        if len(cfg.mrpo.weights) != num_references:
            raise ConfigError(
                f"mrpo.weights: {len(cfg.mrpo.weights)} weights for {num_references} references"
            )
        if not any(cfg.mrpo.weights):
            raise ConfigError("mrpo.weights: the weights must not all be zero")
    if spec.multi_reference and cfg.mrpo.weights == "adaptive_released" and num_references != 2:
        raise ConfigError(
            f"mrpo.weights: adaptive_released is defined for exactly 2 references, got {num_references}"
        )
    reason = report_to_error(cfg.report_to)
    if reason:
        raise ConfigError(reason)
    if cfg.generation_eval and not cfg.data.eval:
        raise ConfigError(NO_EVAL_FOR_GENERATION)
    if cfg.parallelism == "fsdp" and cfg.precision == "fp16":
        raise ConfigError("precision: fp16 is not supported with parallelism=fsdp; use bf16 or fp32")
    if cfg.reference_free and spec.reference.value != "single":
        raise ConfigError(f"reference_free: true cannot be combined with method {spec.method!r}")
    _check_method_options(cfg, spec)
    return cfg


def _check_duplicate_references(cfg: TrainConfig) -> None:
    """Two references that score alike (same model, chat template and dtype) make MRPO/MDPO a DPO
    with extra work; refused, naming both entries (``policy`` is the policy's own model)."""
    reason = policy_entry_error(cfg.references)
    if reason:
        raise ConfigError(reason)
    found = duplicate_references(cfg.model, cfg.references, cfg.data.chat_template)
    if found is not None:
        (i, j), what = found
        raise ConfigError(
            f"references: entries {i} and {j} are the same reference ({what}): with identical references "
            f"{cfg.method} is DPO; remove one, or give it another model, chat_template or dtype"
        )


def _check_method_options(cfg: TrainConfig, spec: MethodSpec) -> None:
    """The method's own option checks and the modifiers it refuses (the registry's reasons)."""
    reason = spec.check_options(lambda key: config_value(cfg, key))
    if reason:
        raise ConfigError(reason)
    if spec.reference_free:
        if len(cfg.references) > 0:
            raise ConfigError(f"references: method {spec.method!r} uses no reference model; remove them")
        cfg.reference_free = True  # SimPO / ORPO: nothing to score or cache
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(spec.links):
        raise ConfigError(
            f"loss_weights: {len(cfg.loss_weights)} weights for the {len(spec.links)} links of {spec.method!r} "
            f"({', '.join(c.name for c in spec.links)})"
        )
    used = {
        "f_divergence": cfg.f_divergence != "reverse_kl",
        "ld_alpha": cfg.ld_alpha is not None,
        "wpo": cfg.wpo,
        "loss_weights": cfg.loss_weights is not None,
    }
    for key, on in used.items():
        reason = spec.refusal(key) if on else None
        if reason:
            raise ConfigError(f"{key}: {reason}")
    if used["ld_alpha"] and cfg.reference_mode == "online" and not cfg.reference_free:
        raise ConfigError(
            "ld_alpha: LD-DPO's reference tails are computed with precomputed references; "
            "use reference_mode: precompute"
        )
    normalised = cfg.length_normalize if cfg.length_normalize is not None else spec.length_normalize
    if used["f_divergence"] and (normalised or cfg.reference_free):
        raise ConfigError(
            "f_divergence: needs the un-normalised rewards log π/π_ref of a reference "
            f"(method {spec.method!r} length-normalises or has no reference)"
        )
