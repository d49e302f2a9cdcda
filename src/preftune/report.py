"""Plots and a markdown report from training runs.

Reads what the trainer leaves in a run directory:

- ``metrics.jsonl``: one JSON object per line, TRL metric names; evaluation lines carry the ``eval_``
  prefix. Lines repeated for a step (a resumed run logs the same step again) are merged, later values
  winning; unreadable lines (a crash mid-write leaves a partial last line) are skipped.
- ``config.yaml``: the resolved config, used for the run's label and summary.
- ``evaluation.json`` (optional): ``{"before": {...}, "after": {...}}`` from the demo.
- ``eval.json`` (optional): held-out metrics written by ``preftune eval``.

(File names: :mod:`preftune.rundir`.)

and writes ``loss.png``, ``margins.png``, ``accuracy.png``, ``before_after.png`` and ``report.md``.
Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend state),
so this module is safe to call from a training process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir
from .extras import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Run",
    "load_run",
    "make_figures",
    "legend_labels",
    "plot_runs",
    "write_report",
    "write_comparison",
    "main",
]

logger = logging.getLogger(__name__)

METRICS_FILE = rundir.METRICS
CONFIG_FILE = rundir.CONFIG
EVALUATION_FILE = rundir.BEFORE_AFTER
EVAL_METRICS_FILE = rundir.EVAL_METRICS
REPORT_FILE = rundir.REPORT
LOSS_PLOT, MARGINS_PLOT, ACCURACY_PLOT, BEFORE_AFTER_PLOT = rundir.PLOTS
EVAL_PREFIX = "eval_"

FIGSIZE = (8.0, 5.0)
DPI = 100

# Metrics in the order a reader looks for them; anything else logged follows alphabetically.
PREFERRED_METRICS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "peak_memory_mb",
)
# Bookkeeping keys that are not metrics.
INDEX_KEYS = frozenset({"step", "epoch"})

# What each held-out number means, in one line (shown under `train`, `eval` and in report.md).
METRIC_MEANINGS = {
    "eval_loss": "the method's loss on held-out pairs (lower is better)",
    "eval_rewards/accuracies": "pairs whose implicit reward (vs the method's reference) ranks chosen first; "
    "ties count 1/2, 0.5 = no preference",
    "eval_rewards/accuracies_strict": "the same, ties counted 0 (TRL's number)",
    "eval_rewards/margins": "mean β·(reward chosen − reward rejected) vs the method's reference; "
    "> 0 prefers chosen",
    "eval_rewards/chosen": "mean β·log π/π_ref of the chosen answers",
    "eval_rewards/rejected": "mean β·log π/π_ref of the rejected answers",
    "eval_primary/rewards/accuracies": "pairs ranked chosen-first by the reward vs the initial policy alone "
    "(0.5 before training)",
    "eval_primary/rewards/accuracies_strict": "the same, ties counted 0",
    "eval_primary/rewards/margins": "mean β·margin vs the initial policy (0 before training)",
    "eval_logps/accuracies": "pairs where the policy itself gives the chosen answer the higher log-prob "
    "(no reference)",
    "eval_answer_match": "prompts whose greedy answer matches (see match mode)",
    "eval_answer_phrase": 'prompts whose greedy answer reaches "The answer is N"',
    "eval_prompts_n": "prompts answered",
}

# Axis labels for metric keys.
AXIS_LABELS = {
    "loss": "loss (lower is better)",
    "rewards/margins": "reward margin, chosen − rejected",
    "rewards/accuracies": "preference accuracy (fraction of pairs)",
}

EVALUATION_METRICS = (
    ("preference_accuracy", "preference accuracy"),
    ("reward_margin", "reward margin"),
    ("exact_match", "exact match"),
    ("n", "examples (n)"),
)


# --------------------------------------------------------------------------------------------------
# Loading


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
    def held_out(self) -> dict[str, float] | None:
        """The metrics of the latest ``preftune eval`` result, or None."""
        return self.held_out_results[-1]["metrics"] if self.held_out_results else None

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
    if legacy:
        results.append({"name": EVAL_METRICS_FILE, "metrics": legacy, "n": legacy.get("eval_n")})
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
        results.append({**record, "name": file.name, "metrics": metrics})
    return results


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


def _method(config: dict[str, Any]) -> str | None:
    value = _config_value(config, "method", ("name", "type"))
    return str(value) if value is not None else None


def _model(config: dict[str, Any]) -> str | None:
    value = _config_value(config, "model", ("name_or_path", "name", "path", "preset"))
    return str(value) if value is not None else None


def _beta(config: dict[str, Any]) -> Any:
    return _config_value(config, "beta")


def _default_label(run_dir: Path, config: dict[str, Any]) -> str:
    for key in ("label", "run_name"):
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    method, beta = _method(config), _beta(config)
    if method is None:
        return run_dir.name or str(run_dir)
    return f"{method} β={_format_value(beta)}" if beta is not None else method


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


def _load_runs(run_dirs: Sequence[str | Path | Run], labels: Sequence[str] | None) -> list[Run]:
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


# --------------------------------------------------------------------------------------------------
# Plotting


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = _as_float(row.get(key))
        if value is not None and math.isfinite(value):
            steps.append(row["step"])
            values.append(value)
    return steps, values


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled toward zero."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        smoothed.append(average / weight)
    return smoothed


def _smoothing_alpha(n_points: int) -> float | None:
    """An EMA spanning ~1/10 of the curve (at least 2 points); none for curves under 4 points."""
    if n_points < 4:
        return None
    span = max(2, n_points // 10)
    return 2.0 / (span + 1)


def _new_figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("step", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 1.25 ticks
    return fig, ax


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _curve_figure(runs: Sequence[Run], key: str, title: str, ylabel: str) -> Figure | None:
    """Train curve (EMA over a faint raw curve) and eval markers of ``key`` for every run."""
    from matplotlib.lines import Line2D

    series = [(_series(run.train, key), _series(run.eval, EVAL_PREFIX + key)) for run in runs]
    if not any(train[0] or evals[0] for train, evals in series):
        return None
    if len(runs) == 1:
        title = f"{title} — {runs[0].label}"
    fig, ax = _new_figure(title, ylabel)
    handles, labels = [], []
    any_smoothed = any_eval = False
    for run, color, ((steps, values), (eval_steps, eval_values)) in zip(runs, _colors(len(runs)), series):
        if not steps and not eval_steps:
            continue
        if steps:
            alpha = _smoothing_alpha(len(steps))
            marker = "o" if len(steps) < 20 else None
            if alpha is None:
                ax.plot(steps, values, color=color, linewidth=1.8, marker=marker, markersize=3)
            else:
                any_smoothed = True
                ax.plot(steps, values, color=color, linestyle="none", marker="o", markersize=3, alpha=0.3)
                ax.plot(steps, ema(values, alpha), color=color, linewidth=1.8, label="train (smoothed)")
        if eval_steps:
            any_eval = True
            ax.plot(
                eval_steps,
                eval_values,
                color=color,
                linestyle=":",
                linewidth=1.0,
                marker="o",
                markersize=6,
                markeredgecolor="black",
                markeredgewidth=0.6,
                label="eval (held-out)",
            )
        handles.append(Line2D([], [], color=color, linewidth=2.5))
        labels.append(run.label)
    # Style keys in grey, after the run colours.
    gray = "0.35"
    if any_smoothed:
        handles.append(Line2D([], [], color=gray, linewidth=1.8))
        labels.append("train (smoothed)")
        handles.append(Line2D([], [], color=gray, linestyle="none", marker="o", markersize=3, alpha=0.4))
        labels.append("train (each step)")
    elif any(steps for (steps, _), _ in series):
        handles.append(Line2D([], [], color=gray, linewidth=1.8))
        labels.append("train")
    if any_eval:
        handles.append(
            Line2D(
                [],
                [],
                color=gray,
                linestyle=":",
                marker="o",
                markersize=6,
                markeredgecolor="black",
                markeredgewidth=0.6,
            )
        )
        labels.append("eval (held-out)")
    if key == "rewards/margins":
        ax.axhline(0.0, color="black", linewidth=0.8, alpha=0.6)
    if key == "rewards/accuracies":
        ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.6, linestyle="--")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.02), max(high, 1.02))
    ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    return fig


def before_after(run: Run) -> dict[str, dict[str, Any]]:
    """``{"before": {...}, "after": {...}}``: the demo's evaluation.json, else the run's first held-out
    evaluation (step 0, before training) and its last; ``{}`` without two evaluations."""
    if run.evaluation:
        return run.evaluation
    if len(run.eval) < 2 or run.eval[0]["step"] != 0:
        return {}

    def side(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "preference_accuracy": row.get("eval_primary/rewards/accuracies"),
            "likelihood_accuracy": row.get("eval_logps/accuracies"),
            "reward_margin": row.get("eval_primary/rewards/margins"),
            "loss": row.get("eval_loss"),
            "n": row.get("eval_n"),
        }

    return {"before": side(run.eval[0]), "after": side(run.eval[-1]), "after_step": run.eval[-1]["step"]}


def _before_after_figure(runs: Sequence[Run]) -> Figure | None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    evaluated = [(run, color) for run, color in zip(runs, _colors(len(runs))) if before_after(run)]
    if not evaluated:
        return None

    def value(run: Run, side: str, key: str) -> float | None:
        block = before_after(run).get(side)
        return _as_float(block.get(key)) if isinstance(block, dict) else None

    panels = [
        (key, title)
        for key, title in (
            ("preference_accuracy", "preference accuracy\n(reward vs initial policy)"),
            ("likelihood_accuracy", "likelihood accuracy\n(log π chosen > rejected)"),
            ("exact_match", "exact match"),
        )
        if any(value(run, side, key) is not None for run, _ in evaluated for side in ("before", "after"))
    ]
    if not panels:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    title = "Before vs after training"
    fig.suptitle(title if len(runs) > 1 else f"{title} — {runs[0].label}", fontsize=13)
    width = 0.38
    for ax, (key, panel_title) in zip(axes, panels):
        top = 1.0
        for i, (run, color) in enumerate(evaluated):
            for offset, side, alpha, hatch in (
                (-width / 2, "before", 0.4, "//"),
                (width / 2, "after", 1.0, None),
            ):
                number = value(run, side, key)
                x = i + offset
                if number is None:
                    ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=9, color="0.4", clip_on=True)
                    continue
                top = max(top, number)
                ax.bar(
                    x, number, width, color=color, alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.6
                )
                ax.text(x, number + 0.01, f"{number:.3g}", ha="center", va="bottom", fontsize=9)
        ax.set_title(panel_title, fontsize=12)
        ax.set_ylim(0, top * 1.12)
        ax.set_xlim(-0.6, len(evaluated) - 0.4)
        ax.set_xticks(range(len(evaluated)))
        ax.set_xticklabels([textwrap.fill(run.label, 16) for run, _ in evaluated], fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "preference_accuracy":
            ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.6, linestyle="--")
    axes[0].set_ylabel("score (fraction of examples)", fontsize=11)
    axes[0].legend(
        [
            Patch(facecolor="0.5", alpha=0.4, hatch="//", edgecolor="black"),
            Patch(facecolor="0.5", edgecolor="black"),
        ],
        ["before", "after"],
        loc="upper left",
        fontsize=9,
        framealpha=0.9,
    )
    return fig


def make_figures(runs: Sequence[Run]) -> dict[str, Figure]:
    """Build the report figures for ``runs`` (one colour per run), keyed by file name.

    Figures whose metrics no run logged are left out; ``before_after.png`` only appears when some run
    has an ``evaluation.json``.
    """
    require("matplotlib", "plots")  # every figure builder below imports it
    builders = {
        LOSS_PLOT: lambda: _curve_figure(runs, "loss", "Loss", AXIS_LABELS["loss"]),
        MARGINS_PLOT: lambda: _curve_figure(
            runs, "rewards/margins", "Reward margin (chosen − rejected)", AXIS_LABELS["rewards/margins"]
        ),
        ACCURACY_PLOT: lambda: _curve_figure(
            runs,
            "rewards/accuracies",
            "Preference accuracy (margin > 0; ties count 1/2)",
            AXIS_LABELS["rewards/accuracies"],
        ),
        BEFORE_AFTER_PLOT: lambda: _before_after_figure(runs),
    }
    figures = {}
    for name, build in builders.items():
        fig = build()
        if fig is not None:
            figures[name] = fig
    return figures


def legend_labels(fig: Figure) -> list[str]:
    """Texts of every legend in ``fig`` (figure and axes legends)."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    return [text.get_text() for legend in legends if legend is not None for text in legend.get_texts()]


