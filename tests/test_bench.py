"""The benchmark script runs end to end at toy sizes: table, JSON, cross-check, GPU configuration on CPU.

Timings are not asserted (performance is measured by running bench/run.py, not by unit tests);
what is asserted is the output's structure and that preftune and TRL compute the same losses on the
same weights and batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_table_has_a_row_per_comparison(quick_run):
    stdout, _ = quick_run
    assert "time A/B" in stdout and "mem A/B" in stdout
    for label in ("preftune DPO / SFT floor (HF labels)", "preftune MRPO K=3 / preftune DPO"):
        assert label in stdout
    for config in ("1", "2a", "2b", "3", "4a", "4b"):
        assert any(line.startswith(f"{config} ") for line in stdout.splitlines()), config


def test_json_structure(quick_run):
    _, report = quick_run
    assert {"date", "cpu", "torch", "transformers", "command"} <= set(report["machine"])
    assert set(report["configs"]) == {"1", "2a", "2b", "3", "4a", "4b"}
    for name, config in report["configs"].items():
        assert config["workload"]["name"] == name
        for fw, res in config["results"].items():
            assert "error" not in res, (name, fw, res.get("error"))
            assert res["median_s"] > 0 and res["peak_abs_mb"] > 0
        for row in config["comparisons"]:
            assert "skipped" not in row, row
            assert row["time_ratio"] > 0 and row["abs_mem_ratio"] > 0


def test_gpu_configuration_runs_at_tiny_size_on_cpu(quick_run):
    _, report = quick_run
    for name in ("4a", "4b"):
        config = report["configs"][name]
        assert config["workload"]["precision"] == "bf16" and config["workload"]["device"] == "cpu"
        assert {"preftune", "sft-hf"} <= set(config["results"])
        assert config["results"]["preftune"]["tokens_per_s"] > 0


def test_preftune_and_trl_compute_the_same_losses(quick_run):
    pytest.importorskip("trl")
    _, report = quick_run
    for name in ("1", "2a", "2b", "4a"):
        ours = report["configs"][name]["results"]["preftune"]["checks"]
        trl = report["configs"][name]["results"]["trl"]["checks"]
        tol = 1e-3 if report["configs"][name]["workload"]["precision"] == "bf16" else 1e-4
        for key in ("loss_step0", "logps_chosen_step0", "logps_rejected_step0", "loss_last"):
            assert ours[key] == pytest.approx(trl[key], rel=tol), (name, key)
