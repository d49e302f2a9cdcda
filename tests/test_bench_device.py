"""The device check rehearsed on the CPU: ``bench/device_check.sh --dry-run`` runs every phase's code
(environment, the gpu tests on the CPU one case each, preftune's variants, the profiled step, TRL)
at toy sizes, so that a lent GPU's minutes are never spent on a mistake a CPU could have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


def test_every_phase_passes_and_the_record_is_complete(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = json.loads((out / "device_check.json").read_text())
    assert record["dry_run"] is True
    assert list(record["phases"]) == ["environment", "gpu_tests", "preftune", "trl"]
    assert all(p["status"] == "ok" for p in record["phases"].values()), record["phases"]
    tests = record["gpu_tests"]
    # one case of each test function of tests/gpu ran, on the CPU, and none failed
    assert tests["passed"] >= 8 and tests["failures"] == tests["errors"] == 0, tests
    assert record["environment"]["versions"]["torch"]


def test_the_benchmark_measures_every_variant_and_compares_them(dry_run):
    pytest.importorskip("trl")
    proc, out = dry_run
    record = json.loads((out / "device_check.json").read_text())
    bench = record["bench"]
    assert set(bench) == {"preftune-plain", "preftune-shared", "preftune", "preftune-mrpo", "trl"}
    for name, r in bench.items():
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0, (name, r)
        assert len(r["step_times"]) >= record["workload"]["warmup"] + record["workload"]["steps"], name
    assert "one shared-prompt row per pair in 3/3 steps (forced)" in bench["preftune-shared"]["settings"]
    assert "in 0/3 steps (forced)" in bench["preftune-plain"]["settings"]
    # preftune and TRL train the same weights on the same batches: the same loss at step 0
    assert bench["preftune-plain"]["checks"]["loss_step0"] == pytest.approx(
        bench["trl"]["checks"]["loss_step0"], rel=1e-3
    )
    comp = record["comparisons"]
    assert comp["preftune-plain"]["tokens_ratio"] > 0 and "mrpo-k3-over-dpo" in comp
    top = bench["preftune-plain"]["profile"]["top"]
    assert top and (out / "profile.txt").read_text().count("\n") > 5


def test_the_summary_table_and_logs_come_back(dry_run):
    proc, out = dry_run
    assert "device check (DRY RUN" in proc.stdout and "TRL DPOTrainer" in proc.stdout
    assert "MRPO K=3 / its own DPO" in proc.stdout and "where one preftune step's time goes" in proc.stdout
    for name in ("device_check.json", "device_check.log", "gpu_tests.log", "gpu_tests.xml", "profile.txt"):
        assert (out / name).is_file(), name
    # what the lent machine sends back: at most 8 files, plain names
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8


def test_a_phase_past_its_limit_is_killed_and_recorded(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import device_check

    for hang in (
        "import time; print('up', flush=True); time.sleep(60)",
        # half a line (a progress bar), then a hang: stopped at the limit all the same
        "import sys, time; sys.stdout.write('50%'); sys.stdout.flush(); time.sleep(60)",
    ):
        status = device_check.run_process([sys.executable, "-c", hang], 2)
        assert status["status"] == "timeout" and status["seconds"] < 10, hang
    # a child that leaves a grandchild holding the pipe: its end is seen, the grandchild killed
    leaves = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    status = device_check.run_process([sys.executable, "-c", leaves], 30)
    assert status["status"] == "ok" and status["seconds"] < 10
    assert device_check.run_process([sys.executable, "-c", "raise SystemExit(3)"], 20)["status"] == "failed"


def test_the_outer_timeout_leaves_a_record_and_the_table(tmp_path):
    """device_check.sh's timeout sends SIGTERM: the phase's processes go, the record says "killed", and
    the summary table is printed all the same."""
    # 6 s: the record is written within the first second, while the gpu_tests phase (pytest importing
    # torch and transformers, then 38 tests) cannot end that soon (it took 12-24 s here) even on an idle
    # machine; 25 s was not always long enough to catch it running
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE_CHECK_TIMEOUT="6")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", "--phases", "gpu_tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    record = json.loads((tmp_path / "device_check.json").read_text())
    assert record["phases"]["gpu_tests"]["status"] == "killed", record["phases"]
    assert "phase" in proc.stdout and "killed" in proc.stdout
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, left  # no pytest of the killed phase outlives it
