"""``report.md``: one run's summary, final metrics, before/after and held-out tables and its plots,
or one page comparing several runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..yardsticks import ANSWERS, INITIAL, LOSS, METHOD, OWN, run_yardsticks, yardstick, yardstick_note
from .plots import ACCURACY_PLOT, BEFORE_AFTER_PLOT, LOSS_PLOT, MARGINS_PLOT, plot_runs
from .runs import (
    EVAL_PREFIX,
    FINAL_MODEL,
    REPORT_FILE,
    Run,
    as_float,
    before_after,
    beta_of,
    format_value,
    initial_metric,
    load_run,
    method_of,
    model_of,
    series,
)

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

# What each held-out number means, in one line (shown under `train`, `eval` and in report.md). What it
# is measured against -- its yardstick -- is said beside it (preftune.yardsticks).
METRIC_MEANINGS = {
    "eval_loss": "the method's loss on held-out pairs (lower is better)",
    "eval_rewards/accuracies": "pairs whose implicit reward ranks chosen first; ties count 1/2, "
    "0.5 = no preference (TRL's name)",
    "eval_rewards/accuracies_strict": "the same, ties counted 0 (TRL's number)",
    "eval_rewards/margins": "mean β·(reward chosen − reward rejected); > 0 prefers chosen (TRL's name)",
    "eval_rewards/chosen": "mean β·log π/π_ref of the chosen answers",
    "eval_rewards/rejected": "mean β·log π/π_ref of the rejected answers",
    "eval_initial/rewards/accuracies": "pairs ranked chosen-first by β·log π/π_initial "
    "(0.5 before training, every method alike)",
    "eval_initial/rewards/accuracies_strict": "the same, ties counted 0",
    "eval_initial/rewards/margins": "mean β·margin of log π/π_initial (0 before training)",
    "eval_primary/rewards/accuracies": "pairs ranked chosen-first by the reward vs reference 0 (earlier "
    "versions' name)",
    "eval_primary/rewards/accuracies_strict": "the same, ties counted 0",
    "eval_primary/rewards/margins": "mean β·margin vs reference 0 (earlier versions' name)",
    "eval_logps/accuracies": "pairs where the policy itself gives the chosen answer the higher log-prob",
    "eval_answer_match": "prompts whose greedy answer matches (see match mode)",
    "eval_answer_phrase": 'prompts whose greedy answer states "The answer is N" (numeric matching)',
    "eval_prompts_n": "prompts answered",
}

EVALUATION_METRICS = (
    ("preference_accuracy", "preference accuracy"),
    ("reward_margin", "reward margin"),
    ("likelihood_accuracy", "likelihood accuracy"),
    ("loss", "eval loss"),
    ("exact_match", "exact match"),
    ("n", "examples (n)"),
)
# What the before/after numbers are measured against (the demo's and metrics.jsonl's alike).
EVALUATION_YARDSTICKS = {
    "preference_accuracy": INITIAL,
    "reward_margin": INITIAL,
    "likelihood_accuracy": OWN,
    "loss": LOSS,
    "exact_match": ANSWERS,
    "answer_phrase": ANSWERS,
}


def _format_change(before: Any, after: Any) -> str:
    b, a = as_float(before), as_float(after)
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
        ("method", format_value(method_of(run.config))),
        ("model", format_value(model_of(run.config))),
        ("beta", format_value(beta_of(run.config))),
        ("steps", format_value(run.last_step)),
        ("epochs", format_value(run.final("epoch") if run.train else None)),
        ("train log lines / eval log lines", f"{len(run.train)} / {len(run.eval)}"),
    ]
    throughput = series(run.train, "tokens_per_second")[1]
    if throughput:
        median = sorted(throughput)[len(throughput) // 2]
        rows.append(("median tokens/s", format_value(median)))
    memory = series(run.train, "peak_memory_mb")[1]
    if memory:
        rows.append(("peak memory (MB)", format_value(max(memory))))
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
        "eval measured against",
    ]
    sticks = run_yardsticks(run.path)
    rows = [
        (
            f"`{name}`",
            format_value(run.final(name)),
            format_value(run.final(EVAL_PREFIX + name)),
            yardstick(EVAL_PREFIX + name, sticks) if run.final(EVAL_PREFIX + name) is not None else "",
        )
        for name in names
    ]
    note = "Latest logged value of each metric; held-out ones with what they are measured against."
    extra = yardstick_note(sticks) if any(row[3] for row in rows) else None
    note += f"\n\n{extra[0].upper()}{extra[1:]}." if extra else ""
    return f"## Final metrics\n\n{note}\n\n" + _table(header, rows)


def _before_after_section(run: Run) -> str | None:
    evaluation = before_after(run)
    if not evaluation:
        return None
    before = evaluation.get("before") or {}
    after = evaluation.get("after") or {}
    sticks = run_yardsticks(run.path)
    rows = []
    titles = dict(EVALUATION_METRICS)
    extra = sorted((set(before) | set(after)) - set(titles))
    for key in [*titles, *extra]:
        if before.get(key) is None and after.get(key) is None:
            continue
        change = _format_change(before.get(key), after.get(key)) if key != "n" else ""
        family = EVALUATION_YARDSTICKS.get(key)
        stick = sticks.get(family, "") if family else ""
        rows.append(
            (titles.get(key, key), format_value(before.get(key)), format_value(after.get(key)), change, stick)
        )
    header = ["metric", "before", "after", "change", "measured against"]
    return "## Before vs after training\n\n" + _table(header, rows)


def _held_out_section(run: Run) -> str | None:
    results = run.held_out_results
    if not results:
        return None
    keys = list(dict.fromkeys(k for r in results for k in r["metrics"] if k != "eval_n"))
    sticks = run_yardsticks(run.path)
    header = ["metric", *(f"`{r['name']}`" for r in results), "measured against", "meaning"]
    rows = [["model evaluated", *(_evaluated_cell(r) for r in results), "", ""]]
    rows += [["n (held-out pairs)", *(format_value(r.get("n")) for r in results), "", ""]]
    rows += [["data", *(format_value(r.get("data")) for r in results), "", ""]]
    for k in keys:
        cells = [_with_before(r, k) for r in results]
        rows.append([f"`{k}`", *cells, yardstick(k, sticks), METRIC_MEANINGS.get(k, "")])
    note = (
        "Written by `preftune eval` and `generation_eval`, one column per call (oldest first). Only "
        "evaluations of the run's final model are its result; answers show the initial model's "
        "score before the arrow where `preftune eval --prompts` measured it."
    )
    return f"## Held-out evaluation\n\n{note}\n\n" + _table(header, rows)


def _evaluated_cell(record: dict) -> str:
    """The model an eval record evaluated: the final model, or (bold) which other one."""
    what = record.get("evaluated")
    if what == FINAL_MODEL:
        return "final model"
    model = record.get("checkpoint") or record.get("model")
    return f"**{format_value(what)}** (`{format_value(model)}`), not the final model"


def _with_before(record: dict, key: str) -> str:
    """A record's value of ``key``, as ``before → after`` when it holds the initial model's too."""
    after = format_value(record["metrics"].get(key))
    before = (record.get("before") or {}).get("metrics") or {}
    if isinstance(before, dict) and key in before and key != "eval_prompts_n":  # the same prompts
        return f"{format_value(before[key])} → {after}"
    return after


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


def report_with_plots(
    run_dir: str | Path, extra_sections: dict[str, str] | None, label: str | None, plots: bool
) -> tuple[Path, list[Path]]:
    """:func:`write_report`, returning the plots it links as well (``preftune report`` lists them)."""
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
    return report_with_plots(run_dir, extra_sections, label, plots)[0]


def _initial_accuracy(run: Run) -> Any:
    return initial_metric(run.eval[-1], "rewards/accuracies") if run.eval else None


def write_comparison(runs: Sequence[Run], out_dir: str | Path, plot_names: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.md``: one row of final metrics per run, and links to ``plot_names``.

    Held-out numbers say what they are measured against; a run's ``preftune eval`` result is the
    latest evaluation of its own final model (evaluations of checkpoints or other models are listed
    apart, never as the run's result)."""
    sticks = {id(run): run_yardsticks(run.path) for run in runs}
    columns = [
        ("method", lambda r: format_value(method_of(r.config))),
        ("model", lambda r: format_value(model_of(r.config))),
        ("steps", lambda r: format_value(r.last_step)),
        ("loss", lambda r: format_value(r.final("loss"))),
        ("eval loss", lambda r: format_value(r.final("eval_loss"))),
        ("margin", lambda r: format_value(r.final("rewards/margins"))),
        ("eval margin", lambda r: format_value(r.final("eval_rewards/margins"))),
        ("accuracy", lambda r: format_value(r.final("rewards/accuracies"))),
        ("eval accuracy", lambda r: format_value(r.final("eval_rewards/accuracies"))),
        ("eval accuracy vs the initial policy", lambda r: format_value(_initial_accuracy(r))),
        ("the method's reference", lambda r: sticks[id(r)].get(METHOD, "")),
    ]
    rows = [[run.label.replace("|", "\\|")] + [cell(run) for _, cell in columns] for run in runs]
    sections = [
        "# Run comparison",
        "Final logged values (train / eval). `loss`, `margin`, `accuracy` and their `eval` columns (TRL's "
        "`rewards/*`) are measured against each method's own reference (last column), so they compare "
        "only between runs with the same reference; `eval accuracy vs the initial policy` "
        "(`eval_initial/rewards/accuracies`) compares across methods.\n\n"
        + _table(["run", *(name for name, _ in columns)], rows),
    ]
    evaluated = [run for run in runs if before_after(run)]
    if evaluated:
        eval_rows = []
        for run in evaluated:
            before = before_after(run).get("before") or {}
            after = before_after(run).get("after") or {}
            cells = [run.label.replace("|", "\\|")]
            for key in ("preference_accuracy", "likelihood_accuracy", "exact_match"):
                cells += [format_value(before.get(key)), format_value(after.get(key))]
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
        note = (
            "Preference accuracy against the initial policy; likelihood accuracy against no reference "
            "(the policy's own log-probs); exact match of greedy answers."
        )
        sections.append(f"## Before vs after training\n\n{note}\n\n" + _table(header, eval_rows))
    held_out = [run for run in runs if run.held_out]
    if held_out:
        keys = list(dict.fromkeys(k for run in held_out for k in run.held_out))
        rows = [
            [run.label.replace("|", "\\|"), f"`{run.final_results[-1]['name']}`"]
            + [_with_before(run.final_results[-1], k) for k in keys]
            for run in held_out
        ]
        against = [
            "measured against",
            "",
            *(" / ".join(dict.fromkeys(yardstick(k, sticks[id(run)]) for run in held_out)) for k in keys),
        ]
        note = "The latest `preftune eval` of each run's final model."
        sections.append(
            f"## Held-out evaluation (`preftune eval`)\n\n{note}\n\n"
            + _table(["run", "file", *(f"`{k}`" for k in keys)], [*rows, against])
        )
    others = [(run, r) for run in runs for r in run.held_out_results if r.get("evaluated") != FINAL_MODEL]
    if others:
        lines = [f"- {run.label}: `{r['name']}` evaluated {_evaluated_cell(r)}" for run, r in others]
        sections.append(
            "## Evaluations of other models\n\nNot any run's result: they evaluated a checkpoint or another "
            "model (`preftune eval RUN --checkpoint ...`).\n\n" + "\n".join(lines)
        )
    sections.append(_plots_section(plot_names))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
