"""``preftune report ITERATE_DIR``: every numeric metric of ``rounds.jsonl`` plotted against the round
(one panel each, ``rounds.png``) and the rounds as a table (``rounds.md``), in the run directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .record import ROUNDS_FILE

SKIP = ("round", "seconds", "held_out_n", "prompts", "samples")


def is_iterate_run(path: str | Path) -> bool:
    return (Path(path) / ROUNDS_FILE).is_file()


def rounds_metrics(rows: list[dict]) -> list[str]:
    """The numeric keys of the rows, in first-seen order (bookkeeping keys left out)."""
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, None)
    return list(keys)


def write_rounds_report(run_dir: str | Path) -> list[Path]:
    """Write ``rounds.png`` and ``rounds.md`` into ``run_dir``; returns their paths."""
    from ..extras import require

    require("matplotlib", "plots")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run = Path(run_dir)
    rows = [json.loads(x) for x in (run / ROUNDS_FILE).read_text().splitlines() if x.strip()]
    keys = rounds_metrics(rows)
    if not keys:
        raise ValueError(f"{run / ROUNDS_FILE} has no metrics to plot")
    cols = min(3, len(keys))
    lines = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * lines), dpi=110, layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(lines, cols, i + 1)
        points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("round", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{run.name}: metrics per round (round 0 = before training)", fontsize=12)
    png = run / "rounds.png"
    fig.savefig(png)
    header = ["round", *keys]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["round"])]
        for k in keys:
            v = r.get(k)
            cells.append("—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        table.append("| " + " | ".join(cells) + " |")
    md = run / "rounds.md"
    md.write_text(
        f"# {run.name}: preftune iterate\n\nOne row per round of `{ROUNDS_FILE}` (round 0: the starting model's "
        "held-out answers).\n\n" + "\n".join(table) + "\n\n![metrics per round](rounds.png)\n"
    )
    return [png, md]


def main(argv: list[str]) -> int:
    """``preftune report ITERATE_DIR``."""
    import sys

    try:
        written = write_rounds_report(argv[0])
    except (FileNotFoundError, ValueError) as error:
        print(f"preftune report: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
