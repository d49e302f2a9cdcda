"""Reading a run directory: its metric rows, config, before/after and held-out evaluations.

What the trainer leaves in a run directory (file names: :mod:`preftune.rundir`):

- ``metrics.jsonl``: one JSON object per line, TRL metric names; evaluation lines carry the ``eval_``
  prefix. Lines repeated for a step (a resumed run logs the same step again) are merged, later values
  winning; unreadable lines (a crash mid-write leaves a partial last line) are skipped.
- ``config.yaml``: the resolved config, used for the run's label and summary.
- ``evaluation.json`` (optional): ``{"before": {...}, "after": {...}}`` from the demo.
- ``eval.json`` and ``eval-KEY-TIME.json`` (optional): held-out metrics written by ``preftune eval``.
  Each record says which model it evaluated (``evaluated``: ``final``, ``checkpoint-N`` or
  ``other model``; records of earlier versions are told by their ``model`` path): only evaluations
  of the run's own final model are the run's result (:attr:`Run.held_out`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rundir

logger = logging.getLogger(__name__)

METRICS_FILE = rundir.METRICS
CONFIG_FILE = rundir.CONFIG
EVALUATION_FILE = rundir.BEFORE_AFTER
EVAL_METRICS_FILE = rundir.EVAL_METRICS
REPORT_FILE = rundir.REPORT
EVAL_PREFIX = "eval_"
FINAL_MODEL = "final"  # an eval record's "evaluated" for the run's own final model (preftune.held_out)


@dataclass
class Run:
    """One training run as read from its directory.

    ``train`` and ``eval`` are metric rows sorted by step, one per step; eval rows keep TRL's
    ``eval_`` prefix. ``evaluation`` is the parsed ``evaluation.json`` or ``None``; ``held_out``
    the metrics ``preftune eval`` wrote to ``eval.json``, or ``None``.
    """

    path: Path
    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    held_out_results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_results(self) -> list[dict[str, Any]]:
        """The held-out results that evaluated this run's own final model, oldest first."""
        return [r for r in self.held_out_results if r.get("evaluated") == FINAL_MODEL]

    @property
    def held_out(self) -> dict[str, float] | None:
        """The metrics of the latest ``preftune eval`` result of the run's final model, or None (an
        evaluation of a checkpoint or of another model is not the run's result)."""
        results = self.final_results
        return results[-1]["metrics"] if results else None

    @property
    def last_step(self) -> int | None:
        steps = [row["step"] for row in (*self.train, *self.eval)]
        return max(steps) if steps else None

    def final(self, key: str) -> Any:
        """Latest logged value of ``key`` (``eval_`` keys come from eval rows), or ``None``."""
        rows = self.eval if key.startswith(EVAL_PREFIX) else self.train
        for row in reversed(rows):
            if key in row:
                return row[key]
        return None


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse ``metrics.jsonl`` into (train rows, eval rows), one row per step, sorted by step."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    last_content = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A partial last line is the expected result of a crash mid-write; anything else is odd.
            if number - 1 != last_content:
                logger.warning("%s:%d: skipping a line that is not valid JSON", path, number)
            continue
        if not isinstance(row, dict):
            logger.warning("%s:%d: skipping a line that is not a JSON object", path, number)
            continue
        step = row.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool):
            logger.warning("%s:%d: skipping a line without an integer 'step'", path, number)
            continue
        row["step"] = step
        target = evals if any(key.startswith(EVAL_PREFIX) for key in row) else train
        # Merge rather than replace: a resumed run re-logs a step (its values win), while lines that
        # log different keys for one step (e.g. an end-of-training summary) all keep their values.
        target.setdefault(step, {}).update(row)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        logger.warning("%s not found; the run is labelled by its directory name", path)
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        logger.warning("%s is not valid YAML (%s); ignoring it", path, error)
        return {}
    return config if isinstance(config, dict) else {}


