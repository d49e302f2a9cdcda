"""Run ``preftune`` with a fault injected at a chosen point: ``python fault_harness.py POINT N ARGS...``.

The N-th time the run passes POINT, the process (depending on POINT's prefix) kills itself with
SIGKILL (``kill -9``: no cleanup at all), sends itself SIGINT (Ctrl-C) or SIGTERM (a scheduler's
preemption; ``sigterm-stall`` then stalls 4 s; ``sigterm-launcher``: rank 0 signals its parent, e.g.
torchrun), or waits until the file named by ``$FAULT_GO`` exists (to hold a run in mid-training).
Launched through faults.py by the fault tests (which scripts/fault_injection.py runs); nothing here
is part of preftune.
"""

from __future__ import annotations

import os
import signal
import sys
import time

# where a run can be interrupted: the function whose call (or return) counts as passing the point
POINTS = {
    "after-update": ("preftune.trainer", "apply_update", "after"),  # weights changed, nothing logged
    "after-metrics": ("preftune.metrics", "MetricsLog.write", "after"),  # a row written
    "mid-checkpoint": ("preftune.statefile", "save_state", "before"),  # a checkpoint half-written
    "before-rename": ("preftune.checkpointing", "write_manifest", "after"),  # complete, not renamed
    "final-save": ("preftune.final_model", "write_atomically", "before"),  # the final model being written
    "sample-batch": ("preftune.generation", "sample_batch", "before"),  # iterate: a batch being sampled
    "judge-chunk": ("preftune.iterate.judges", "Verifier.score", "before"),  # iterate: samples being judged
}


def _trip(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "sigterm":  # a scheduler's preemption notice, then the run goes on
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "sigusr1":  # SLURM's --signal=B:USR1@... notice, forwarded by the batch script
        os.kill(os.getpid(), signal.SIGUSR1)
    elif action == "sigterm-stall":  # the notice, then this point takes 4 s (a slow checkpoint write)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(4)
    elif action == "sigterm-launcher":  # rank 0 signals torchrun, which forwards SIGTERM to every rank
        if os.environ.get("RANK", "0") == "0":
            os.kill(os.getppid(), signal.SIGTERM)
    elif action == "wait":
        go = os.environ["FAULT_GO"]
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)


def install(point: str, n: int, action: str = "kill") -> None:
    import importlib

    module_name, attr, when = POINTS[point]
    module = importlib.import_module(module_name)
    owner, name = (
        (module, attr) if "." not in attr else (getattr(module, attr.split(".")[0]), attr.split(".")[1])
    )
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == n:
            _trip(action)
        result = real(*args, **kwargs)
        if when == "after" and calls[0] == n:
            _trip(action)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    spec, count, *args = sys.argv[1:]
    action, _, point = spec.partition(":") if ":" in spec else ("kill", "", spec)
    install(point, int(count), action)
    from preftune.cli import main

    code = main(args)
    if os.environ.get("FAULT_EXIT_DIR"):  # under a launcher, which does not pass the code on
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(os.environ["FAULT_EXIT_DIR"], f"rank-{rank}"), "w") as f:
            f.write(str(code))
    sys.exit(code)
