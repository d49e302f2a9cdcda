"""The report's figures: training curves of one run or several, and before/after bars.

Writes ``loss.png``, ``margins.png``, ``accuracy.png`` and ``before_after.png``. Figures are built on
:class:`matplotlib.figure.Figure` directly (no pyplot, no global backend state), so this module is
safe to call from a training process; matplotlib (extra ``plots``) is imported only when a figure is
built.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import rundir
from ..extras import require
from .runs import EVAL_PREFIX, Run, as_float, before_after, load_runs, series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

LOSS_PLOT, MARGINS_PLOT, ACCURACY_PLOT, BEFORE_AFTER_PLOT = rundir.PLOTS
FIGSIZE = (8.0, 5.0)
DPI = 100

# Axis labels for metric keys.
AXIS_LABELS = {
    "loss": "loss (lower is better)",
    "rewards/margins": "reward margin, chosen − rejected",
    "rewards/accuracies": "preference accuracy (fraction of pairs)",
}


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


# One look per run: colour, dash pattern and marker all differ for the first 8 runs (then repeat with
# the colour moving on), so lines that coincide stay told apart.
DASHES: tuple[Any, ...] = (
    "-",
    (0, (6, 2)),
    (0, (1, 1.5)),
    (0, (6, 2, 1, 2)),
    (0, (3, 1.5)),
    (0, (8, 2, 1, 2, 1, 2)),
    (0, (2, 3)),
    (0, (10, 3)),
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def run_styles(n: int) -> list[dict[str, Any]]:
    """The look of each of ``n`` runs: ``color``, ``linestyle`` (a dash pattern), ``marker`` and
    ``linewidth``. Earlier runs draw wider, so a later run's line on top of an identical one leaves
    the earlier one showing along both edges."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [
        {
            "color": cmap(i % cmap.N),
            "linestyle": DASHES[i % len(DASHES)],
            "marker": MARKERS[i % len(MARKERS)],
            "linewidth": 1.4 + 0.4 * (n - 1 - i),
        }
        for i in range(n)
    ]


def _colors(n: int) -> list[Any]:
    return [style["color"] for style in run_styles(n)]


def _curve_figure(runs: Sequence[Run], key: str, title: str, ylabel: str) -> Figure | None:
    """Train curve (EMA over a faint raw curve) and eval markers of ``key`` for every run, each run
    in its own colour, dash pattern and marker (:func:`run_styles`)."""
    from matplotlib.lines import Line2D

    curves = [(series(run.train, key), series(run.eval, EVAL_PREFIX + key)) for run in runs]
    if not any(train[0] or evals[0] for train, evals in curves):
        return None
    if len(runs) == 1:
        title = f"{title} — {runs[0].label}"
    fig, ax = _new_figure(title, ylabel)
    handles, labels = [], []
    any_smoothed = any_eval = False
    styles = run_styles(len(runs))
    for i, (run, style, ((steps, values), (eval_steps, eval_values))) in enumerate(zip(runs, styles, curves)):
        if not steps and not eval_steps:
            continue
        color, dash, marker, width = style["color"], style["linestyle"], style["marker"], style["linewidth"]
        # ~10 markers per curve; coinciding curves put theirs on different points (staggered starts)
        spacing = max(1, len(steps) // 10)
        every = ((i * spacing) // len(runs), spacing)
        if steps:
            alpha = _smoothing_alpha(len(steps))
            if alpha is None:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle=dash,
                    linewidth=width,
                    marker=marker,
                    markersize=4,
                    markevery=every,
                )
            else:
                any_smoothed = True
                ax.plot(steps, values, color=color, linestyle="none", marker="o", markersize=3, alpha=0.3)
                ax.plot(
                    steps,
                    ema(values, alpha),
                    color=color,
                    linestyle=dash,
                    linewidth=width,
                    marker=marker,
                    markersize=4,
                    markevery=every,
                    label="train (smoothed)",
                )
        if eval_steps:
            any_eval = True
            ax.plot(
                eval_steps,
                eval_values,
                color=color,
                linestyle=":",
                linewidth=1.0,
                marker=marker,
                markersize=5 + 1.2 * (len(runs) - 1 - i),  # concentric: coinciding points all show
                markerfacecolor="none",
                markeredgewidth=1.5,
                label="eval (held-out)",
            )
        handles.append(
            Line2D([], [], color=color, linestyle=dash, linewidth=2.2, marker=marker, markersize=6)
        )
        labels.append(run.label)
    # Style keys in grey, after the run colours.
    gray = "0.35"
    if any_smoothed:
        handles.append(Line2D([], [], color=gray, linewidth=1.8))
        labels.append("train (smoothed)")
        handles.append(Line2D([], [], color=gray, linestyle="none", marker="o", markersize=3, alpha=0.4))
        labels.append("train (each step)")
    elif any(steps for (steps, _), _ in curves):
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
                markerfacecolor="none",
                markeredgewidth=1.5,
            )
        )
        labels.append("eval (held-out)")
    if key == "rewards/margins":
        ax.axhline(0.0, color="black", linewidth=0.8, alpha=0.6)
    if key == "rewards/accuracies":
        ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.6, linestyle="--")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.02), max(high, 1.02))
    if len(runs) > 3:  # many runs: the legend beside the axes, never over the curves
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, framealpha=0.9)
    else:
        ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    return fig


