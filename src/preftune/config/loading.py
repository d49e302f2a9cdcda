"""From a YAML file (or a dict) and ``a.b=value`` overrides to a validated :class:`~.keys.TrainConfig`,
and back to YAML: :func:`load_config`, :func:`save_config`.

The YAML is read as plain data with YAML 1.2's numbers (:func:`load_yaml`), the overrides are
applied to the nested dict (:func:`apply_overrides`), each value is converted to its key's type
(unknown keys suggest the closest valid one) and :func:`~.validation.validate` checks the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .fields import ConfigError, _is_dataclass_type
from .keys import ReferenceConfig, TrainConfig
from .validation import validate


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value into the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        # Prefer the member that is the value's own type (`str | list[str]` keeps "all-linear" a string).
        if type(value) in args:
            return _coerce(value, type(value), key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass  # try the next member; the error names the whole union
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if tp is ReferenceConfig and isinstance(value, str):
            return ReferenceConfig(model=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):  # YAML reads 2, 0.1 and 1e-5 as numbers
        raise ConfigError(f"{key}: expected a number, got the text {value!r} (write it without quotes)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"Unknown config key `{prefix}{key}`.{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-5`` is a number (YAML 1.1 needs ``1.0e-5``
    and PyYAML reads ``1e-5`` as text). So a value that is text reached a typed key as text: only a
    quoted one (``beta: "0.1"``), which is refused like any other type error."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """A config's YAML (a file or one override's value): plain data only, numbers as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override `{item}` is not of the form key=value (e.g. beta=0.2, mrpo.clip_eps=0.05)."
            )
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:  # a tag (!!python/...) or broken syntax: data only, nothing runs
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(
                f"{key.strip()}: the override value {raw!r} is not a plain YAML value ({problem}); "
                "to pass text, quote it for YAML too, e.g. key='\"text\"'"
            ) from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(
    source: str | os.PathLike | dict | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Build a TrainConfig from a YAML file (or a dict) plus ``a.b=value`` overrides."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"{where}: not valid YAML: {problem}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    return validate(_from_dict(TrainConfig, data))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