def plot_runs(
    run_dirs: Sequence[str | Path | Run], out_dir: str | Path, *, labels: Sequence[str] | None = None
) -> list[Path]:
    """Write the comparison PNGs for ``run_dirs`` into ``out_dir``; returns the written paths."""
    runs = _load_runs(run_dirs, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in make_figures(runs).items():
        path = out / name
        fig.savefig(path, dpi=DPI)
        written.append(path)
    if not written:
        logger.warning("no plottable metrics in %s", ", ".join(str(run.path) for run in runs))
    return written


# --------------------------------------------------------------------------------------------------
# Markdown


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _format_change(before: Any, after: Any) -> str:
    b, a = _as_float(before), _as_float(after)
    if b is None or a is None:
        return "—"
    return f"{a - b:+.4g}"


def _metric_keys(run: Run) -> list[str]:
    """Unprefixed metric names logged in train or eval rows, in reading order."""
    names: set[str] = set()
    for row in run.train:
        names.update(key for key in row if key not in INDEX_KEYS)
    for row in run.eval:
        names.update(key[len(EVAL_PREFIX) :] for key in row if key.startswith(EVAL_PREFIX))
    preferred = [name for name in PREFERRED_METRICS if name in names]
    return preferred + sorted(names - set(preferred))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_section(run: Run) -> str:
    rows = [
        ("run directory", f"`{run.path}`"),
        ("method", _format_value(_method(run.config))),
        ("model", _format_value(_model(run.config))),
        ("beta", _format_value(_beta(run.config))),
        ("steps", _format_value(run.last_step)),
        ("epochs", _format_value(run.final("epoch") if run.train else None)),
        ("train log lines / eval log lines", f"{len(run.train)} / {len(run.eval)}"),
    ]
    throughput = _series(run.train, "tokens_per_second")[1]
    if throughput:
        median = sorted(throughput)[len(throughput) // 2]
        rows.append(("median tokens/s", _format_value(median)))
    memory = _series(run.train, "peak_memory_mb")[1]
    if memory:
        rows.append(("peak memory (MB)", _format_value(max(memory))))
    return "## Summary\n\n" + _table(["field", "value"], rows)


def _final_metrics_section(run: Run) -> str:
    names = _metric_keys(run)
    if not names:
        return "## Final metrics\n\nNo metrics were logged."
    train_step = run.train[-1]["step"] if run.train else None
    eval_step = run.eval[-1]["step"] if run.eval else None
    header = [
        "metric",
        f"train (step {train_step})" if train_step is not None else "train",
        f"eval (step {eval_step})" if eval_step is not None else "eval",
    ]
    rows = [
        (f"`{name}`", _format_value(run.final(name)), _format_value(run.final(EVAL_PREFIX + name)))
        for name in names
    ]
    note = "Latest logged value of each metric."
    return f"## Final metrics\n\n{note}\n\n" + _table(header, rows)


def _before_after_section(run: Run) -> str | None:
    evaluation = before_after(run)
    if not evaluation:
        return None
    before = evaluation.get("before") or {}
    after = evaluation.get("after") or {}
    rows = []
    for key, title in EVALUATION_METRICS:
        if before.get(key) is None and after.get(key) is None:
            continue
        change = _format_change(before.get(key), after.get(key)) if key != "n" else ""
        rows.append((title, _format_value(before.get(key)), _format_value(after.get(key)), change))
    extra = sorted((set(before) | set(after)) - {key for key, _ in EVALUATION_METRICS})
    for key in extra:
        if before.get(key) is None and after.get(key) is None:
            continue
        rows.append(
            (
                key,
                _format_value(before.get(key)),
                _format_value(after.get(key)),
                _format_change(before.get(key), after.get(key)),
            )
        )
    return "## Before vs after training\n\n" + _table(["metric", "before", "after", "change"], rows)


def _held_out_section(run: Run) -> str | None:
    results = run.held_out_results
    if not results:
        return None
    keys = list(dict.fromkeys(k for r in results for k in r["metrics"] if k != "eval_n"))
    header = ["metric", *(f"`{r['name']}`" for r in results), "meaning"]
    rows = [["n (held-out pairs)", *(_format_value(r.get("n")) for r in results), ""]]
    rows += [["data", *(_format_value(r.get("data")) for r in results), ""]]
    rows += [
        [f"`{k}`", *(_format_value(r["metrics"].get(k)) for r in results), METRIC_MEANINGS.get(k, "")]
        for k in keys
    ]
    note = "Written by `preftune eval` and `generation_eval`, one column per call (oldest first)."
    return f"## Held-out evaluation\n\n{note}\n\n" + _table(header, rows)


_PLOT_TITLES = {
    LOSS_PLOT: "Loss",
    MARGINS_PLOT: "Reward margin",
    ACCURACY_PLOT: "Preference accuracy",
    BEFORE_AFTER_PLOT: "Before vs after",
}


def _plots_section(plot_names: Sequence[str]) -> str:
    if not plot_names:
        return "## Plots\n\nNothing to plot."
    parts = [
        f"### {_PLOT_TITLES.get(name, name)}\n\n![{_PLOT_TITLES.get(name, name)}]({name})"
        for name in plot_names
    ]
    return "## Plots\n\n" + "\n\n".join(parts)


def _write_report(
    run_dir: str | Path, extra_sections: dict[str, str] | None, label: str | None, plots: bool
) -> tuple[Path, list[Path]]:
    run = load_run(run_dir, label=label)
    if plots:
        plot_paths = plot_runs([run], run.path)
    else:
        plot_paths = [run.path / name for name in _PLOT_TITLES if (run.path / name).is_file()]
    sections = [
        f"# Training report: {run.label}",
        _summary_section(run),
        _final_metrics_section(run),
        _before_after_section(run),
        _held_out_section(run),
        _plots_section([path.name for path in plot_paths]),
    ]
    for title, body in (extra_sections or {}).items():
        sections.append(f"## {title}\n\n{body.strip()}")
    path = run.path / REPORT_FILE
    path.write_text("\n\n".join(s for s in sections if s) + "\n", encoding="utf-8")
    return path, plot_paths


def write_report(
    run_dir: str | Path,
    *,
    extra_sections: dict[str, str] | None = None,
    label: str | None = None,
    plots: bool = True,
) -> Path:
    """Write ``RUN_DIR/report.md`` (and, unless ``plots=False``, the PNGs it links into ``RUN_DIR``).

    ``extra_sections`` maps section titles to markdown bodies appended at the end; ``label`` overrides
    the label derived from ``config.yaml``.
    """
    return _write_report(run_dir, extra_sections, label, plots)[0]


def write_comparison(runs: Sequence[Run], out_dir: str | Path, plot_names: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.md``: one row of final metrics per run, and links to ``plot_names``."""
    columns = [
        ("method", lambda r: _format_value(_method(r.config))),
        ("model", lambda r: _format_value(_model(r.config))),
        ("steps", lambda r: _format_value(r.last_step)),
        ("loss", lambda r: _format_value(r.final("loss"))),
        ("eval loss", lambda r: _format_value(r.final("eval_loss"))),
        ("margin", lambda r: _format_value(r.final("rewards/margins"))),
        ("eval margin", lambda r: _format_value(r.final("eval_rewards/margins"))),
        ("accuracy", lambda r: _format_value(r.final("rewards/accuracies"))),
        ("eval accuracy", lambda r: _format_value(r.final("eval_rewards/accuracies"))),
    ]
    rows = [[run.label.replace("|", "\\|")] + [cell(run) for _, cell in columns] for run in runs]
    sections = [
        "# Run comparison",
        "Final logged values (train / eval).\n\n" + _table(["run", *(name for name, _ in columns)], rows),
    ]
    evaluated = [run for run in runs if before_after(run)]
    if evaluated:
        eval_rows = []
        for run in evaluated:
            before = before_after(run).get("before") or {}
            after = before_after(run).get("after") or {}
            cells = [run.label.replace("|", "\\|")]
            for key in ("preference_accuracy", "likelihood_accuracy", "exact_match"):
                cells += [_format_value(before.get(key)), _format_value(after.get(key))]
            eval_rows.append(cells)
        header = [
            "run",
            "pref. acc. before",
            "pref. acc. after",
            "likelihood acc. before",
            "likelihood acc. after",
            "exact match before",
            "exact match after",
        ]
        sections.append("## Before vs after training\n\n" + _table(header, eval_rows))
    held_out = [run for run in runs if run.held_out]
    if held_out:
        keys = list(dict.fromkeys(k for run in held_out for k in run.held_out))
        rows = [
            [run.label.replace("|", "\\|")] + [_format_value(run.held_out.get(k)) for k in keys]
            for run in held_out
        ]
        sections.append(
            "## Held-out evaluation (`preftune eval`)\n\n" + _table(["run", *(f"`{k}`" for k in keys)], rows)
        )
    sections.append(_plots_section(plot_names))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune report",
        description=(
            "Plot training curves and write a markdown report. One run: plots and report.md go into "
            "the run directory. Several runs: comparison plots and report.md go into --out."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory for a comparison of several runs (default: ./report-compare/)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        help="legend label; repeat once per RUN_DIR, in order (default: '<method> β=<beta>' from config.yaml)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``preftune report RUN_DIR [RUN_DIR ...] [--out DIR] [--label ...]``; returns an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.run_dirs):
        parser.error(f"got {len(args.label)} --label for {len(args.run_dirs)} run directories")
    try:
        if len(args.run_dirs) == 1:
            label = args.label[0] if args.label else None
            report, written = _write_report(args.run_dirs[0], None, label, plots=True)
            written.append(report)
            if args.out is not None:
                print("note: --out is used only when comparing several runs", file=sys.stderr)
        else:
            runs = _load_runs(args.run_dirs, args.label)
            out = Path(args.out if args.out is not None else "report-compare")
            written = plot_runs(runs, out)
            written.append(write_comparison(runs, out, [path.name for path in written]))
    except (FileNotFoundError, ValueError) as error:
        print(f"preftune report: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    runs = _load_runs(args.run_dirs, args.label)
    print("\n" + console_summary(runs))
    print(f"\nreport: {written[-1]}")
    return 0


def console_summary(runs: Sequence[Run]) -> str:
    """What ``preftune report`` prints last: per run, its steps and held-out numbers before → after."""

    def pair(run: Run, key: str) -> str:
        sides = before_after(run)
        b = (sides.get("before") or {}).get(key)
        a = (sides.get("after") or {}).get(key)
        if a is None and key == "preference_accuracy":
            a = run.final("eval_primary/rewards/accuracies")
        return f"{_format_value(b)} → {_format_value(a)}" if b is not None else _format_value(a)

    header = ["run", "steps", "held-out pref. accuracy", "likelihood accuracy", "eval loss", "n"]
    rows = []
    for run in runs:
        loss_before = run.eval[0].get("eval_loss") if run.eval and run.eval[0]["step"] == 0 else None
        loss_after = run.final("eval_loss")
        loss = (
            f"{_format_value(loss_before)} → {_format_value(loss_after)}"
            if loss_before is not None
            else (_format_value(loss_after))
        )
        n = (before_after(run).get("after") or {}).get("n") or run.final("eval_n")
        rows.append(
            [
                run.label,
                _format_value(run.last_step),
                pair(run, "preference_accuracy"),
                pair(run, "likelihood_accuracy"),
                loss,
                _format_value(n),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "held-out results, before → after training:\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
