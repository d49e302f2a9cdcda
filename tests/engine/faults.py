"""What the fault tests share (test_fault_injection.py, test_preemption.py, test_run_guards.py):
launching ``preftune`` under fault_harness.py, the checkpointed run they interrupt with its
uninterrupted result, and the checks that a resumed run is that result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from preftune.trainer import train

from .conftest import metric_rows

HARNESS = Path(__file__).with_name("fault_harness.py")


def harness_env(**extra: str) -> dict[str, str]:
    """The environment of a harness process: this one's, with the test's import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def start_harness(fault: str, n: int, config: Path, *overrides: str, env=None, **popen) -> subprocess.Popen:
    """``preftune train CONFIG`` in a process that trips ``fault`` (fault_harness.py) the ``n``-th time."""
    cmd = [sys.executable, str(HARNESS), fault, str(n), "train", str(config), *overrides]
    return subprocess.Popen(
        cmd, env=harness_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def run_harness(args: list[str], timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """fault_harness.py with ``args`` (FAULT N COMMAND ...), to the end; its output as text."""
    return subprocess.run(
        [sys.executable, str(HARNESS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=harness_env(**(env or {})),
    )


def write_config(root: Path, cfg: dict, name: str, **extra) -> tuple[Path, Path]:
    """``root/NAME.yaml``: ``cfg`` (and ``extra``) with output_dir ``root/NAME``, removed if present."""
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out), **extra}))
    return path, out


def checkpointed_run(root: Path, model_dir, pair_files, steps: int, **extra) -> tuple[dict, Path]:
    """The config of a ``steps``-step run with a checkpoint every 2 steps (``extra`` keys added) and the
    run directory of its uninterrupted result (``root/reference``)."""
    cfg = {
        "model": str(model_dir),
        "data": {"train": pair_files[0], "eval": pair_files[1]},
        "batch_size": 4,
        "max_steps": steps,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "linear",
        "warmup_steps": 1,
        "cache_dir": str(root / "cache"),
        "progress": False,
        "report_to": [],
        **extra,
    }
    return cfg, train({**cfg, "output_dir": str(root / "reference")}).output_dir


def strict_rows(path) -> list[dict]:
    """metrics.jsonl parsed by a strict JSON reader (bare NaN/Infinity are errors)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def assert_each_step_once(run_dir, steps: int, eval_steps: tuple[int, ...] = ()) -> None:
    rows = strict_rows(Path(run_dir) / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    eval_at = [r["step"] for r in rows if "eval_loss" in r]
    assert train_steps == list(range(1, steps + 1)), train_steps
    assert eval_at == list(eval_steps), eval_at


def final_weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_same_run(run_dir, reference_dir) -> None:
    """Same losses at every step (bit for bit) and the same final weights."""
    got = {r["step"]: r["loss"] for r in metric_rows(run_dir, "loss")}
    want = {r["step"]: r["loss"] for r in metric_rows(reference_dir, "loss")}
    assert got == want
    a, b = final_weights(run_dir), final_weights(reference_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
