"""Run locks a requeued job can take over: a heartbeat every few seconds from the holder; a lock whose
heartbeat is older than STALE_AFTER_S is stale wherever it was taken; on this host, a pid whose
process started at another time than recorded (a reused pid) is stale too; a refusal says the
lock's age and what to do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from preftune import runlock


def plant(run_dir, age_s: float = 0.0, **info):
    path = run_dir / ".lock"
    path.write_text(json.dumps({"pid": 4242, "host": "node-7", "started": time.time() - age_s, **info}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield proc
    proc.kill()
    proc.wait()


def test_a_lock_from_another_host_with_a_stale_heartbeat_is_taken_over(tmp_path):
    plant(tmp_path, age_s=runlock.STALE_AFTER_S + 30)
    warned = []
    path = runlock.acquire(tmp_path, warn=warned.append)
    try:
        (message,) = warned
        assert f"taking over the lock of {tmp_path} left by pid 4242 on node-7" in message
        assert "its heartbeat is 90 s old (stale after 60 s)" in message
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        runlock.release(tmp_path)
    assert not path.exists()


def test_a_lock_from_another_host_with_a_fresh_heartbeat_is_refused_saying_its_age(tmp_path):
    path = plant(tmp_path, age_s=12)
    with pytest.raises(runlock.RunDirLockedError) as refused:
        runlock.acquire(tmp_path)
    message = str(refused.value)
    assert "in use by pid 4242 on node-7" in message and "heartbeat 12 s ago" in message, message
    assert "taken over once its heartbeat is 60 s old (in 48 s)" in message and f"delete {path}" in message
    assert json.loads(path.read_text())["host"] == "node-7"  # untouched


def test_a_reused_pid_on_this_host_is_stale(tmp_path, sleeper):
    """The pid runs, but as another process than the one that took the lock (a restarted container)."""
    start = runlock.process_start(sleeper.pid)
    assert start is not None
    here = {"host": socket.gethostname(), "pid": sleeper.pid, "boot_id": runlock.boot_id()}
    plant(tmp_path, proc_start=start, **here)
    with pytest.raises(runlock.RunDirLockedError, match=f"in use by pid {sleeper.pid}"):
        runlock.acquire(tmp_path)  # the same process: alive, refused
    plant(tmp_path, proc_start=start - 1, **here)
    warned = []
    runlock.acquire(tmp_path, warn=warned.append)
    runlock.release(tmp_path)
    assert f"pid {sleeper.pid} now belongs to another process" in warned[0], warned


def test_a_lock_taken_before_the_last_boot_is_stale(tmp_path, sleeper):
    plant(
        tmp_path,
        host=socket.gethostname(),
        pid=sleeper.pid,
        boot_id="00000000-dead-beef-0000-000000000000",
        proc_start=runlock.process_start(sleeper.pid),
    )
    warned = []
    runlock.acquire(tmp_path, warn=warned.append)
    runlock.release(tmp_path)
    assert "taken before this host last booted" in warned[0]


def test_the_holder_refreshes_its_heartbeat_and_stops_when_it_releases(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    # this test's lock alone: in a whole test run, earlier tests' locks may still be held in this
    # process, and their heartbeat thread (sleeping the default 5 s) would serve this lock too
    monkeypatch.setattr(runlock, "_held", {})
    monkeypatch.setattr(runlock, "_beat_thread", None)
    path = runlock.acquire(tmp_path)
    beating = runlock._beat_thread
    info = json.loads(path.read_text())
    assert info["proc_start"] == runlock.process_start(os.getpid()) and info["boot_id"] == runlock.boot_id()
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 5
    while runlock.heartbeat_age(path) > 100 and time.time() < deadline:
        time.sleep(0.02)
    assert runlock.heartbeat_age(path) < 5
    runlock.release(tmp_path)
    assert not path.exists()
    beating.join(timeout=10)  # a busy machine may take a while to schedule the thread's exit
    assert not beating.is_alive() and runlock._beat_thread is None  # it ended with the last lock


def test_a_lock_no_longer_ours_is_never_refreshed(tmp_path):
    path = runlock.acquire(tmp_path)
    try:
        plant(tmp_path, age_s=500)  # taken over by another host after we stalled
        runlock.beat()
        assert runlock.heartbeat_age(path) > 400
    finally:
        runlock.release(tmp_path)
    assert path.exists()  # release never removes another's lock


def test_a_job_requeued_on_another_node_takes_its_dead_predecessors_lock_over(base_config, tmp_path, capsys):
    """The predecessor was killed on node-7 (its lock stays, unrefreshed); the same command on this
    host, 61+ s later, trains."""
    from preftune import cli

    from .test_run_guards import write_config

    out = tmp_path / "run"
    out.mkdir()
    plant(out, age_s=runlock.STALE_AFTER_S + 5)
    cfg = write_config(tmp_path, base_config(output_dir=str(out), resume="auto"))
    capsys.readouterr()
    assert cli.main(["train", cfg]) == 0
    assert f"taking over the lock of {out} left by pid 4242 on node-7" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "final").is_dir()


def test_a_requeued_slurm_job_takes_its_earlier_runs_fresh_lock_over_at_once(tmp_path, monkeypatch):
    """SLURM starts a requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT + 1) only after its earlier
    run has ended: that run's lock, on another node and only 3 s old, is taken over at once; another
    job's lock, or one of this same run (another process of the job), is still refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "81723")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    plant(tmp_path, age_s=3, slurm_job={"id": "81723", "restart": 1})
    warned = []
    path = runlock.acquire(tmp_path, warn=warned.append)
    try:
        (message,) = warned
        assert "left by pid 4242 on node-7 since " in message, message
        assert (
            "it was taken by SLURM job 81723 before it was requeued (SLURM_RESTART_COUNT 1, now 2)" in message
        )
        assert json.loads(path.read_text())["slurm_job"] == {"id": "81723", "restart": 2}
    finally:
        runlock.release(tmp_path)
    for other in ({"id": "81724", "restart": 0}, {"id": "81723", "restart": 2}, None):
        plant(tmp_path, age_s=3, slurm_job=other)
        with pytest.raises(runlock.RunDirLockedError, match="in use by pid 4242 on node-7"):
            runlock.acquire(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID")  # outside SLURM, the job a lock names does not matter
    plant(tmp_path, age_s=3, slurm_job={"id": "81723", "restart": 0})
    with pytest.raises(runlock.RunDirLockedError):
        runlock.acquire(tmp_path)
