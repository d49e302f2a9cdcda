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


def _new_figure(title: str, ylabel: str, *, panels: int = 1) -> tuple[Figure, Any]:
    """A figure with ``panels`` axes stacked over one step axis (the first twice as tall); returns
    the figure and its first axes."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False, height_ratios=[2] + [1] * (panels - 1))[:, 0]
    ax = axes[0]
    ax.set_title(title, fontsize=13)
    axes[-1].set_xlabel("step", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
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


# Fewer points than this are drawn as markers alone: two points make no trend worth a line.
MIN_POINTS_FOR_LINE = 3
TERM_STYLES = ("-", "--", "-.", ":")


def loss_terms(run: Run) -> list[tuple[str, float]]:
    """The terms a run's loss is the sum of, as logged: ``(metric key, its weight)``; ``[]`` for a
    one-term loss. Each link of a sum logs ``loss/<link>`` (weights ``loss_weights``), the SFT term
    ``nll_loss`` (weight ``sft_weight``); ORPO's own ``nll_loss`` (weight 0 here) is not a term."""
    keys: list[str] = []
    for row in run.train:
        keys += [key for key in row if (key.startswith("loss/") or key == "nll_loss") and key not in keys]
    links = [key for key in keys if key.startswith("loss/")]
    weights = run.config.get("loss_weights")
    if not (
        isinstance(weights, list)
        and len(weights) == len(links)
        and all(as_float(w) is not None for w in weights)
    ):
        weights = [1.0] * len(links)
    terms = [(key, float(weight)) for key, weight in zip(links, weights)]
    sft_weight = as_float(run.config.get("sft_weight"))
    if "nll_loss" in keys and sft_weight:
        terms.append(("nll_loss", sft_weight))
    return terms if len(terms) > 1 else []


def term_label(key: str, weight: float) -> str:
    """``sigmoid``, ``3·NLL``: a term as it enters the loss."""
    name = "NLL" if key == "nll_loss" else key.removeprefix("loss/")
    return name if weight == 1 else f"{weight:g}·{name}"


def loss_formula(run: Run) -> str | None:
    """``sigmoid + 3·NLL`` for a run whose loss has several terms, else None."""
    terms = loss_terms(run)
    return " + ".join(term_label(key, weight) for key, weight in terms) if terms else None


def _draw_train(ax: Any, steps: list, values: list, color: Any, linestyle: str = "-") -> bool:
    """One train series: an EMA over faint raw points (4+ points), a line with markers, or markers
    alone (under 3 points). True when it was smoothed."""
    alpha = _smoothing_alpha(len(steps))
    if alpha is None:
        line = linestyle if len(steps) >= MIN_POINTS_FOR_LINE else "none"
        ax.plot(steps, values, color=color, linewidth=1.8, linestyle=line, marker="o", markersize=3)
        return False
    ax.plot(steps, values, color=color, linestyle="none", marker="o", markersize=3, alpha=0.3)
    ax.plot(
        steps, ema(values, alpha), color=color, linewidth=1.8, linestyle=linestyle, label="train (smoothed)"
    )
    return True


def _terms_panel(ax: Any, runs: Sequence[Run], colors: Sequence[Any]) -> None:
    """Each run's loss terms as they enter the loss (weight × logged value): they add up to the curve
    above. Run colours; one line style per term."""
    from matplotlib.lines import Line2D

    styles: dict[str, str] = {}
    for run, color in zip(runs, colors):
        for key, weight in loss_terms(run):
            label = term_label(key, weight)
            style = styles.setdefault(label, TERM_STYLES[len(styles) % len(TERM_STYLES)])
            steps, values = series(run.train, key)
            if steps:
                _draw_train(ax, steps, [weight * value for value in values], color, style)
    ax.set_ylabel("term of the loss", fontsize=11)
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color="0.35", linewidth=1.8, linestyle=style) for style in styles.values()]
    ax.legend(handles, list(styles), loc="best", fontsize=9, framealpha=0.9)


def _curve_figure(runs: Sequence[Run], key: str, title: str, ylabel: str) -> Figure | None:
    """Train curve (EMA over a faint raw curve) and eval markers of ``key`` for every run, each run
    in its own colour, dash pattern and marker (:func:`run_styles`); for the loss of runs whose loss
    is a sum, a second panel with its terms."""
    from matplotlib.lines import Line2D

    curves = [(series(run.train, key), series(run.eval, EVAL_PREFIX + key)) for run in runs]
    if not any(train[0] or evals[0] for train, evals in curves):
        return None
    with_terms = key == "loss" and any(loss_terms(run) for run in runs)
    if with_terms:
        formulas = {loss_formula(run) for run in runs}
        (formula,) = formulas if len(formulas) == 1 else (None,)
        title = f"{title} = {formula}" if formula else f"{title} (its terms below)"
    if len(runs) == 1:
        title = f"{title} — {runs[0].label}"
    fig, ax = _new_figure(title, ylabel, panels=2 if with_terms else 1)
    handles, labels = [], []
    any_smoothed = any_eval = eval_line = False
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
            if alpha is None:  # under 3 points: markers alone, no trend line
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle=dash if len(steps) >= MIN_POINTS_FOR_LINE else "none",
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
            # a dotted line joins 3+ evaluations; fewer are markers alone (no trend from two points)
            joined = len(eval_steps) >= MIN_POINTS_FOR_LINE
            eval_line |= joined
            ax.plot(
                eval_steps,
                eval_values,
                color=color,
                linestyle=":" if joined else "none",
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
        handles.append(Line2D([], [], color=gray, linewidth=1.8, marker="o", markersize=3))
        labels.append("train")
    if any_eval:
        handles.append(
            Line2D(
                [],
                [],
                color=gray,
                linestyle=":" if eval_line else "none",
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
    if with_terms:
        _terms_panel(fig.axes[1], runs, [style["color"] for style in styles])
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
