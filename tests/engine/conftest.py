import json
import random
from pathlib import Path

import pytest

from preftune.testing import free_port, rank_env  # noqa: F401  (the distributed tests import them from here)


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}],
                "rejected": [
                    {"role": "assistant", "content": f"{a} + {b} = {wrong}. The answer is {wrong}."}
                ],
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", arithmetic_rows(32)), write_jsonl(
        d / "eval.jsonl", arithmetic_rows(8, 1)
    )


@pytest.fixture(scope="session")
def unpaired_file(tmp_path_factory):
    rows = []
    for r in arithmetic_rows(16, 2):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("unpaired") / "train.jsonl", rows)


@pytest.fixture
def base_config(tiny_model_dir, pair_files, tmp_path):
    def make(**overrides):
        cfg = {
            "model": str(tiny_model_dir),
            "data": {"train": pair_files[0], "eval": pair_files[1]},
            "batch_size": 4,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
            "report_to": [],
        }
        for key, value in overrides.items():
            node = cfg
            parts = key.split("__")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return cfg

    return make


def metric_rows(metrics, having: str | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (or of a run directory's), optionally only those with key ``having``."""
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if having is None or having in r]


def losses_by_step(metrics_path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metric_rows(metrics_path, "loss")}


# --------------------------------------------------------------------------------------------------
# Launching several processes (the distributed tests): torchrun's environment, or a launcher itself


def launch_processes(
    commands: list[tuple[list[str], dict]], workdir, name: str, timeout: float
) -> tuple[list[int], list[float]]:
    """Start one process per (argv, env), output in ``<workdir>/<name>-<i>.log``; wait at most
    ``timeout`` seconds for all. Returns their exit codes (-9: killed at the timeout, with everything
    it started) and when each ended (seconds after the start)."""
    import os
    import signal
    import subprocess
    import time

    procs, logs = [], []
    codes: list[int | None] = []
    ended: list[float] = []
    started = time.monotonic()
    try:
        for i, (argv, env) in enumerate(commands):
            log = open(Path(workdir) / f"{name}-{i}.log", "w")
            logs.append(log)
            # a session of its own: a launcher's workers are killed with it
            procs.append(
                subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            codes.append(None)
            ended.append(float("inf"))
        while None in codes and time.monotonic() - started < timeout:
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i], ended[i] = p.returncode, time.monotonic() - started
            time.sleep(0.05)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
                codes[i] = -9
            else:  # the launcher ended: nothing it started may outlive it
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for log in logs:
            log.close()
    return [int(c) for c in codes], ended


def process_logs(workdir, name: str, n: int, tail: int = 3000) -> str:
    return "\n".join(
        f"--- {name} process {i} ---\n" + (Path(workdir) / f"{name}-{i}.log").read_text()[-tail:]
        for i in range(n)
    )
