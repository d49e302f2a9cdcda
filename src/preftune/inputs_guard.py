"""A run never deletes or writes into its own inputs.

Checked before the run directory is created, cleared or written (:func:`check_inputs`): every local
input path (the policy, each reference model, the data files, RPO's embedder, the cache) against
``output_dir``. Refused, each with one line naming both paths (a :class:`ConfigError`, exit code 2):

- an input inside what the run writes or ``overwrite_output_dir`` clears (``final/``,
  ``checkpoint-N/``, ``metrics.jsonl``, ...: :meth:`RunDir.output_holding`), e.g.
  ``model=RUN/final output_dir=RUN``: the model would be deleted before it is loaded, or replaced;
- ``output_dir`` equal to or inside an input directory (a model, a dataset folder): run files
  (checkpoints, metrics, the lock) would be mixed into it.

Hub names and presets (not local paths) are not checked: the cache holds them.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, TrainConfig
from .rundir import RunDir


def input_paths(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """(config key, local path) of every input that exists on disk."""
    found: list[tuple[str, str | None]] = [
        ("model", cfg.model),
        ("data.train", cfg.data.train),
        ("data.eval", cfg.data.eval),
        ("rpo.embedder", cfg.rpo.embedder),
        ("cache_dir", cfg.cache_dir),
    ]
    found += [
        (f"references[{i}].model", r.model) for i, r in enumerate(cfg.references) if r.model != "policy"
    ]
    out = []
    for key, value in found:
        if value and Path(value).exists():
            out.append((key, Path(value)))
    return out


def check_inputs(cfg: TrainConfig) -> None:
    """Raise a one-line ConfigError when ``output_dir`` would delete, overwrite or mix into an input."""
    run = RunDir(cfg.output_dir)
    out = Path(cfg.output_dir).resolve()
    for key, path in input_paths(cfg):
        real = path.resolve()
        if key != "cache_dir" and real.is_dir() and (out == real or real in out.parents):
            where = "is" if out == real else "is inside"
            raise ConfigError(
                f"output_dir {cfg.output_dir} {where} the input {key} {path}: the run's checkpoints, "
                "metrics and lock would be mixed into it; choose another output_dir"
            )
        held = run.output_holding(real)
        if held is not None:
            clears = " (overwrite_output_dir=true would delete it first)" if cfg.overwrite_output_dir else ""
            raise ConfigError(
                f"{key} {path} is inside {held.name} of output_dir {cfg.output_dir}, which this run "
                f"writes{clears}; copy it out of the run directory or choose another output_dir"
            )
