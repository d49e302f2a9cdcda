"""Intra-op threads from the CPUs a process may use; one line when the machine is oversubscribed."""

from __future__ import annotations

import pytest
import torch

from preftune import threads as T
from preftune.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    T._said.clear()
    yield
    torch.set_num_threads(before)
    T._said.clear()


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


def test_the_thread_count_follows_the_affinity_not_the_machine(four_cpus, monkeypatch):
    monkeypatch.setattr(T.os, "cpu_count", lambda: 64)
    assert T.usable_cpus() == 4
    choice = T.choose_threads(None, {}, busy=0, others=0)
    assert (choice.threads, choice.source, choice.note) == (4, "affinity", None)


def test_local_ranks_share_the_cpus(four_cpus):
    assert T.choose_threads(None, {"LOCAL_WORLD_SIZE": "2"}, busy=1, others=0).threads == 2
    assert T.choose_threads(None, {"LOCAL_WORLD_SIZE": "8"}, busy=0, others=0).threads == 1  # at least 1


def test_explicit_settings_are_respected(four_cpus):
    assert T.choose_threads(3, {"OMP_NUM_THREADS": "2"}, busy=9, others=2) == T.ThreadChoice(
        3, "threads", 4, 1
    )
    omp = T.choose_threads(None, {"OMP_NUM_THREADS": "2"}, busy=9, others=2)
    assert (omp.threads, omp.source, omp.note) == (2, "OMP_NUM_THREADS", None)


def test_an_oversubscribed_machine_gets_one_line_saying_how_to_set_fewer(four_cpus):
    note = T.choose_threads(None, {}, busy=2.2, others=0).note
    assert note.startswith("the machine is oversubscribed (about 2 other runnable tasks for the 4 CPUs")
    assert "4 intra-op threads" in note and "threads=2" in note and "OMP_NUM_THREADS=2" in note
    assert "preftune demo --threads 2" in note  # the demo has no config file: its own option
    assert "\n" not in note
    assert T.choose_threads(None, {}, busy=0.3, others=0).note is None  # noise: not busy
    with_other = T.choose_threads(None, {}, busy=0, others=1).note
    assert "1 other preftune process running" in with_other
    # the other rank of this job is not other load
    assert T.choose_threads(None, {"LOCAL_WORLD_SIZE": "2"}, busy=1, others=0).note is None
    one = T.choose_threads(None, {"LOCAL_WORLD_SIZE": "4"}, busy=6, others=0).note
    assert "runs 1 intra-op thread per process (4 local ranks)" in one


def test_busy_cpus_reads_the_runnable_tasks_and_falls_back_to_the_load_average(tmp_path, monkeypatch):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.50 0.40 0.30 3/210 4242\n")
    assert T.busy_cpus(samples=2, interval=0, loadavg=str(loadavg)) == 2.0  # 3 runnable, less this one
    monkeypatch.setattr(T.os, "getloadavg", lambda: (5.5, 1.0, 1.0))
    assert T.busy_cpus(loadavg=str(tmp_path / "missing")) == 5.5


def test_other_preftune_processes_are_counted_but_not_this_job(tmp_path, monkeypatch):
    def proc(pid: int, ppid: int, *argv: str) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "stat").write_text(f"{pid} (python) S {ppid} 1 1")

    monkeypatch.setattr(T.os, "getpid", lambda: 100)
    monkeypatch.setattr(T.os, "getppid", lambda: 50)
    proc(100, 50, "/usr/bin/python", "-m", "preftune", "train", "a.yaml")  # this process
    proc(101, 50, "/venv/bin/preftune", "train", "a.yaml")  # another rank of this job
    proc(200, 1, "/venv/bin/preftune", "train", "b.yaml")  # another job
    proc(201, 1, "python3", "-m", "preftune", "eval", "run")  # another job
    proc(202, 1, "python3", "-m", "pytest", "tests/test_preftune.py")  # not preftune
    proc(203, 1, "bash")
    (tmp_path / "self").mkdir()
    assert T.other_preftune_processes(str(tmp_path)) == 2


def test_configure_threads_sets_torch_and_says_it_once(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(T, "busy_cpus", lambda: 3.0)
    monkeypatch.setattr(T, "other_preftune_processes", lambda: 0)
    said = []
    torch.set_num_threads(2)
    assert T.configure_threads(None, said.append).threads == 1
    assert torch.get_num_threads() == 1
    T.configure_threads(None, said.append)
    assert len(said) == 1 and said[0].startswith("the machine is oversubscribed")
    assert T.configure_threads(2, said.append).source == "threads" and torch.get_num_threads() == 2


def test_threads_key_is_checked(tmp_path):
    assert load_config({"threads": 2}).threads == 2
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        load_config({"threads": 0})


def test_training_applies_the_threads_key_and_says_when_the_machine_is_busy(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    import json

    from preftune.trainer import train

    rows = [
        {"prompt": f"What is {a} plus {a}?", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."}
        for a in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "model": str(tiny_model_dir),
        "data": {"train": str(tmp_path / "train.jsonl")},
        "batch_size": 4,
        "max_steps": 1,
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "report_to": [],
    }
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(T, "busy_cpus", lambda: 4.0)
    monkeypatch.setattr(T, "other_preftune_processes", lambda: 0)
    torch.set_num_threads(2)
    train({**base, "threads": 1, "output_dir": str(tmp_path / "explicit")})
    assert torch.get_num_threads() == 1
    assert "oversubscribed" not in capsys.readouterr().out  # an explicit count is not second-guessed
    train({**base, "output_dir": str(tmp_path / "auto")})
    assert torch.get_num_threads() == 2
    out = capsys.readouterr().out
    assert out.count("[preftune] the machine is oversubscribed") == 1 and "threads=1" in out


def test_a_run_refused_for_its_data_does_not_also_say_the_machine_is_busy(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A bad row stops the command with one line naming file, line and field; the busy-machine line
    used to come first, about a run that never started."""
    import json

    from preftune.data import DataError
    from preftune.trainer import train

    (tmp_path / "train.jsonl").write_text(
        json.dumps({"prompt": "2+2?", "chosen": " 4.", "rejected": " "}) + "\n"
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(T, "busy_cpus", lambda: 4.0)
    monkeypatch.setattr(T, "other_preftune_processes", lambda: 0)
    monkeypatch.setattr(T, "_said", set())  # as in a fresh process
    config = {
        "model": str(tiny_model_dir),
        "data": {"train": str(tmp_path / "train.jsonl")},
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "report_to": [],
    }
    with pytest.raises(DataError, match="line 1, field 'rejected'"):
        train(config)
    captured = capsys.readouterr()
    assert "oversubscribed" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()