def _before_after_figure(runs: Sequence[Run]) -> Figure | None:
    """Horizontal bars, one row per run (its label once, on the left), before (hatched) and after
    each with its value at its end; the figure grows with the runs, so no text overlaps."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    evaluated = [(run, color) for run, color in zip(runs, _colors(len(runs))) if before_after(run)]
    if not evaluated:
        return None

    def value(run: Run, side: str, key: str) -> float | None:
        block = before_after(run).get(side)
        return as_float(block.get(key)) if isinstance(block, dict) else None

    panels = [
        (key, title)
        for key, title in (
            ("preference_accuracy", "preference accuracy\n(reward vs initial policy)"),
            ("likelihood_accuracy", "likelihood accuracy\n(log π chosen > rejected)"),
            ("exact_match", "exact match\n(greedy answers)"),
        )
        if any(value(run, side, key) is not None for run, _ in evaluated for side in ("before", "after"))
    ]
    if not panels:
        return None
    height = max(FIGSIZE[1], 1.8 + 0.62 * len(evaluated))
    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    title = "Before vs after training"
    fig.suptitle(title if len(runs) > 1 else f"{title} — {runs[0].label}", fontsize=13)
    bar = 0.38
    rows = range(len(evaluated))
    for ax, (key, panel_title) in zip(axes, panels):
        top = 1.0
        for i, (run, color) in enumerate(evaluated):
            for offset, side, alpha, hatch in (
                (-bar / 2, "before", 0.4, "//"),
                (bar / 2, "after", 1.0, None),
            ):
                number = value(run, side, key)
                y = i + offset
                if number is None:
                    ax.text(0.01, y, "n/a", ha="left", va="center", fontsize=8, color="0.4")
                    continue
                top = max(top, number)
                ax.barh(
                    y, number, bar, color=color, alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.6
                )
                ax.text(number + 0.015, y, f"{number:.3g}", ha="left", va="center", fontsize=8)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlim(0, top * 1.3)  # room for the values after the longest bar
        ax.grid(True, axis="x", alpha=0.3)
        if key == "preference_accuracy":
            ax.axvline(0.5, color="black", linewidth=0.8, alpha=0.6, linestyle="--")
    axes[0].set_ylim(len(evaluated) - 0.5, -0.5)  # the first run on top
    axes[0].set_yticks(list(rows))
    axes[0].set_yticklabels([textwrap.fill(run.label, 22) for run, _ in evaluated], fontsize=9)
    axes[0].set_xlabel("score (fraction of examples)", fontsize=10)
    fig.legend(
        [
            Patch(facecolor="0.5", alpha=0.4, hatch="//", edgecolor="black"),
            Patch(facecolor="0.5", edgecolor="black"),
        ],
        ["before", "after"],
        loc="outside lower center",
        ncols=2,
        fontsize=9,
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
    runs = load_runs(run_dirs, labels)
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
