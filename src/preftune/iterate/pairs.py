"""Pairs from judged samples, in preftune's data format (``pairs.jsonl`` is a ``data.train`` file).

``best_worst``: per prompt the highest- against the lowest-scored sample (first of each on ties);
prompts whose samples all tie are skipped and counted. ``all``: every (higher, lower) pair of a
prompt, largest margin first, at most ``max_pairs_per_prompt``. ``unpaired``: every sample, labelled
desirable when its score is at least ``threshold``. A pair whose two texts are equal is never made.
"""

from __future__ import annotations

from typing import Any


def _completion(prompt: Any, text: str) -> Any:
    """A completion in the prompt's form: chat messages answer with an assistant message."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def build_pairs(
    groups: list[list[dict]],
    mode: str,
    *,
    max_pairs_per_prompt: int = 4,
    threshold: float = 0.5,
    columns=None,
) -> tuple[list[dict], dict[str, float]]:
    """(rows of pairs.jsonl, statistics) from ``groups``: per prompt its sample records
    (``prompt``, ``completion``, ``score``, ``prompt_index``, ``sample``).

    Statistics: ``pairs`` (rows), ``prompts``, ``usable_prompts`` (that gave a pair; for unpaired:
    with both a desirable and an undesirable sample), ``skipped_tied`` (all scores equal), ``usable_fraction``
    and ``margin_mean`` (mean chosen - rejected score; for unpaired: mean desirable - undesirable)."""
    names = {
        "prompt": getattr(columns, "prompt", "prompt"),
        "chosen": getattr(columns, "chosen", "chosen"),
        "rejected": getattr(columns, "rejected", "rejected"),
        "completion": getattr(columns, "completion", "completion"),
        "label": getattr(columns, "label", "label"),
    }
    rows: list[dict] = []
    margins: list[float] = []
    usable = tied = 0
    for group in groups:
        scores = [s["score"] for s in group]
        if max(scores) == min(scores):
            tied += 1
        if mode == "unpaired":
            good = [s for s in group if s["score"] >= threshold]
            bad = [s for s in group if s["score"] < threshold]
            if good and bad:
                usable += 1
                margins.append(
                    sum(s["score"] for s in good) / len(good) - sum(s["score"] for s in bad) / len(bad)
                )
            for s in group:
                rows.append(
                    {
                        names["prompt"]: s["prompt"],
                        names["completion"]: _completion(s["prompt"], s["completion"]),
                        names["label"]: s["score"] >= threshold,
                        "score": s["score"],
                        "prompt_index": s["prompt_index"],
                        "sample": s["sample"],
                    }
                )
            continue
        candidates = []
        for i, hi in enumerate(group):
            for j, lo in enumerate(group):
                if hi["score"] > lo["score"] and hi["completion"] != lo["completion"]:
                    candidates.append((hi["score"] - lo["score"], i, j))
        if not candidates:
            continue
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # largest margin first, then sample order
        chosen = candidates[: 1 if mode == "best_worst" else max_pairs_per_prompt]
        usable += 1
        for margin, i, j in chosen:
            hi, lo = group[i], group[j]
            margins.append(margin)
            rows.append(
                {
                    names["prompt"]: hi["prompt"],
                    names["chosen"]: _completion(hi["prompt"], hi["completion"]),
                    names["rejected"]: _completion(hi["prompt"], lo["completion"]),
                    "chosen_score": hi["score"],
                    "rejected_score": lo["score"],
                    "prompt_index": hi["prompt_index"],
                    "chosen_sample": hi["sample"],
                    "rejected_sample": lo["sample"],
                }
            )
    n = len(groups)
    stats = {
        "pairs": len(rows),
        "prompts": n,
        "usable_prompts": usable,
        "skipped_tied": tied if mode != "unpaired" else 0,
        "tied_prompts": tied,
        "usable_fraction": usable / n if n else 0.0,
        "margin_mean": sum(margins) / len(margins) if margins else None,
    }
    return rows, stats
