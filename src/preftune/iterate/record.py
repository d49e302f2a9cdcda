"""What a ``preftune iterate`` run keeps on disk, and the round record: ``round-N/`` folders, the
JSON/JSONL files the stages write (atomically: a kill leaves the old file or the new one), each
round's row of ``rounds.jsonl`` and the console table of the rounds so far.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import TrainConfig

ROUNDS_FILE = "rounds.jsonl"
CONFIG_FILE = "iterate.yaml"
JUDGED = "judged.part.jsonl"  # round-N/: the scores of the chunks judged so far (the resume point)


def say(msg: str) -> None:
    from ..metrics import log

    if os.environ.get("RANK", "0") == "0":
        log(msg)


def round_dir(output_dir: str | Path, round_index: int) -> Path:
    return Path(output_dir) / f"round-{round_index}"


def model_of(cfg: TrainConfig, round_index: int) -> str:
    """The model after round ``round_index`` (0: the starting model)."""
    if round_index == 0:
        return str(cfg.model)
    return json.loads((round_dir(cfg.output_dir, round_index) / "trained.json").read_text())["model"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rounds_rows(output_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(output_dir).glob("round-*/round.json"), key=lambda p: int(p.parent.name[6:])):
        rows.append(json.loads(path.read_text()))
    return rows


def write_rounds(output_dir: Path) -> list[dict]:
    rows = rounds_rows(output_dir)
    write_jsonl(Path(output_dir) / ROUNDS_FILE, rows)
    return rows


TABLE_KEYS = (
    ("score_mean", "score"),
    ("best_score_mean", "best of k"),
    ("usable_fraction", "usable"),
    ("pairs", "pairs"),
    ("skipped_tied", "tied"),
    ("margin_mean", "margin"),
    ("train_steps", "steps"),
    ("held_out_score", "held-out"),
)


def rounds_table(rows: list[dict]) -> str:
    """The console table of the rounds so far: one line per round."""
    keys = [(k, label) for k, label in TABLE_KEYS if any(k in r for r in rows)]
    header = ["round", *[label for _, label in keys]]
    body = []
    for r in rows:
        cells = [str(r["round"])]
        for k, _ in keys:
            v = r.get(k)
            cells.append("—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *body])


def grouped(records: list[dict]) -> list[list[dict]]:
    """Sample records grouped per prompt, in order."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["prompt_index"], []).append(r)
    return list(groups.values())


def sample_stats(records: list[dict], verifier: bool) -> dict[str, float]:
    groups = grouped(records)
    scores = [r["score"] for r in records]
    out = {
        "prompts": len(groups),
        "samples": len(records),
        "score_mean": sum(scores) / len(scores),
        "score_max": max(scores),
        "best_score_mean": sum(max(r["score"] for r in g) for g in groups) / len(groups),
    }
    if verifier:
        k = max(len(g) for g in groups)
        out["pass_at_1"] = out["score_mean"]
        out[f"pass_at_{k}"] = sum(any(r["score"] >= 1 for r in g) for g in groups) / len(groups)
    return out