def _read_evaluation(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        logger.warning("%s is not valid JSON (%s); ignoring it", path, error)
        return None
    if not isinstance(evaluation, dict) or not any(
        isinstance(evaluation.get(side), dict) for side in ("before", "after")
    ):
        logger.warning("%s has no 'before'/'after' objects; ignoring it", path)
        return None
    return evaluation


def _read_held_out_results(path: Path) -> list[dict[str, Any]]:
    """Every ``preftune eval`` result of the run, oldest first: the per-call ``eval-KEY-TIME.json``
    files, after a legacy ``eval.json``. Each: name, created, data, model, n, metrics."""
    results = []
    legacy = _read_held_out(path / EVAL_METRICS_FILE)
    if legacy:  # earlier versions evaluated the final model only
        results.append(
            {
                "name": EVAL_METRICS_FILE,
                "metrics": legacy,
                "n": legacy.get("eval_n"),
                "evaluated": FINAL_MODEL,
            }
        )
    for file in rundir.RunDir(path).eval_results():
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            logger.warning("%s is not valid JSON (%s); ignoring it", file, error)
            continue
        metrics = record.get("metrics") if isinstance(record, dict) else None
        if not isinstance(metrics, dict):
            logger.warning("%s has no 'metrics' object; ignoring it", file)
            continue
        metrics = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        evaluated = record.get("evaluated")
        if not isinstance(evaluated, str):
            evaluated = _evaluated(path, record.get("model"))
        results.append({**record, "name": file.name, "metrics": metrics, "evaluated": evaluated})
    return results


def _evaluated(run_dir: Path, model: Any) -> str:
    """What a record of an earlier version (no ``evaluated`` field) evaluated, from its model path:
    ``final`` for the run's final model, ``checkpoint-N``, or ``other model``."""
    if not isinstance(model, str):
        return "unknown model"
    run = rundir.RunDir(run_dir)
    try:
        found = Path(model).resolve()
        if found in (run.final.resolve(), run.final_adapter.resolve()):
            return FINAL_MODEL
        if found.name == rundir.CHECKPOINT_MODEL:
            found = found.parent
        if found.parent == run.root.resolve() and found.name.startswith(rundir.CHECKPOINT_PREFIX):
            return found.name
    except OSError:
        pass
    return "other model"


def _read_held_out(path: Path) -> dict[str, float] | None:
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        logger.warning("%s is not valid JSON (%s); ignoring it", path, error)
        return None
    if not isinstance(metrics, dict):
        logger.warning("%s is not a JSON object of metrics; ignoring it", path)
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _config_value(config: dict[str, Any], key: str, nested_names: Sequence[str] = ()) -> Any:
    """``config[key]``, or the same key one level down (e.g. ``loss.beta``); dicts give their name."""
    value = config.get(key)
    if value is None:
        for sub in config.values():
            if isinstance(sub, dict) and sub.get(key) is not None:
                value = sub[key]
                break
    if isinstance(value, dict):
        for name in nested_names:
            if isinstance(value.get(name), str):
                return value[name]
        return None
    return value


def method_of(config: dict[str, Any]) -> str | None:
    value = _config_value(config, "method", ("name", "type"))
    return str(value) if value is not None else None


def model_of(config: dict[str, Any]) -> str | None:
    value = _config_value(config, "model", ("name_or_path", "name", "path", "preset"))
    return str(value) if value is not None else None


def beta_of(config: dict[str, Any]) -> Any:
    return _config_value(config, "beta")


def _default_label(run_dir: Path, config: dict[str, Any]) -> str:
    for key in ("label", "run_name"):
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    method, beta = method_of(config), beta_of(config)
    if method is None:
        return run_dir.name or str(run_dir)
    label = f"{method} β={format_value(beta)}" if beta is not None else method
    # the NLL term on the chosen side (sft_weight) is part of the method: DPO and DPO + NLL runs
    # compared side by side must not share a legend entry
    sft = _config_value(config, "sft_weight")
    if isinstance(sft, (int, float)) and not isinstance(sft, bool) and sft > 0:
        label += f" + {format_value(sft)}·NLL"
    return label


def load_run(run_dir: str | Path, *, label: str | None = None) -> Run:
    """Read a run directory. Raises :class:`FileNotFoundError` naming the directory if it or its
    ``metrics.jsonl`` is missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(
            f"run directory {str(path)!r} has no {METRICS_FILE} (is it a preftune run directory?)"
        )
    train, evals = _read_metrics(metrics)
    config = _read_config(path / CONFIG_FILE)
    return Run(
        path=path,
        label=label or _default_label(path.resolve(), config),
        train=train,
        eval=evals,
        evaluation=_read_evaluation(path / EVALUATION_FILE),
        config=config,
        held_out_results=_read_held_out_results(path),
    )


def load_runs(run_dirs: Sequence[str | Path | Run], labels: Sequence[str] | None) -> list[Run]:
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = []
    for i, item in enumerate(run_dirs):
        run = item if isinstance(item, Run) else load_run(item)
        if labels is not None:
            run.label = labels[i]
        runs.append(run)
    # Same method and beta twice is a common comparison (e.g. two seeds): keep the legend unambiguous.
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.resolve().name})"
    return runs


def as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = as_float(row.get(key))
        if value is not None and math.isfinite(value):
            steps.append(row["step"])
            values.append(value)
    return steps, values


def before_after(run: Run) -> dict[str, dict[str, Any]]:
    """``{"before": {...}, "after": {...}}``: the demo's evaluation.json, else the run's first held-out
    evaluation (step 0, before training) and its last; ``{}`` without two evaluations."""
    if run.evaluation:
        return run.evaluation
    if len(run.eval) < 2 or run.eval[0]["step"] != 0:
        return {}

    def side(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "preference_accuracy": initial_metric(row, "rewards/accuracies"),
            "likelihood_accuracy": row.get("eval_logps/accuracies"),
            "reward_margin": initial_metric(row, "rewards/margins"),
            "loss": row.get("eval_loss"),
            "n": row.get("eval_n"),
        }

    return {"before": side(run.eval[0]), "after": side(run.eval[-1]), "after_step": run.eval[-1]["step"]}


def initial_metric(row: dict[str, Any], name: str) -> Any:
    """``eval_initial/NAME`` (against the initial policy) of a row; runs of earlier versions logged it
    as ``eval_primary/NAME`` (against reference 0, the initial policy unless references said otherwise)."""
    value = row.get("eval_initial/" + name)
    return row.get("eval_primary/" + name) if value is None else value


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"
    return str(value).replace("|", "\\|")
