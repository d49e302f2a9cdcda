"""Plots and a markdown report from training runs.

Reads what the trainer leaves in a run directory (:mod:`.runs`: ``metrics.jsonl``, ``config.yaml``,
``evaluation.json``, ``eval.json``; file names: :mod:`preftune.rundir`), and writes ``loss.png``,
``margins.png``, ``accuracy.png``, ``before_after.png`` (:mod:`.plots`) and ``report.md``
(:mod:`.markdown`); ``preftune report`` is :mod:`.cli`. Figures are built on
:class:`matplotlib.figure.Figure` directly (no pyplot, no global backend state), so this package is
safe to call from a training process.
"""

from .cli import build_parser, console_summary, main
from .markdown import METRIC_MEANINGS, write_comparison, write_report
from .plots import ema, legend_labels, make_figures, plot_runs
from .runs import Run, before_after, load_run, load_runs

_load_runs = load_runs  # the name this had when the package was one module (tests/test_report.py)

__all__ = [
    "METRIC_MEANINGS",
    "Run",
    "before_after",
    "build_parser",
    "console_summary",
    "ema",
    "legend_labels",
    "load_run",
    "load_runs",
    "main",
    "make_figures",
    "plot_runs",
    "write_comparison",
    "write_report",
]
