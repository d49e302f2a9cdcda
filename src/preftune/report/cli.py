"""``preftune report RUN_DIR [RUN_DIR ...]``: one run's report in its directory, or several compared."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .markdown import report_with_plots, write_comparison
from .plots import plot_runs
from .runs import Run, before_after, format_value, initial_metric, load_runs


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
            report, written = report_with_plots(args.run_dirs[0], None, label, plots=True)
            written.append(report)
            if args.out is not None:
                print("note: --out is used only when comparing several runs", file=sys.stderr)
        else:
            runs = load_runs(args.run_dirs, args.label)
            out = Path(args.out if args.out is not None else "report-compare")
            written = plot_runs(runs, out)
            written.append(write_comparison(runs, out, [path.name for path in written]))
    except (FileNotFoundError, ValueError) as error:
        print(f"preftune report: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    runs = load_runs(args.run_dirs, args.label)
    print("\n" + console_summary(runs))
    print(f"\nreport: {written[-1]}")
    return 0


def console_summary(runs: Sequence[Run]) -> str:
    """What ``preftune report`` prints last: per run, its steps and held-out numbers before → after."""

    def pair(run: Run, key: str) -> str:
        sides = before_after(run)
        b = (sides.get("before") or {}).get(key)
        a = (sides.get("after") or {}).get(key)
        if a is None and key == "preference_accuracy" and run.eval:
            a = initial_metric(run.eval[-1], "rewards/accuracies")
        return f"{format_value(b)} → {format_value(a)}" if b is not None else format_value(a)

    header = [
        "run",
        "steps",
        "pref. accuracy (vs initial policy)",
        "likelihood accuracy (no reference)",
        "eval loss (vs method's reference)",
        "n",
    ]
    rows = []
    for run in runs:
        loss_before = run.eval[0].get("eval_loss") if run.eval and run.eval[0]["step"] == 0 else None
        loss_after = run.final("eval_loss")
        loss = (
            f"{format_value(loss_before)} → {format_value(loss_after)}"
            if loss_before is not None
            else (format_value(loss_after))
        )
        n = (before_after(run).get("after") or {}).get("n") or run.final("eval_n")
        rows.append(
            [
                run.label,
                format_value(run.last_step),
                pair(run, "preference_accuracy"),
                pair(run, "likelihood_accuracy"),
                loss,
                format_value(n),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "held-out results, before → after training:\n" + "\n".join(lines)
