"""What every config key is made of: its documentation and allowed values, declared with :func:`_f`.

A key is a dataclass field whose ``metadata`` holds ``help`` (the text ``preftune config`` prints),
``range`` (a :class:`Range`) and/or ``choices``; the sections and :class:`~.keys.TrainConfig`
(:mod:`.keys`, :mod:`.rounds`) declare their keys with :func:`_f`, and :mod:`.validation` checks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message (one line) names the key."""


@dataclass(frozen=True)
class Range:
    """Allowed numbers: the bounds that are set, or one of the ``also`` sentinels."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    also: tuple[float, ...] = ()

    def __contains__(self, x: float) -> bool:
        if x in self.also:
            return True
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def __str__(self) -> str:
        low = (
            f"more than {self.gt:g}"
            if self.gt is not None
            else f"at least {self.ge:g}"
            if self.ge is not None
            else ""
        )
        high = (
            f"below {self.lt:g}"
            if self.lt is not None
            else f"at most {self.le:g}"
            if self.le is not None
            else ""
        )
        text = " and ".join(p for p in (low, high) if p)
        return " or ".join([*(f"{a:g}" for a in self.also), text])


def _f(
    default: Any = dataclasses.MISSING,
    help: str = "",
    factory: Any = None,
    *,
    range: Range | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_ONE = Range(ge=1)
FRACTION = Range(ge=0, le=1)
# How a generated answer is checked (implemented in preftune.generation, which imports this tuple;
# the choices of generation_match and of rounds.judge.match).
MATCH_MODES = ("contains", "exact", "regex", "numeric")


def _is_dataclass_type(tp: Any) -> bool:
    """A section (a dataclass of keys), not a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)
