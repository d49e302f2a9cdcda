"""Preemption (SIGTERM / SIGUSR1) and ``resume: auto``: a preempted run loses at most the step it was
in, says so in one line, exits 75 with its lock released, and the same command finishes it exactly.

One process: the signal sent by the run to itself at a chosen point (fault_harness.py). Two processes
(DDP and FSDP over gloo): real ``torchrun`` launchers; rank 0 sends SIGTERM to its torchrun, which
forwards it to every rank, as SLURM and Kubernetes reach the workers through the launcher.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from preftune import cli
from preftune.preemption import EXIT_PREEMPTED

from .faults import (
    HARNESS,
    assert_each_step_once,
    assert_same_run,
    checkpointed_run,
    run_harness,
    write_config,
)

STEPS = 6


@pytest.fixture(scope="module")
def setup(tiny_model_dir, pair_files, tmp_path_factory):
    """A 6-step run checkpointing every 2 steps, and its uninterrupted result."""
    root = tmp_path_factory.mktemp("preempt")
    cfg, reference = checkpointed_run(root, tiny_model_dir, pair_files, STEPS, resume="auto")
    return root, cfg, reference


def lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("preftune train:")]


def test_sigterm_checkpoints_the_step_reached_and_the_same_command_finishes_it(setup):
    root, cfg, reference = setup
    config, out = write_config(root, cfg, "sigterm")
    started = time.monotonic()
    done = run_harness(["sigterm:after-update", "3", "train", str(config)])  # during step 3
    took = time.monotonic() - started
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    (line,) = lines(done.stderr)
    assert line.startswith("preftune train: preempted at step 3 (SIGTERM): checkpoint-3 written in "), line
    assert "the same command resumes it" in line and "Traceback" not in done.stderr
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    assert not (out / ".lock").exists() and not (out / "final").exists()
    grace = float(re.search(r"\(([\d.]+) s after the signal", line).group(1))
    assert grace < 25, line  # the default preemption_grace_s
    print(f"signal -> checkpoint-3 written: {grace:.2f} s; whole run {took:.1f} s")
    assert cli.main(["train", str(config)]) == 0  # the same command, resume: auto
    assert_same_run(out, reference)
    assert_each_step_once(out, STEPS, eval_steps=(0, STEPS))
    assert not (out / ".lock").exists()


def test_sigusr1_during_a_checkpoint_write_completes_that_checkpoint(setup):
    """The notice arrives while checkpoint-2 is half written: it is finished, nothing else is saved."""
    root, cfg, reference = setup
    config, out = write_config(root, cfg, "mid-write")
    done = run_harness(["sigusr1:mid-checkpoint", "2", "train", str(config)])  # optimizer saved, not the rest
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    (line,) = lines(done.stderr)
    assert "preempted at step 2 (SIGUSR1): checkpoint-2 written" in line, line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    from preftune.checkpointing import verify_checkpoint

    assert verify_checkpoint(out / "checkpoint-2") is None
    assert cli.main(["train", str(config)]) == 0
    assert_same_run(out, reference)


def test_a_checkpoint_past_the_grace_budget_names_the_complete_one_that_remains(setup):
    """preemption_grace_s=1 and a checkpoint write that stalls 4 s: the process exits after ~1 s,
    naming checkpoint-2; the half-written checkpoint-4.tmp is never resumed from."""
    root, cfg, reference = setup
    config, out = write_config(root, cfg, "past-grace", preemption_grace_s=1)
    started = time.monotonic()
    done = run_harness(
        ["sigterm-stall:mid-checkpoint", "4", "train", str(config)]
    )  # checkpoint-4's first file
    took = time.monotonic() - started
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    (line,) = lines(done.stderr)
    assert "did not finish within preemption_grace_s=1" in line, line
    assert f"{out / 'checkpoint-2'} is the last complete checkpoint; the same command resumes it" in line
    assert (out / "checkpoint-4.tmp").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / ".lock").exists()
    after = float(re.search(r"exiting ([\d.]+) s after the signal", line).group(1))
    assert 1 <= after < 2, line
    print(f"past the grace budget: exit {after:.2f} s after the signal; whole run {took:.1f} s")
    assert cli.main(["train", str(config)]) == 0
    assert_same_run(out, reference)
    assert not (out / "checkpoint-4.tmp").exists()


def test_without_resume_auto_the_line_says_how_to_continue(setup):
    root, cfg, _ = setup
    config, out = write_config(root, cfg, "no-auto", resume=False)
    done = run_harness(["sigterm:after-update", "1", "train", str(config)])
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    (line,) = lines(done.stderr)
    assert "preempted at step 1 (SIGTERM): checkpoint-1 written" in line
    assert "rerun with resume=true to continue" in line, line


def test_a_signal_before_the_first_step_exits_at_once(setup):
    root, cfg, _ = setup
    config, out = write_config(root, cfg, "in-setup")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = (
        "import os, signal, sys\n"
        "import preftune.prepare_run as t\n"
        "real = t.load_policy\n"
        "def slow(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    import time; time.sleep(30)\n"
        "t.load_policy = slow\n"
        "from preftune.cli import main\n"
        f"sys.exit(main(['train', {str(config)!r}]))\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    took = time.monotonic() - started
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    (line,) = lines(done.stderr)
    assert "before the first step: nothing new to save; no complete checkpoint" in line, line
    assert took < 25 and not (out / ".lock").exists()


# ------------------------------------------------------------------------- two processes, torchrun


def torchrun(script: list[str], port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port), *script,
    ]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resume_auto_finishes(setup, parallelism):
    """SIGTERM reaches torchrun (as from SLURM or Kubernetes), torchrun forwards it to both ranks:
    they stop after the same step, checkpoint it (DCP under FSDP), exit 75, one line from rank 0;
    the same torchrun command then ends with the one-process uninterrupted run's weights."""
    from .conftest import free_port, launch_processes, process_logs
    from .test_fsdp_trainer import assert_same_weights, final_weights

    root, cfg, reference = setup
    per_rank = {"ddp": {"batch_size": 2}, "fsdp": {"batch_size": 1, "grad_accum": 2}}[parallelism]
    config, out = write_config(
        root, {**cfg, **per_rank, "parallelism": parallelism, "precision": "fp32"}, f"torchrun-{parallelism}"
    )
    codes_dir = root / f"codes-{parallelism}"
    shutil.rmtree(codes_dir, ignore_errors=True)
    codes_dir.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(sys.path),
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        FAULT_EXIT_DIR=str(codes_dir),
    )
    name = f"preempt-{parallelism}"
    argv = torchrun([str(HARNESS), "sigterm-launcher:after-update", "3", "train", str(config)], free_port())
    codes, _ = launch_processes([(argv, env)], root, name, timeout=300)
    logs = process_logs(root, name, 1, tail=20000)
    assert codes[0] != 0, logs  # torchrun itself ends with its SignalException
    assert {p.name: p.read_text() for p in codes_dir.iterdir()} == {"rank-0": "75", "rank-1": "75"}, logs
    preempted = [line for line in logs.splitlines() if "preftune train: preempted at step" in line]
    assert len(preempted) == 1, logs  # rank 0 only
    step = int(re.search(r"preempted at step (\d+) \(SIGTERM\)", preempted[0]).group(1))
    assert 3 <= step < STEPS and f"checkpoint-{step} written" in preempted[0], preempted[0]
    assert (out / f"checkpoint-{step}").is_dir() and not (out / "final").exists()
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()
    if parallelism == "fsdp":
        assert (out / f"checkpoint-{step}" / ".metadata").is_file()  # torch.distributed.checkpoint

    again = torchrun(["-m", "preftune", "train", str(config)], free_port())  # the same command, no fault
    codes, _ = launch_processes([(again, env)], root, f"{name}-resume", timeout=300)
    logs = process_logs(root, f"{name}-resume", 1, tail=20000)
    assert codes == [0], logs
    assert f"resuming from checkpoint-{step}" in logs
    assert_same_weights(final_weights(out), final_weights(reference))
    assert_each_step_once(out, STEPS, eval_steps=(0, STEPS))


