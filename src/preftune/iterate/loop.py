"""The rounds: sample -> judge -> pairs -> train (``preftune.train`` on ``round-N/pairs.jsonl``) ->
evaluate, each stage a function whose output is a file under ``output_dir/round-N/``:

=======================  ===========================================================================
``samples.part-R.jsonl``  sampled batches as they land (the resume point of sampling)
``judged.part.jsonl``     the judge's scores, a sampled batch at a time (the resume point of judging)
``samples.jsonl``         every sample with its score and the judge's details (sampling finished)
``pairs.jsonl``           the round's training data in preftune's format (+ ``pairs.json``: counts)
``train/``                the round's ``preftune train`` run (metrics, checkpoints, ``final/``)
``trained.json``          the round's trained model and its last metrics (training finished)
``eval.jsonl``            greedy answers to ``rounds.eval_prompts`` with their scores
``round.json``            the round's row of ``rounds.jsonl`` (the round is finished)
=======================  ===========================================================================

A rerun with ``resume=true`` skips every stage whose file exists: a finished round is never redone,
sampling draws and judging scores only the batches missing, training resumes from its newest
checkpoint. ``round-0/`` holds the held-out answers of the starting model. ``final/`` is the last
round's model. With ``resume: auto`` the same command starts a fresh directory and continues this
run's (its ``iterate.yaml`` agrees on every key that defines the run), and refuses another run's.

SIGTERM / SIGUSR1 (a scheduler's preemption, :mod:`preftune.preemption`) stop the run at the next
boundary: after the sampled batch or the judged chunk in progress (it is written), after the pairs,
after the training step in progress (checkpointed), after a round's evaluation; every rank stops
there, the lock is released and the process exits 75; the same command (``resume: auto`` or
``true``) goes on.

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

import yaml

from .. import autoresume, distributed, preemption, runlock
from ..config import ConfigError, TrainConfig, save_config
from .checks import Plan, check_rounds, load_iterate_config
from .prompts import round_slice
from .record import (
    CONFIG_FILE,
    JUDGED,
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
from .sampling import done_batches
from .stages import _device, evaluate_stage, judge_stage, judged_chunks, pairs_stage, sample_stage
from .training import train_stage


@dataclass
class IterateResult:
    output_dir: Path
    final_model_dir: Path | None
    rounds: list[dict]
    already_finished: bool = False


def _earlier(out: Path) -> list[Path]:
    return sorted(out.glob("round-*")) + [p for p in (out / ROUNDS_FILE, out / "final") if p.exists()]


def _check_auto(cfg: TrainConfig) -> None:
    """``resume: auto`` continues only this run: an ``iterate.yaml`` that differs on a key that defines
    the run, or outputs without one, are refused (one line, nothing touched)."""
    out = Path(cfg.output_dir)
    earlier = _earlier(out) if out.is_dir() else []
    if cfg.resume != autoresume.AUTO or not earlier:
        return
    refuse = (
        "pass resume=true to continue it anyway, overwrite_output_dir=true (with resume=false) or "
        "another output_dir"
    )
    try:
        saved = yaml.safe_load((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else None
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"resume: auto: {out} holds iterate outputs but no readable {CONFIG_FILE}; {refuse}"
        )
    diff = autoresume.differences(cfg, saved)
    if diff:
        shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise ConfigError(
            f"resume: auto: {out} holds another iterate run (config differs: {shown}); {refuse}"
        )


def _prepare_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    earlier = _earlier(out)
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
    _check_auto(cfg)
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

    def kept() -> str:  # what a preemption at this moment leaves to continue from
        return f"the finished stages and sampled batches are kept in {out}"

    try:
        # several processes: a failing rank exits at once naming its rank and stage, as in training;
        # a preemption signal stops every rank at the next stage boundary (preftune.preemption)
        with (
            preemption.watch(cfg, lambda: stage[0], command="iterate", kept=kept),
            distributed.exit_on_error(lambda: f"iterate {stage[0]}", explain=lambda e: _explain(e, out)),
        ):
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


def _explain(error: BaseException, out: Path) -> tuple[str, int] | None:
    from ..storage import stages_hint
    from ..trainer import explain

    return explain(error, None, stages_hint(out))  # as the CLI words it for iterate


def _boundary(cfg: TrainConfig, name: str, kept) -> None:
    """Every rank: wait for the others at the end of stage ``name``, then stop there on a preemption
    signal (any rank's); ``kept`` (a string or a callable) says what stays on disk."""
    distributed.barrier(f"iterate: {name}", cfg.dist_timeout_s)
    preemption.at_stage_end(kept if callable(kept) else lambda: kept, _device())


def _sampling_kept(cfg: TrainConfig, plan: Plan, r: int) -> str:
    rd = round_dir(cfg.output_dir, r)
    n = len(round_slice(plan.prompts, r, cfg.rounds.prompts_per_round))
    batches = (n + cfg.rounds.batch_size - 1) // cfg.rounds.batch_size
    drawn = len(done_batches(rd))
    return f"in round {r} sampling: {drawn} of {batches} batches drawn, kept in {rd}/samples.part-*.jsonl"


def _judging_kept(cfg: TrainConfig, plan: Plan, r: int) -> str:
    rd = round_dir(cfg.output_dir, r)
    if (rd / "samples.jsonl").is_file():
        return f"after round {r}'s judging ({rd / 'samples.jsonl'} written)"
    n = len(round_slice(plan.prompts, r, cfg.rounds.prompts_per_round))
    chunks = (n + cfg.rounds.batch_size - 1) // cfg.rounds.batch_size  # one per sampled batch
    judged = len(judged_chunks(rd / JUDGED))
    return f"in round {r} judging: {judged} of {chunks} chunks judged, kept in {rd / JUDGED}"


def _rounds(cfg: TrainConfig, plan: Plan, stage: list[str]) -> IterateResult:
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    out = Path(cfg.output_dir)
    count = cfg.rounds.count
    stage[0] = "start"
    distributed.barrier("iterate: start", cfg.dist_timeout_s)
    verifier = cfg.rounds.judge.kind == "verifier"
    if plan.eval_prompts and not (round_dir(out, 0) / "round.json").is_file():
        stage[0] = "round 0 evaluation"
        if main:
            say(f"round 0: answering {len(plan.eval_prompts)} held-out prompts with {cfg.model}")
            row = {"round": 0, "model": str(cfg.model), **evaluate_stage(cfg, plan, 0)}
            write_json(round_dir(out, 0) / "round.json", row)
            write_rounds(out)
        _boundary(cfg, "round 0 evaluation", f"after round 0's evaluation ({round_dir(out, 0)} written)")
    for r in range(1, count + 1):
        rd = round_dir(out, r)
        if (rd / "round.json").is_file():
            continue
        started = time.time()
        if not (rd / "samples.jsonl").is_file():
            stage[0] = f"round {r} sampling"
            sample_stage(cfg, plan, r, rank, world)  # stops after its batch in progress on a signal
            _boundary(cfg, f"round {r} sampling", lambda r=r: _sampling_kept(cfg, plan, r))
            stage[0] = f"round {r} judging"
            if main:
                judge_stage(cfg, plan, r)  # stops after its chunk in progress on a signal
            _boundary(cfg, f"round {r} judging", lambda r=r: _judging_kept(cfg, plan, r))
        records = read_jsonl(rd / "samples.jsonl")
        stage[0] = f"round {r} pairs"
        if main and not (rd / "pairs.jsonl").is_file():
            pairs_stage(cfg, r, records)
        _boundary(cfg, f"round {r} pairs", f"after round {r}'s pairs ({rd / 'pairs.jsonl'} written)")
        stats = json.loads((rd / "pairs.json").read_text())
        stage[0] = f"round {r} training"
        if (rd / "trained.json").is_file():
            trained = json.loads((rd / "trained.json").read_text())
        else:
            trained = train_stage(cfg, r, stats["pairs"])  # a signal: checkpoint after the step, exit 75
        _boundary(cfg, f"round {r} training", f"after round {r}'s training ({rd / 'trained.json'} written)")
        stage[0] = f"round {r} evaluation"
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
        _boundary(cfg, f"round {r} evaluation", f"after round {r} ({rd / 'round.json'} written)")
    stage[0] = "end"
    final = Path(model_of(cfg, count))
    if main:
        if final.is_dir() and final.resolve() != Path(cfg.model).resolve():
            _copy_final(final, out / "final")
            final = out / "final"
        write_rounds(out)
        say(f"{count} round(s) done in {out}: rounds.jsonl, final model {final}")
    distributed.barrier("iterate: end", cfg.dist_timeout_s)
    return IterateResult(out, out / "final" if (out / "final").is_dir() else None, rounds_rows(out))
