"""Fault injection: every outcome is an exact resume or a one-line error, and nothing is lost.

- kill -9 at seeded random points of a training subprocess (inside a step, after a metrics row, in
  the middle of a checkpoint, between a complete checkpoint and its rename, while writing the final
  model), then ``resume=true``: the loss trajectory and final weights equal an uninterrupted run's,
  and metrics.jsonl holds each step once;
- damaged checkpoints (truncated, flipped or deleted files) and reference caches: resume falls back to
  the newest intact checkpoint (or recomputes the cache) and ends exactly where an uninterrupted run
  does; with no intact checkpoint, a one-line error;
- two trainers on one run directory: the second is refused at once; a dead one's lock is taken over.

The default suite runs a few kills and the cheaper corruptions; ``-m slow`` runs the whole sweep
(scripts/fault_injection.py tallies it into the table of issue 14).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from preftune import cli
from preftune.trainer import train

from .faults import assert_each_step_once, assert_same_run, checkpointed_run, start_harness

KILL_STEPS = 6


# ------------------------------------------------------------------------------------------ kill -9


@pytest.fixture(scope="module")
def kill_setup(tiny_model_dir, pair_files, tmp_path_factory):
    """The kill sweep's config (6 steps, checkpoints every 2, eval every 3) and its uninterrupted run."""
    root = tmp_path_factory.mktemp("kills")
    cfg, reference = checkpointed_run(root, tiny_model_dir, pair_files, KILL_STEPS, eval_steps=3)
    return root, cfg, reference


# how often a 6-step run passes each point (checkpoints 2 and 4 and the final one, 3 state files each)
POINT_CALLS = {
    "after-update": 6,
    "after-metrics": 8,
    "mid-checkpoint": 9,
    "before-rename": 3,
    "final-save": 1,
}


def kill_point(seed: int) -> tuple[str, int]:
    rng = random.Random(seed)
    point = rng.choice(sorted(POINT_CALLS))
    return point, rng.randint(1, POINT_CALLS[point])


DEFAULT_KILLS = [("after-metrics", 2)]  # before the first checkpoint: its rows must not repeat
SWEEP = [kill_point(seed) for seed in range(15)]


def run_kill_case(kill_setup, point: str, n: int, name: str) -> None:
    root, cfg, reference = kill_setup
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    proc = start_harness(point, n, config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err.decode()[-2000:]
    assert (out / ".lock").exists()  # kill -9 leaves the lock behind: the resume must take it over
    code = cli.main(["train", str(config), "resume=true"])
    assert code == 0
    assert_same_run(out, reference)
    assert_each_step_once(out, KILL_STEPS, eval_steps=(0, 3, KILL_STEPS))  # 0: the evaluation before training
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("point, n", DEFAULT_KILLS, ids=[f"{p}-{n}" for p, n in DEFAULT_KILLS])
def test_kill_then_resume_is_exact(kill_setup, point, n):
    run_kill_case(kill_setup, point, n, f"kill-{point}-{n}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed", range(len(SWEEP)), ids=[f"seed{s}-{p}-{n}" for s, (p, n) in enumerate(SWEEP)]
)
def test_kill_sweep(kill_setup, seed):
    point, n = SWEEP[seed]
    run_kill_case(kill_setup, point, n, f"sweep-{seed}")


# ---------------------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # in the tensor data, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path) -> None:
    path.write_text(path.read_text().replace("1", "2", 1))


def _damage(name: str, run: Path, cache: Path) -> None:
    c3 = run / "checkpoint-3"
    model = c3 / "model" / "model.safetensors"
    actions = {
        "truncate-weights": lambda: _truncate(model),
        "flip-weights": lambda: _flip(model),
        "delete-model-dir": lambda: shutil.rmtree(c3 / "model"),
        # the run's tokenizer/ (checkpoints carry none): not read to resume, written again by it
        "flip-tokenizer": lambda: _edit_json(run / "tokenizer" / "tokenizer_config.json"),
        "truncate-optimizer": lambda: _truncate(c3 / "optimizer.safetensors"),
        "flip-optimizer": lambda: _flip(c3 / "optimizer.safetensors"),
        "edit-optimizer-json": lambda: _edit_json(c3 / "optimizer.json"),
        "edit-scheduler-json": lambda: _edit_json(c3 / "scheduler.json"),
        "delete-rng-tensors": lambda: (c3 / "rng.safetensors").unlink(),
        "delete-rng-json": lambda: (c3 / "rng.json").unlink(),
        "delete-trainer-state": lambda: (c3 / "trainer_state.json").unlink(),
        "delete-manifest": lambda: (c3 / "manifest.json").unlink(),
        "garbage-manifest": lambda: (c3 / "manifest.json").write_text("{not json"),
        "leftover-tmp-and-old": lambda: (
            shutil.copytree(c3, run / "checkpoint-4.tmp"),
            _truncate(run / "checkpoint-4.tmp" / "model" / "model.safetensors"),
            shutil.copytree(run / "checkpoint-2", run / "checkpoint-3.old"),
        ),
        "partial-metrics-line": lambda: open(run / "metrics.jsonl", "a").write('{"step": 4, "loss": 0.6'),
        "flip-reference-cache": lambda: [_flip(p) for p in cache.rglob("*.safetensors")],
        "truncate-reference-cache": lambda: [_truncate(p) for p in cache.rglob("*.safetensors")],
    }
    actions[name]()


# what a damaged checkpoint-3 falls back to; the others resume from checkpoint-3 itself
INTACT_CHECKPOINT_3 = {
    "flip-tokenizer",
    "leftover-tmp-and-old",
    "partial-metrics-line",
    "flip-reference-cache",
    "truncate-reference-cache",
}
CORRUPTIONS = [
    "truncate-weights",
    "flip-weights",
    "delete-model-dir",
    "flip-tokenizer",
    "truncate-optimizer",
    "flip-optimizer",
    "edit-optimizer-json",
    "edit-scheduler-json",
    "delete-rng-tensors",
    "delete-rng-json",
    "delete-trainer-state",
    "delete-manifest",
    "garbage-manifest",
    "leftover-tmp-and-old",
    "partial-metrics-line",
    "flip-reference-cache",
    "truncate-reference-cache",
]
DEFAULT_CORRUPTIONS = {"truncate-weights", "flip-weights", "flip-reference-cache"}


@pytest.fixture(scope="module")
def corruption_setup(tiny_model_dir, pair_files, tmp_path_factory):
    """A 3-step run with checkpoints 2 and 3 (to be damaged, then resumed to step 4), and the
    uninterrupted 4-step run it must end up equal to."""
    root = tmp_path_factory.mktemp("corrupt")
    cfg = {
        "model": str(tiny_model_dir),
        "data": {"train": pair_files[0]},
        "batch_size": 4,
        "save_steps": 1,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "progress": False,
        "report_to": [],
    }
    reference = train(
        {**cfg, "max_steps": 4, "output_dir": str(root / "reference"), "cache_dir": str(root / "c0")}
    )
    base = root / "base"
    train({**cfg, "max_steps": 3, "output_dir": str(base), "cache_dir": str(root / "cache")})
    shutil.rmtree(base / "final")  # 3 of 4 steps: a run to continue, not a finished one
    return root, cfg, base, reference.output_dir


@pytest.mark.parametrize(
    "case",
    [c if c in DEFAULT_CORRUPTIONS else pytest.param(c, marks=pytest.mark.slow) for c in CORRUPTIONS],
)
def test_damage_is_detected_and_resume_is_exact(corruption_setup, case, tmp_path, capsys):
    root, cfg, base, reference = corruption_setup
    run, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(base, run)
    shutil.copytree(root / "cache", cache)
    _damage(case, run, cache)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {**cfg, "max_steps": 4, "output_dir": str(run), "cache_dir": str(cache), "resume": True}
        )
    )
    capsys.readouterr()
    assert cli.main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    if case in INTACT_CHECKPOINT_3:
        assert "resumed from" in out and "checkpoint-3 at step 3" in out
    else:
        skip = [line for line in out.splitlines() if "skipping damaged" in line]
        assert len(skip) == 1 and "checkpoint-3 (" in skip[0] and "resuming from checkpoint-2" in skip[0], out
    if "cache" in case:
        assert "recomput" in out.lower(), out
    assert_same_run(run, reference)
    assert_each_step_once(run, 4)