# ------------------------------------------------------------------------------- accelerate launch


def accelerate_launch(processes: int, script: list[str], port: int) -> list[str]:
    """``accelerate launch`` on this CPU machine: ``--multi_gpu`` picks its torchrun launcher (two
    processes over gloo; the accelerate process is torchrun's agent), ``--cpu`` its simple launcher
    (one child process)."""
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *script,
    ]  # fmt: skip


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=[pytest.mark.distributed, pytest.mark.slow])])
def test_sigterm_to_accelerate_launch_exits_75_and_the_same_command_finishes(setup, processes):
    """SIGTERM reaches ``accelerate launch`` (the process a scheduler signals): with two processes its
    torchrun agent forwards it to both, with one its simple launcher sends its child SIGTERM (and
    SIGKILL 5 s later, the grace accelerate grants); the workers stop after one step, checkpoint
    it, exit 75, accelerate itself exits 143 (128 + SIGTERM), and the same command resumes to the
    uninterrupted run's weights."""
    from .conftest import free_port, launch_processes, process_logs
    from .test_fsdp_trainer import assert_same_weights, final_weights

    root, cfg, reference = setup
    per_rank = {1: {}, 2: {"batch_size": 2, "parallelism": "ddp", "precision": "fp32"}}[processes]
    config, out = write_config(root, {**cfg, **per_rank}, f"accelerate-{processes}")
    codes_dir = root / f"accelerate-codes-{processes}"
    shutil.rmtree(codes_dir, ignore_errors=True)
    codes_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    name = f"accelerate-preempt-{processes}"
    script = [str(HARNESS), "sigterm-launcher:after-update", "3", "train", str(config)]
    codes, _ = launch_processes(
        [(accelerate_launch(processes, script, free_port()), {**env, "FAULT_EXIT_DIR": str(codes_dir)})],
        root,
        name,
        timeout=300,
    )
    logs = process_logs(root, name, 1, tail=20000)
    assert codes == [143], logs
    assert {p.name: p.read_text() for p in codes_dir.iterdir()} == {
        f"rank-{r}": str(EXIT_PREEMPTED) for r in range(processes)
    }, logs
    preempted = [line for line in logs.splitlines() if "preftune train: preempted at step" in line]
    assert len(preempted) == 1, logs  # the main process only
    step = int(re.search(r"preempted at step (\d+) \(SIGTERM\)", preempted[0]).group(1))
    assert 3 <= step < STEPS and (out / f"checkpoint-{step}").is_dir() and not (out / "final").exists()
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()

    again = accelerate_launch(processes, ["-m", "preftune", "train", str(config)], free_port())
    codes, _ = launch_processes([(again, env)], root, f"{name}-resume", timeout=300)
    logs = process_logs(root, f"{name}-resume", 1, tail=20000)
    assert codes == [0], logs
    assert f"resuming from checkpoint-{step}" in logs
    assert_same_weights(final_weights(out), final_weights(reference))
