"""``resume: auto``: one command for a run's first start and for every restart (a requeued job).

- ``output_dir`` holds nothing of an earlier run: start fresh.
- it holds this run (its ``config.yaml`` agrees with this config on every key that defines the
  training, see :data:`OPERATIONAL` for those that may differ): resume, exactly as ``resume: true``
  (from the newest intact checkpoint; from step 0 if the run was stopped before its first one; a
  finished run does nothing).
- it holds something else (another config, or outputs without a ``config.yaml``): a one-line error
  naming the keys that differ; nothing is touched.

:func:`resolve` turns ``auto`` into ``true`` or ``false`` before the run starts; every process
decides alike (they read the same files before anything is written).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import yaml

from .config import TrainConfig, to_dict
from .errors import TrainingError
from .rundir import RunDir

AUTO = "auto"

# keys a restart may change without making it another run (where it writes, how it reports, timeouts)
OPERATIONAL = frozenset(
    {
        "output_dir",
        "resume",
        "overwrite_output_dir",
        "preemption_grace_s",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "dist_timeout_s",
        "cache_dir",
        "report_to",
        "progress",
        "generation_eval",
        "generation_match",
        "max_new_tokens",
        "data.num_proc",
    }
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}  # tuples -> lists, as YAML reads them


def differences(cfg: TrainConfig, saved: dict) -> list[str]:
    """``key: saved -> now`` for every training-defining key where ``saved`` (a config.yaml) differs."""
    now, then = _flat(to_dict(cfg)), _flat(saved)
    keys = sorted((set(now) | set(then)) - OPERATIONAL)
    return [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in keys if now.get(k) != then.get(k)]


def _main_log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the process group exists: torchrun's variable
        print(f"[preftune] {msg}", flush=True)


def resolve(cfg: TrainConfig, log: Callable[[str], None] = _main_log) -> TrainConfig:
    """``cfg`` with ``resume: auto`` decided (a copy); other values are returned unchanged."""
    if cfg.resume != AUTO:
        return cfg
    run = RunDir(cfg.output_dir)
    earlier = run.previous_run() if run.root.is_dir() else []
    if not earlier:
        log(f"resume: auto: {run.root} holds no earlier run; starting fresh")
        return dataclasses.replace(cfg, resume=False)
    names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    refuse = (
        "pass resume=true to continue it anyway, overwrite_output_dir=true (with resume=false) to "
        "start over, or another output_dir"
    )
    try:
        saved = yaml.safe_load(run.config.read_text()) if run.config.is_file() else None
    except (OSError, yaml.YAMLError) as e:
        raise TrainingError(f"resume: auto: {run.config} is unreadable ({e}); {refuse}") from e
    if not isinstance(saved, dict):
        raise TrainingError(
            f"resume: auto: {run.root} holds outputs ({names}) but no readable {run.config.name}, so "
            f"they cannot be told to be this run's; {refuse}"
        )
    diff = differences(cfg, saved)
    if diff:
        shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise TrainingError(f"resume: auto: {run.root} holds another run (config differs: {shown}); {refuse}")
    kept = run.checkpoints()
    where = f"from {kept[-1].name}" if kept else "from step 0 (it has no checkpoint yet)"
    log(f"resume: auto: {run.root} holds this run; resuming {where}")
    return dataclasses.replace(cfg, resume=True)
