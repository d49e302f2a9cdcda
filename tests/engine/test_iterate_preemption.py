"""``preftune iterate`` on a cluster: a preemption signal during sampling or a round's training keeps
what was done (the sampled batches, the step's checkpoint), exits 75 with one line and its lock
released, and the same command (``resume: auto``) ends with the uninterrupted run's samples and
weights; the run lock keeps beating while the run samples, so a second run is refused; a run killed
with ``kill -9`` is taken over by its own requeued command. One process, the signal sent by the run
to itself (fault_harness.py), and two processes under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preftune import cli, runlock
from preftune.iterate import loop
from preftune.preemption import EXIT_PREEMPTED

from .faults import HARNESS, run_harness, write_config
from .test_iterate import JUDGES, files, iterate_config, read_jsonl, weights  # noqa: F401 (fixture)

BATCHES = 3  # per round: 6 prompts, rounds.batch_size 2


@pytest.fixture(scope="module")
def reference(tiny_model_dir, files, tmp_path_factory):  # noqa: F811
    """The uninterrupted two-round run, and the config every test starts from (resume: auto)."""
    root = tmp_path_factory.mktemp("iterate-preempt")
    cfg = iterate_config(tiny_model_dir, files, root / "reference", JUDGES["verifier"](files))
    cfg["resume"] = "auto"
    result = loop.iterate(cfg)
    return root, cfg, result.output_dir


def harness(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return run_harness(list(args), timeout=timeout, env={"HF_HUB_OFFLINE": "1"})


def preempted_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if x.startswith("preftune iterate:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    return line


def assert_same_as(out: Path, reference: Path) -> None:
    for r in (1, 2):
        assert read_jsonl(out / f"round-{r}" / "samples.jsonl") == read_jsonl(
            reference / f"round-{r}" / "samples.jsonl"
        )
    wa, wb = weights(reference / "final"), weights(out / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_while_sampling_keeps_the_batches_and_the_same_command_finishes(reference, monkeypatch):
    """SIGTERM while round 2's second batch is drawn: that batch is finished and written, no other is
    drawn, the process exits 75 naming what is kept; the same command draws round 2's last batch
    only and ends with the uninterrupted run's samples and final weights."""
    import preftune.generation as generation

    root, cfg, whole = reference
    config, out = write_config(root, cfg, "sampling")
    done = harness("sigterm:sample-batch", str(BATCHES + 2), "iterate", str(config))
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    line = preempted_line(done.stderr)
    round2 = out / "round-2"
    assert line.startswith(
        f"preftune iterate: preempted in round 2 sampling: 2 of {BATCHES} batches drawn, kept in {round2}/"
    ), line
    assert "(SIGTERM; " in line and line.endswith("the same command resumes it"), line
    after = float(re.search(r"([\d.]+) s after the signal", line).group(1))
    assert after < 25, line  # within the default preemption_grace_s
    parts = [json.loads(x) for x in (round2 / "samples.part-0.jsonl").read_text().splitlines()]
    assert [p["batch"] for p in parts] == [0, 1]
    expected = read_jsonl(whole / "round-2" / "samples.jsonl")
    assert [t for p in parts for group in p["samples"] for t in group] == [
        r["completion"] for r in expected[: len(parts) * 2 * 3]
    ]  # the batches kept are the uninterrupted run's: 2 prompts x 3 samples each
    assert not (round2 / "samples.jsonl").exists() and not (out / ".lock").exists()

    real, drawn = generation.sample_batch, []
    monkeypatch.setattr(generation, "sample_batch", lambda *a, **k: drawn.append(1) or real(*a, **k))
    assert cli.main(["iterate", str(config)]) == 0  # the same command: resume: auto
    assert len(drawn) == 1  # round 2's last batch, nothing else
    assert_same_as(out, whole)
    assert not (out / ".lock").exists()


def test_sigterm_while_judging_keeps_the_chunks_judged_and_the_same_command_finishes(reference, monkeypatch):
    """SIGTERM while round 2's second chunk of samples is judged: that chunk's scores are written,
    no further chunk is judged, exit 75 naming what is kept; the same command judges round 2's last
    chunk only and ends with the uninterrupted run's samples, scores and final weights."""
    from preftune.iterate.judges import Verifier

    root, cfg, whole = reference
    config, out = write_config(root, cfg, "judging")
    # Verifier.score calls: round 0's evaluation, round 1's 3 chunks, round 1's evaluation, then round 2
    done = harness("sigterm:judge-chunk", str(1 + BATCHES + 1 + 2), "iterate", str(config))
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    line = preempted_line(done.stderr)
    round2 = out / "round-2"
    assert line.startswith(
        f"preftune iterate: preempted in round 2 judging: 2 of {BATCHES} chunks judged, kept in "
        f"{round2 / 'judged.part.jsonl'}"
    ), line
    parts = [json.loads(x) for x in (round2 / "judged.part.jsonl").read_text().splitlines()]
    assert [p["chunk"] for p in parts] == [0, 1]
    expected = read_jsonl(whole / "round-2" / "samples.jsonl")
    assert [s for p in parts for s in p["scores"]] == [r["score"] for r in expected[: 2 * 2 * 3]]
    assert not (round2 / "samples.jsonl").exists() and not (out / ".lock").exists()

    real, judged = Verifier.score, []
    monkeypatch.setattr(Verifier, "score", lambda self, *a: judged.append(len(a[1])) or real(self, *a))
    assert cli.main(["iterate", str(config)]) == 0  # the same command: resume: auto
    assert judged[0] == 2 * 3  # round 2's last chunk (2 prompts x 3 samples), then its evaluation
    assert len(judged) == 2
    assert read_jsonl(round2 / "samples.jsonl") == expected and not (round2 / "judged.part.jsonl").exists()
    assert_same_as(out, whole)


