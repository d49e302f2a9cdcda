"""bench/sampling.py at toy size: both ways timed on the same prompts, identical texts at temperature 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.bench


def test_sampling_bench_times_both_ways_and_matches_at_temperature_zero(tmp_path):
    out = tmp_path / "sampling.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sampling.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # exit 1 when the temperature-0 texts differ
    report = json.loads(out.read_text())
    assert "ratio (medians)" in proc.stdout
    assert report["identical_at_temperature_0"] is True
    assert len(report["seconds"]["generate"]) == len(report["seconds"]["preftune"]) >= 1
    assert report["ratio"] == pytest.approx(
        report["median_seconds"]["generate"] / report["median_seconds"]["preftune"]
    )
    assert report["k"] == 4 and report["prompts"] == 4
