"""The training stage of a round: its ``preftune train`` config (the round's pairs, references,
seed and run folder ``round-N/train/``) and the call of :func:`preftune.train` on it, which every
rank makes; ``trained.json`` records the round's model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import distributed
from ..config import TrainConfig, to_dict
from .record import model_of, read_jsonl, round_dir, say, write_json


def round_references(cfg: TrainConfig, round_index: int) -> list[dict]:
    """References of round ``round_index``. ``policy`` is the round's starting model (the previous
    round's weights; with LoRA the base with adapters disabled, which is that model merged)."""
    initial = {"model": str(cfg.model), "chat_template": cfg.data.chat_template, "dtype": None}
    previous = {"model": "policy", "chat_template": None, "dtype": None}
    mode = cfg.rounds.reference
    if cfg.reference_free or mode == "previous" or (mode == "initial" and round_index == 1):
        return []  # the default reference: the round's starting model
    if mode == "initial" or round_index == 1:
        # `both` in round 1: the previous model is the initial one, and two identical references are
        # exactly DPO against it (the virtual reference of equal log-probs is that log-prob), as one is
        return [initial]
    return [initial, previous]


def round_train_config(cfg: TrainConfig, round_index: int) -> dict:
    """The ``preftune train`` config of round ``round_index`` (a dict, validated by ``preftune.train``)."""
    d = to_dict(cfg)
    rd = round_dir(cfg.output_dir, round_index)
    train_dir = rd / "train"
    d["model"] = model_of(cfg, round_index - 1)
    d["data"]["train"] = str(rd / "pairs.jsonl")
    d["data"]["train_split"] = "train"
    d["references"] = round_references(cfg, round_index)
    if len(d["references"]) == 1 and cfg.rounds.reference == "both":
        d["mrpo"]["allow_single_reference"] = True  # round 1 of `both` (round_references)
    d["output_dir"] = str(train_dir)
    d["seed"] = cfg.seed + round_index - 1
    has_checkpoints = train_dir.is_dir() and any(train_dir.glob("checkpoint-*"))
    d["resume"] = has_checkpoints
    d["overwrite_output_dir"] = not has_checkpoints  # the round's own folder: nothing else lives there
    d["generation_eval"] = False  # held-out answers are the loop's (rounds.eval_prompts)
    if cfg.lora.enabled:
        d["save_merged"] = True  # the next round starts from this round's merged weights
    return d


def _last_metrics(metrics: Path) -> dict[str, float]:
    """The last eval_* values and the last training loss of a run's metrics.jsonl."""
    out: dict[str, float] = {}
    if not metrics.is_file():
        return out
    for row in read_jsonl(metrics):
        out.update({k: v for k, v in row.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        if "loss" in row:
            out["train_loss"] = row["loss"]
    return out


def train_stage(cfg: TrainConfig, round_index: int, pair_count: int) -> dict:
    """Train the round on its pairs with ``preftune.train`` (every rank); writes ``trained.json``."""
    from .. import train

    rd = round_dir(cfg.output_dir, round_index)
    global_batch = cfg.batch_size * cfg.grad_accum * distributed.world_size()
    if pair_count < global_batch:  # preftune train refuses data smaller than one global batch
        why = f"{pair_count} usable training rows, fewer than one global batch ({global_batch})"
        say(f"round {round_index}: {why}; the model is carried to the next round unchanged")
        info = {"model": model_of(cfg, round_index - 1), "steps": 0, "skipped": why}
    else:
        say(f"round {round_index}: training on {pair_count} rows of {rd / 'pairs.jsonl'}")
        result = train(round_train_config(cfg, round_index))
        info = {
            "model": str(result.final_model_dir),
            "steps": result.steps,
            "metrics": _last_metrics(Path(result.metrics_path)),
        }
    if os.environ.get("RANK", "0") == "0":
        write_json(rd / "trained.json", info)
    return info
