"""Experiment trackers of ``report_to``: Trackio, Weights & Biases and MLflow, with TRL's metric names.

metrics.jsonl is always written (:class:`preftune.metrics.MetricsLog`); each tracker named in
``report_to`` gets the same rows, from the main process only, named as a TRL run names them in that
tracker (transformers' integrations): Trackio and W&B get ``train/loss``, ``train/rewards/margins``,
``eval/loss``, ... and ``train/global_step``; MLflow gets the names of metrics.jsonl (``loss``,
``eval_loss``, ...) at ``step``. TensorBoard stays in :mod:`preftune.metrics` (names of
metrics.jsonl, as before).

Where each writes follows the tracker's own settings, as with TRL:

- ``trackio``: a local SQLite store under ``$TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``),
  or a Space with ``TRACKIO_SPACE_ID``; project ``project`` (default ``preftune``).
- ``wandb``: ``WANDB_MODE=offline`` writes ``wandb/offline-run-*`` under ``$WANDB_DIR`` (default: the
  working directory) for ``wandb sync``; project ``project``, else ``$WANDB_PROJECT``.
- ``mlflow``: ``$MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db`` -- MLflow's default -- or a
  ``file:`` store with ``MLFLOW_ALLOW_FILE_STORE=true``); experiment ``project``, else
  ``$MLFLOW_EXPERIMENT_NAME``.

The run is named ``run_name`` (default: the run directory's name) and gets the resolved config. Each
tracker's run id is kept in the run directory (``trackers.json``): a resumed run, and the answers of
``generation_eval``, go on logging into the same tracker run; a fresh start makes a new one.

Each tracker package is an extra (``pip install 'preftune[wandb]'``); a requested one that is missing
is refused before any model loads (:func:`require_trackers`), with the one-line install message.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .extras import MissingDependency, install_hint

#: report_to name -> (import name, extra). ``none`` alone means metrics.jsonl only.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
NONE = "none"
STATE_FILE = "trackers.json"
DEFAULT_PROJECT = "preftune"


def report_to_error(names: Iterable[str]) -> str | None:
    """Why ``report_to`` is invalid (an unknown tracker, with the closest name), or None."""
    import difflib

    valid = (*TRACKERS, NONE)
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"report_to: {name!r} is not one of {', '.join(valid)}{hint}"
    return None


def requested(names: Iterable[str]) -> list[str]:
    """The trackers of ``report_to`` besides TensorBoard (which :class:`MetricsLog` runs itself)."""
    return [n for n in dict.fromkeys(names) if n in TRACKERS and n != "tensorboard"]


def require_trackers(names: Iterable[str]) -> None:
    """Raise :class:`MissingDependency` for the first requested tracker that is not installed.

    TensorBoard, on by default, is not required: without it the run logs to metrics.jsonl and says
    how to install it. Looked up without importing (cheap, on every process).
    """
    import importlib.util

    for name in requested(names):
        module, extra = TRACKERS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # hidden (sys.modules[name] = None) or half-installed
            found = False
        if not found:
            raise MissingDependency(install_hint(module, extra))


def trl_names(values: dict[str, Any]) -> dict[str, float]:
    """transformers' ``rewrite_logs``: ``eval_x`` -> ``eval/x``, anything else -> ``train/x``;
    numbers only."""
    out = {}
    for key, value in _numbers(values).items():
        out["eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key] = value
    return out


def mlflow_names(values: dict[str, Any]) -> dict[str, float]:
    """The keys of metrics.jsonl, with the characters MLflow refuses replaced by ``_`` (as TRL's
    MLflow callback does)."""
    return {re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k): v for k, v in _numbers(values).items()}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """One tracker run: :meth:`log` rows with their step, :meth:`close` at the end."""

    name = ""

    def log(self, step: int, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def state(self) -> dict:
        """What identifies this run for a later process (kept in trackers.json)."""
        return {}


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, project: str, run_name: str, config: dict, state: dict):
        import trackio

        self._trackio = trackio
        # trackio finds a run by project and name; resume="allow" continues it or starts it
        self.project, self.run_name = state.get("project", project), state.get("name", run_name)
        trackio.init(
            project=self.project,
            name=self.run_name,
            config=config,
            resume="allow" if state else "never",
        )

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._trackio.log({**trl_names(values), "train/global_step": step}, step=step)

    def close(self) -> None:
        self._trackio.finish()

    def state(self) -> dict:
        return {"project": self.project, "name": self.run_name}


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str, run_name: str, config: dict, state: dict):
        import wandb

        kwargs: dict[str, Any] = {
            "project": state.get("project", project),
            "name": run_name,
            "config": config,
        }
        if state.get("id"):
            kwargs.update(id=state["id"], resume="allow")
        self.run = wandb.init(**kwargs)
        # as TRL: every metric is plotted against the optimizer step, not wandb's own counter
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log({**trl_names(values), "train/global_step": step})

    def close(self) -> None:
        self.run.finish()

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, project: str, run_name: str, config: dict, state: dict):
        import mlflow

        self._mlflow = mlflow
        if state.get("run_id"):
            self.run = mlflow.start_run(run_id=state["run_id"])
        else:
            mlflow.set_experiment(project)
            self.run = mlflow.start_run(run_name=run_name)
            params = {k: str(v) for k, v in _flatten(config).items()}
            params = {k: v for k, v in params.items() if len(v) <= 250}  # MLflow's limit per value
            items = list(params.items())
            for i in range(0, len(items), 100):  # at most 100 parameters per call
                mlflow.log_params(dict(items[i : i + 100]))

    def log(self, step: int, values: dict[str, Any]) -> None:
        metrics = mlflow_names(values)
        if metrics:
            self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self._mlflow.end_run()

    def state(self) -> dict:
        return {"run_id": self.run.info.run_id}


OPENERS: dict[str, Callable[..., Tracker]] = {
    "trackio": TrackioTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


class Trackers:
    """The requested trackers of one run directory, opened at the first row (so that a fresh start,
    :meth:`forget`, begins new tracker runs and a resume continues the old ones)."""

    def __init__(
        self,
        output_dir: Path,
        names: Iterable[str],
        log: Callable[[str], None],
        *,
        project: str | None = None,
        run_name: str | None = None,
    ):
        self.root = Path(output_dir)
        self.names = requested(names)
        self.log = log
        self.project = project
        self.run_name = run_name
        self.open: list[Tracker] | None = None

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def forget(self) -> None:
        """A run starting at step 0: its trackers start new runs."""
        if self.state_path.is_file():
            self.state_path.unlink()

    def _config(self) -> dict:
        import yaml

        path = self.root / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            data = None
        return data if isinstance(data, dict) else {}

    def _open(self) -> list[Tracker]:
        config = self._config()
        try:
            saved = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        except (OSError, ValueError):
            saved = {}
        run_name = self.run_name or config.get("run_name") or self.root.resolve().name
        opened: list[Tracker] = []
        for name in self.names:
            project = self.project or config.get("project") or _env_project(name)
            try:
                opened.append(OPENERS[name](project, run_name, config, saved.get(name, {})))
            except MissingDependency as error:
                self.log(f"{error}; not logging to {name}")
            except Exception as error:  # a tracker that cannot start must not cost the training run
                self.log(
                    f"report_to {name}: could not start ({type(error).__name__}: {error}); not logging to it"
                )
        if opened:
            saved.update({t.name: t.state() for t in opened})
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved, indent=1))
            os.replace(tmp, self.state_path)
        return opened

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.names:
            return
        if self.open is None:
            self.open = self._open()
        for tracker in list(self.open):
            try:
                tracker.log(step, values)
            except Exception as error:  # metrics.jsonl has every row: say so and go on without it
                self.log(
                    f"report_to {tracker.name}: logging failed ({type(error).__name__}: {error}); "
                    "not logging to it any more (metrics.jsonl has every row)"
                )
                self.open.remove(tracker)

    def close(self) -> None:
        for tracker in self.open or []:
            try:
                tracker.close()
            except Exception as error:
                self.log(f"report_to {tracker.name}: closing failed ({type(error).__name__}: {error})")
        self.open = None


def _env_project(name: str) -> str:
    """The project when the config names none: W&B's and MLflow's own variables, else ``preftune``."""
    env = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}.get(name)
    return (os.environ.get(env) if env else None) or DEFAULT_PROJECT
