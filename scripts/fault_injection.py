"""Fault-injection trials on tiny models, tallied into the table of issue 14.

Runs the test cases that inject each fault (pytest collects and runs them; each asserts an exact
resume or a one-line error) and counts the outcomes::

    kills survived with clean metrics     kill -9 at 15 seeded points, then resume=true
    corruptions recovered or refused      17 damaged checkpoints / caches, + none intact left
    bad inputs with a one-line error      50 configs and data files through `preftune train`
    concurrency cases safe                a second trainer on a busy directory; a dead one's lock
    unsafe loads                          planted pickles, old-format files, a source audit
    architectures silently wrong          scoring probes over every causal-LM architecture

Usage (from the repository root; the sweep takes minutes on a CPU):

    python scripts/fault_injection.py            # everything, the slow kill sweep included
    python scripts/fault_injection.py --quick    # only what the default test suite runs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# row of the table -> (test files, test-name prefixes counted in it, what counts: "passed" or "failed")
ROWS = {
    "kills survived with clean metrics": (
        ["tests/engine/test_fault_injection.py"],
        ["test_kill_sweep", "test_kill_then_resume_is_exact"],
        "passed",
    ),
    "corruptions recovered or cleanly refused": (
        ["tests/engine/test_fault_injection.py"],
        ["test_damage_is_detected_and_resume_is_exact", "test_no_intact_checkpoint_is_one_line"],
        "passed",
    ),
    "bad inputs with a one-line error (exit 2)": (
        ["tests/engine/test_bad_input.py"],
        ["test_bad_input_is_one_line_with_exit_code_2"],
        "passed",
    ),
    "concurrency cases safe": (
        ["tests/engine/test_fault_injection.py"],
        ["test_a_second_trainer_on_a_busy_directory", "test_a_dead_trainers_lock"],
        "passed",
    ),
    "unsafe loads": (
        ["tests/engine/test_checkpointing.py"],
        [
            "test_resume_never_unpickles",
            "test_old_format_files_load_only",
            "test_no_source_file_loads_pickles",
        ],
        "failed",
    ),
    "architectures silently wrong": (
        ["tests/engine/test_architectures.py"],
        ["test_scoring_equals_the_models_own_logits"],
        "failed",
    ),
}


class Tally:
    """A pytest plugin: the outcome of every test call, by node id."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.outcomes[report.nodeid] = report.outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the tests marked slow")
    args = parser.parse_args(argv)

    import pytest

    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = sorted({f for paths, _, _ in ROWS.values() for f in paths})
    names = sorted({n for _, prefixes, _ in ROWS.values() for n in prefixes})
    tally = Tally()
    pytest_args = ["-q", "-p", "no:cacheprovider", "-k", " or ".join(names), *files]
    pytest_args += ["-m", "not slow"] if args.quick else ["-m", "slow or not slow"]
    pytest.main(pytest_args, plugins=[tally])

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for nodeid, outcome in tally.outcomes.items():
        path, _, name = nodeid.partition("::")
        for row, (paths, prefixes, _) in ROWS.items():
            if path in paths and any(name.startswith(p) for p in prefixes):
                counts[row][outcome] += 1
    print("\n| trial | result |\n|---|---|")
    for row, (_, _, counted) in ROWS.items():
        c = counts[row]
        total = sum(c.values())
        print(
            f"| {row} | {c.get(counted, 0)}/{total} |"
            if counted == "passed"
            else f"| {row} | {c.get(counted, 0)} (of {total} checks) |"
        )
    failed = any(c.get("failed", 0) for c in counts.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
