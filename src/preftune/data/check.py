"""Check a run's data before any model is loaded: every configured source exists and reads, every
column is there, every row validates. Errors name the config key, file, line and field, and come all
at once (every missing column, the first bad rows), seconds into a run rather than after the model
loaded.

    check = check_data(cfg, unpaired=False, log=print)   # raises DataError / ConfigError
    check.skipped["train"]                                # rows left out with data.on_error=skip
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .loading import _HUB_NAME, _JSON_SUFFIXES, MAX_REPORTED_ROWS, load_examples
from .records import Columns, DataError, LoadedData

_DATA_SUFFIXES = (*_JSON_SUFFIXES, ".parquet", ".csv", ".arrow")


@dataclass
class DataCheck:
    """What :func:`check_data` found: the loaded splits and the rows skipped in each. The splits are
    streamed (a few numbers per row, no text), so ``prepare_data`` reuses them instead of loading
    again."""

    loaded: dict[str, LoadedData] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        """Per split, rows read and skipped while loading (for run_state.json)."""
        return {
            f"{split}/rows": {
                "read": len(data.examples) + len(data.skipped),
                "skipped": len(data.skipped),
                "skipped_rows": [row for row, _, _ in data.skipped[:MAX_REPORTED_ROWS]],
            }
            for split, data in self.loaded.items()
        }


def resolve_source(source: str, key: str) -> str:
    """A configured source as a path or hub name: ``builtin:arithmetic-train`` names the bundled pairs."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in ("arithmetic-train", "arithmetic-test"):
            from .arithmetic import arithmetic_path

            return str(arithmetic_path(name.split("-")[1]))
        raise DataError(
            f"{key}: unknown builtin dataset {source!r} "
            "(have builtin:arithmetic-train, builtin:arithmetic-test)"
        )
    return source


def check_source_exists(source: str, key: str) -> None:
    """A local path that is not there is an error naming the config key (a hub name is left to load)."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return
    looks_local = path.lower().endswith(_DATA_SUFFIXES) or not _HUB_NAME.match(source) or path.startswith(".")
    if looks_local:
        raise DataError(f"file not found (set by {key}); check the path", source=source)


def _describe_skipped(data: LoadedData) -> str:
    parts = []
    for row, column, reason in data.skipped[:MAX_REPORTED_ROWS]:
        parts.append(f"{data.row_kind} {row}" + (f" ('{column}': {reason})" if column else f" ({reason})"))
    more = len(data.skipped) - MAX_REPORTED_ROWS
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def check_data(cfg, *, unpaired: bool = False, log=print) -> DataCheck:
    """Load and validate every split ``cfg.data`` names, before any model is loaded.

    Raises DataError naming the config key and path of a source that is missing, every missing column
    with the ``data.columns.<field>=<column>`` override that maps it, and the first bad rows with line
    and field. With ``data.on_error=skip`` it logs how many rows each split skips and which, and
    returns the counts.
    """
    from ..config import ConfigError, to_dict

    data_cfg = cfg.data
    if not data_cfg.train:
        raise ConfigError("data.train is required (a file, a folder, a hub name or builtin:arithmetic-train)")
    columns = Columns(**to_dict(data_cfg.columns))
    sources = {"train": ("data.train", data_cfg.train, data_cfg.train_split)}
    if data_cfg.eval:
        sources["eval"] = ("data.eval", data_cfg.eval, data_cfg.eval_split)
    resolved = {}
    for split, (key, source, _) in sources.items():  # every path first: one missing file, one short run
        resolved[split] = resolve_source(source, key)
        check_source_exists(resolved[split], key)
    check = DataCheck()
    for split, (_key, source, hf_split) in sources.items():
        loaded = load_examples(
            resolved[split],
            unpaired=unpaired,
            columns=columns,
            on_error=data_cfg.on_error,
            split=hf_split,
            max_rows=data_cfg.max_rows,
        )
        check.loaded[split] = loaded
        check.skipped[split] = len(loaded.skipped)
        if loaded.skipped:
            log(
                f"{split}: skipped {len(loaded.skipped)} bad rows of {source} (data.on_error=skip): "
                + _describe_skipped(loaded)
            )
    return check
