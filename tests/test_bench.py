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

pytestmark = pytest.mark.bench


def _run_bench_script(script: str, out: Path, *args: str) -> tuple[str, dict]:
    """Runs bench/<script> with --json out; its stdout and the JSON it wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _run_bench_script("run.py", tmp_path_factory.mktemp("bench") / "results.json", "--quick")


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


def _memory_census(tmp_path, *flags) -> dict:
    out = tmp_path / f"memory{'-'.join(flags)}.json"
    stdout, report = _run_bench_script("memory.py", out, "--config", "2a", "--quick", "--passes", "1", *flags)
    assert "saved for backward" in stdout and "peak RSS" in stdout
    return report


def test_memory_census_counts_activations_not_parameters(tmp_path):
    plain = _memory_census(tmp_path)
    checkpointed = _memory_census(tmp_path, "--gradient-checkpointing")
    assert plain["saved_mb"] > 0 and plain["saved_kb_per_token_layer"] > 0
    # checkpointing keeps only the layers' inputs: far less saved outside the checkpointed layers
    assert checkpointed["saved_mb"] < plain["saved_mb"] / 3
    # the tied embedding / head weight (vocabulary 1000 × hidden 32 at toy size) is a parameter
    assert all(row["shape"] != [1000, 32] for row in plain["saved_top"])
    assert sum(row["mb"] for row in plain["saved_top"]) <= plain["saved_mb"] + 1e-9
    assert plain["grads_and_adam_mb"] > 0


def test_generation_bench_times_both_ways_on_the_same_prompts(tmp_path):
    stdout, report = _run_bench_script("generation.py", tmp_path / "generation.json", "--quick")
    assert "ratio (fastest)" in stdout
    assert report["identical"] is True  # the bench exits 1 when the texts differ
    assert len(report["seconds"]["one call"]) == len(report["seconds"]["preftune"]) >= 1
    assert report["ratio"] == pytest.approx(
        min(report["seconds"]["one call"]) / min(report["seconds"]["preftune"])
    )
