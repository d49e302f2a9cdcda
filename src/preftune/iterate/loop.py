"""The rounds: sample -> judge -> pairs -> train (``preftune.train`` on ``round-N/pairs.jsonl``) ->
evaluate, each stage a function whose output is a file under ``output_dir/round-N/``:

=======================  ===========================================================================
``samples.part-R.jsonl``  sampled batches as they land (the resume point of sampling)
``samples.jsonl``         every sample with its score and the judge's details (sampling finished)
``pairs.jsonl``           the round's training data in preftune's format (+ ``pairs.json``: counts)
``train/``                the round's ``preftune train`` run (metrics, checkpoints, ``final/``)
``trained.json``          the round's trained model and its last metrics (training finished)
``eval.jsonl``            greedy answers to ``rounds.eval_prompts`` with their scores
``round.json``            the round's row of ``rounds.jsonl`` (the round is finished)
=======================  ===========================================================================

A rerun with ``resume=true`` skips every stage whose file exists: a finished round is never redone,
sampling draws only the batches missing, training resumes from its newest checkpoint. ``round-0/``
holds the held-out answers of the starting model. ``final/`` is the last round's model.

This module runs the rounds; the checks before any model loads are :mod:`.checks`, the stages
:mod:`.stages` (sample, judge, pairs, held-out evaluation) and :mod:`.training`, the files and the
round record :mod:`.record`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed, runlock
from ..config import ConfigError, TrainConfig, save_config
from .checks import Plan, check_rounds, load_iterate_config
from .record import (
    CONFIG_FILE,
    ROUNDS_FILE,
    model_of,
    read_jsonl,
    round_dir,
    rounds_rows,
    rounds_table,
    sample_stats,
    say,
    write_json,
    write_rounds,
)
from .stages import evaluate_stage, judge_stage, pairs_stage, sample_stage
from .training import train_stage


@dataclass
class IterateResult:
    output_dir: Path
    final_model_dir: Path | None
    rounds: list[dict]
    already_finished: bool = False


def _prepare_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    earlier = sorted(out.glob("round-*")) + [p for p in (out / ROUNDS_FILE, out / "final") if p.exists()]
    if earlier and not cfg.resume:
        if not cfg.overwrite_output_dir:
            names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise ConfigError(
                f"output_dir: {out} holds an earlier iterate run ({names}); pass resume=true to continue it "
                "or overwrite_output_dir=true to start over"
            )
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)


def _copy_final(source: Path, target: Path) -> None:
    """``target`` = a copy of ``source`` (hard links where the file system allows)."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def iterate(config, overrides: list[str] | None = None) -> IterateResult:
    """Run (or continue, with ``resume=true``) the rounds of ``config``; see the module docstring."""
    cfg = config if isinstance(config, TrainConfig) else load_iterate_config(config, overrides)
    plan = check_rounds(cfg)  # every config / data / judge error before any model loads
    if cfg.data.train:
        say(f"data.train ({cfg.data.train}) is not used: each round trains on its own round-N/pairs.jsonl")
    distributed.init_process_group(cfg.dist_timeout_s)
    out = Path(cfg.output_dir)
    count = cfg.rounds.count
    if (
        cfg.resume
        and (out / "final").is_dir()
        and all((round_dir(out, r) / "round.json").is_file() for r in range(1, count + 1))
    ):
        say(f"already finished: {count} round(s) in {out}, final model {out / 'final'}; nothing to do")
        return IterateResult(out, out / "final", rounds_rows(out), already_finished=True)
    stage = ["setup"]
    main = distributed.rank() == 0
    try:
        # several processes: a failing rank exits at once naming its rank and stage, as in training
        with distributed.exit_on_error(lambda: f"iterate {stage[0]}"):
            if main:
                out.mkdir(parents=True, exist_ok=True)
                try:
                    runlock.acquire(out, warn=say)  # one `preftune iterate` per output_dir
                except runlock.RunDirLockedError as e:
                    raise ConfigError(f"output_dir: {e}") from None
                _prepare_output_dir(cfg)
            return _rounds(cfg, plan, stage)
    finally:
        if main:
            runlock.release(out)


def _rounds(cfg: TrainConfig, plan: Plan, stage: list[str]) -> IterateResult:
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    out = Path(cfg.output_dir)
    count = cfg.rounds.count
    distributed.barrier("iterate: start", cfg.dist_timeout_s)
    verifier = cfg.rounds.judge.kind == "verifier"
    if main and plan.eval_prompts and not (round_dir(out, 0) / "round.json").is_file():
        say(f"round 0: answering {len(plan.eval_prompts)} held-out prompts with {cfg.model}")
        row = {"round": 0, "model": str(cfg.model), **evaluate_stage(cfg, plan, 0)}
        write_json(round_dir(out, 0) / "round.json", row)
        write_rounds(out)
    for r in range(1, count + 1):
        rd = round_dir(out, r)
        if (rd / "round.json").is_file():
            continue
        started = time.time()
        stage[0] = f"round {r}"
        if not (rd / "samples.jsonl").is_file():
            sample_stage(cfg, plan, r, rank, world)
            distributed.barrier(f"iterate: round {r} sampling", cfg.dist_timeout_s)
            if main:
                judge_stage(cfg, plan, r)
            distributed.barrier(f"iterate: round {r} judging", cfg.dist_timeout_s)
        records = read_jsonl(rd / "samples.jsonl")
        if main and not (rd / "pairs.jsonl").is_file():
            pairs_stage(cfg, r, records)
        distributed.barrier(f"iterate: round {r} pairs", cfg.dist_timeout_s)
        stats = json.loads((rd / "pairs.json").read_text())
        if (rd / "trained.json").is_file():
            trained = json.loads((rd / "trained.json").read_text())
        else:
            trained = train_stage(cfg, r, stats["pairs"])
        distributed.barrier(f"iterate: round {r} training", cfg.dist_timeout_s)
        if main:
            row = {
                "round": r,
                "model": trained["model"],
                **sample_stats(records, verifier),
                **stats,
                "train_steps": trained["steps"],
                **trained.get("metrics", {}),
                **evaluate_stage(cfg, plan, r),
                "seconds": round(time.time() - started, 1),
            }
            write_json(rd / "round.json", row)
            rows = write_rounds(out)
            say(f"round {r} of {count} done:\n{rounds_table(rows)}")
        distributed.barrier(f"iterate: round {r} evaluation", cfg.dist_timeout_s)
    final = Path(model_of(cfg, count))
    if main:
        if final.is_dir() and final.resolve() != Path(cfg.model).resolve():
            _copy_final(final, out / "final")
            final = out / "final"
        write_rounds(out)
        say(f"{count} round(s) done in {out}: rounds.jsonl, final model {final}")
    distributed.barrier("iterate: end", cfg.dist_timeout_s)
    return IterateResult(out, out / "final" if (out / "final").is_dir() else None, rounds_rows(out))