def test_no_intact_checkpoint_is_one_line_and_keeps_everything(corruption_setup, tmp_path, capsys):
    root, cfg, base, _ = corruption_setup
    run = tmp_path / "run"
    shutil.copytree(base, run)
    _truncate(run / "checkpoint-3" / "model" / "model.safetensors")
    _flip(run / "checkpoint-2" / "optimizer.safetensors")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {**cfg, "max_steps": 4, "output_dir": str(run), "cache_dir": str(root / "cache"), "resume": True}
        )
    )
    capsys.readouterr()
    assert cli.main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no intact checkpoint" in err, err
    assert "checkpoint-3 (model/model.safetensors has" in err and "checkpoint-2 (optimizer.safetensors" in err
    assert "overwrite_output_dir=true" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------- concurrency


def test_a_second_trainer_on_a_busy_directory_is_refused_at_once(kill_setup, tmp_path, capsys):
    root, cfg, reference = kill_setup
    out, go = tmp_path / "run", tmp_path / "go"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    first = start_harness("wait:after-metrics", 1, config, env={"FAULT_GO": str(go)})
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            time.sleep(0.1)
        capsys.readouterr()
        started = time.perf_counter()
        # even overwrite_output_dir must not touch a directory another live process trains into
        code = cli.main(["train", str(config), "overwrite_output_dir=true"])
        took = time.perf_counter() - started
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert f"in use by pid {first.pid}" in err and str(out) in err
        assert took < 10  # refused before any model loads
        go.write_text("go")
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err.decode()[-2000:]
    finally:
        go.write_text("go")
        if first.poll() is None:
            first.kill()
            first.wait()
    assert_same_run(out, reference)
    assert_each_step_once(out, KILL_STEPS, eval_steps=(0, 3, KILL_STEPS))  # 0: the evaluation before training
    assert not (out / ".lock").exists()


def test_a_dead_trainers_lock_is_taken_over_with_a_warning(base_config, tmp_path, capsys):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(output_dir=str(out))))
    capsys.readouterr()
    assert cli.main(["train", str(config)]) == 0
    assert f"taking over the lock of {out} left by pid {dead.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists()
    assert_each_step_once(out, 2, eval_steps=(0, 2))  # 0: the evaluation before training
