"""The FSDP benchmarks run end to end at toy sizes on the CPU (2 processes over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(args: list[str], timeout: float = 400) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=BENCH.parent
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_fsdp_memory_quick_reports_sharded_state(tmp_path):
    record_path = tmp_path / "mem.json"
    stdout = _run([str(BENCH / "fsdp_memory.py"), "--quick", "--json", str(record_path)])
    assert "ratio FSDP/one process" in stdout
    record = json.loads(record_path.read_text())
    one = record["one_process"]["local_state_mb"]
    for rank in record["fsdp_two_processes"]:
        for key in ("parameters", "gradients", "optimizer"):  # each process holds about half
            assert rank["local_state_mb"][key] <= 0.6 * one[key] + 0.1, (key, rank, one)


def test_gpu_fsdp_dry_run_compares_both_frameworks(tmp_path):
    record_path = tmp_path / "gpu.json"
    stdout = _run([str(BENCH / "gpu_fsdp.py"), "--dry-run", "--json", str(record_path)])
    assert "preftune/TRL step time" in stdout
    record = json.loads(record_path.read_text())
    assert set(record["results"]) == {"preftune", "trl"}
    assert record["results"]["preftune"]["world"] == 2