def test_sigterm_during_a_rounds_training_checkpoints_the_step(reference):
    """SIGTERM during round 1's first optimizer step: checkpoint-1 of round-1/train is written, exit
    75; the same command resumes that training and ends as the uninterrupted run."""
    root, cfg, whole = reference
    config, out = write_config(root, cfg, "training")
    done = harness("sigterm:after-update", "1", "iterate", str(config))
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    line = preempted_line(done.stderr)
    assert line.startswith("preftune iterate: preempted at step 1 (SIGTERM): checkpoint-1 written"), line
    assert "the same command resumes it" in line and str(out / "round-1" / "train" / "checkpoint-1") in line
    assert not (out / "round-1" / "trained.json").exists()
    assert not (out / ".lock").exists() and not (out / "round-1" / "train" / ".lock").exists()
    assert cli.main(["iterate", str(config)]) == 0
    assert_same_as(out, whole)


def test_resume_auto_refuses_another_iterate_run(reference, capsys):
    root, cfg, whole = reference
    config, out = write_config(root, cfg, "other")
    shutil.copytree(whole / "round-1", out / "round-1")
    shutil.copy(whole / "iterate.yaml", out / "iterate.yaml")
    capsys.readouterr()
    assert cli.main(["iterate", str(config), "rounds.temperature=0.7"]) == 2
    err = capsys.readouterr().err
    assert (
        f"resume: auto: {out} holds another iterate run (config differs: rounds.temperature: 1.5 -> 0.7)"
        in err
    )
    assert sorted(p.name for p in out.iterdir()) == ["iterate.yaml", "round-1"]  # nothing touched


def test_the_lock_beats_while_iterate_samples_and_a_killed_run_is_taken_over(reference, capsys):
    """A run held in round 1's sampling: its lock, made to look 1000 s old, is refreshed by the
    heartbeat, and a second `preftune iterate` on the directory is refused (exit 2, one line); then
    the run is killed with `kill -9` in round 2's sampling, and the same command takes its lock over
    and finishes as the uninterrupted run."""
    root, cfg, whole = reference
    config, out = write_config(root, cfg, "locked")
    go = root / "locked.go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", "FAULT_GO": str(go)}
    first = subprocess.Popen(
        [sys.executable, str(HARNESS), "wait:sample-batch", "2", "iterate", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        part = out / "round-1" / "samples.part-0.jsonl"
        deadline = time.time() + 300
        while not (part.is_file() and part.read_text()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # the first batch is written: the run now waits in the second one
        assert first.poll() is None and part.read_text(), (
            first.communicate()[1][-3000:] if first.poll() else ""
        )
        lock = out / ".lock"
        old = time.time() - 1000
        os.utime(lock, (old, old))
        deadline = time.time() + 60
        while runlock.heartbeat_age(lock) > 500 and time.time() < deadline:
            time.sleep(0.1)
        assert runlock.heartbeat_age(lock) < runlock.STALE_AFTER_S  # refreshed by the sampling process
        capsys.readouterr()
        assert cli.main(["iterate", str(config)]) == 2
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("preftune iterate:")]
        assert f"output_dir: {out} is in use by pid {first.pid}" in line, line
        assert json.loads(lock.read_text())["pid"] == first.pid  # not taken over
        go.touch()
        assert first.wait(timeout=400) == 0, first.communicate()[1][-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert_same_as(out, whole)

    config, out = write_config(root, cfg, "killed")
    done = harness("kill:sample-batch", str(BATCHES + 2), "iterate", str(config))
    assert done.returncode == -9, done.stderr[-3000:]
    assert (out / ".lock").is_file()  # kill -9: nothing released it
    capsys.readouterr()
    assert cli.main(["iterate", str(config)]) == 0  # the requeued job: the same command
    assert f"taking over the lock of {out} left by pid " in capsys.readouterr().out
    assert_same_as(out, whole)
