"""Two CPU processes (gloo) at batch 2 each train exactly like one process at batch 4.

The two processes are launched the way ``torchrun`` / ``accelerate launch`` would: separate Python
processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment (plus
ACCELERATE_USE_CPU=1). Nothing is passed to the Trainer: the Accelerator it builds picks the
distributed environment up by itself (DDP over gloo). Each process runs three trainings in a row in
one process group (DPO, RPO with the global contrast scope, RPO with the local scope) into shared
output directories, where only the main process writes metrics.jsonl.

What must hold at the same global batch (docs/methods.md#rpo, contrast scope): DPO and global-scope RPO give the same loss,
gradient norm and logged rewards as one process; local-scope RPO (the authors' behaviour) does not.
Gradient clipping is effectively off (max_grad_norm huge) so the logged norm is the raw gradient's:
Adam is nearly invariant to a constant factor on the gradient, so equal losses alone would not catch
a gradient that is off by the number of processes.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from preftune.trainer import train

from .conftest import (
    arithmetic_rows,
    free_port,
    launch_processes,
    metric_rows,
    process_logs,
    rank_env,
    write_jsonl,
)

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

pytestmark = pytest.mark.distributed

STEPS = 3
WORLD = 2
RUNS = {
    "dpo": {"method": "dpo"},
    "rpo_global": {"method": "rpo", "rpo": {"contrast_scope": "global"}},
    "rpo_local": {"method": "rpo", "rpo": {"contrast_scope": "local"}},
}
WORKER = """
import json, os, sys
import torch
from preftune.cli import main
from preftune.trainer import train
for cfg in json.load(open(sys.argv[1])):
    train(cfg)
code = main(["train", sys.argv[2]])  # the last run as `preftune train` runs it under torchrun
ended = {"code": code, "group_alive": torch.distributed.is_initialized()}
open(sys.argv[2] + f".rank{os.environ['RANK']}.json", "w").write(json.dumps(ended))
"""


def launch(configs: list[dict], workdir) -> None:
    """Run the configs in WORLD processes, as torchrun would (the last one through the command line,
    ``preftune train CONFIG``); raise with their output on failure."""
    spec, cli_config = workdir / "configs.json", workdir / "cli.yaml"
    spec.write_text(json.dumps(configs[:-1]))
    cli_config.write_text(json.dumps(configs[-1]))  # JSON is YAML
    port = free_port()
    commands = [
        (
            [sys.executable, "-c", WORKER, str(spec), str(cli_config)],
            rank_env(r, WORLD, port, ACCELERATE_USE_CPU="1"),
        )
        for r in range(WORLD)
    ]
    codes, _ = launch_processes(commands, workdir, "ddp", timeout=300)
    if any(codes):
        raise AssertionError(f"distributed training failed ({codes}):\n{process_logs(workdir, 'ddp', WORLD)}")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """metrics.jsonl rows of every run: ``one/<name>`` (1 process, batch 4), ``two/<name>`` (2 x 2)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(8))

    def config(name: str, batch_size: int, **overrides) -> dict:
        return {
            "model": str(tiny_model_dir),
            "data": {"train": data},
            "batch_size": batch_size,
            "max_steps": STEPS,  # 2 steps per epoch: the third starts a new epoch's order
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "max_grad_norm": 1e6,
            "precision": "fp32",
            "output_dir": str(root / name),
            "cache_dir": str(root / "cache"),  # shared: reference scores and embeddings computed once
            "progress": False,
            "report_to": [],
            **overrides,
        }

    out = {}
    for name in ("dpo", "rpo_global"):  # on one process the two scopes are the same (test_training)
        out[f"one/{name}"] = metric_rows(train(config(f"one-{name}", 4, **RUNS[name])).output_dir, "loss")
    launch([config(f"two-{name}", 2, **kw) for name, kw in RUNS.items()], root)
    for name in RUNS:
        out[f"two/{name}"] = metric_rows(root / f"two-{name}", "loss")
    out["ended"] = [json.loads((root / f"cli.yaml.rank{r}.json").read_text()) for r in range(WORLD)]
    out["logs"] = process_logs(root, "ddp", WORLD, tail=10**6)
    return out


def assert_same_trajectory(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        step = a["step"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (step, a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (
            step,
            a["grad_norm"],
            b["grad_norm"],
        )
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), (step, key, a[key], b[key])
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 1e-2  # the trajectory really moves


def test_two_processes_train_dpo_like_one_process(runs):
    assert_same_trajectory(runs["one/dpo"], runs["two/dpo"])


def test_global_rpo_does_not_depend_on_the_number_of_processes(runs):
    assert_same_trajectory(runs["one/rpo_global"], runs["two/rpo_global"])


def test_local_rpo_contrasts_only_each_process_pairs_and_differs(runs):
    one, local = runs["one/rpo_global"], runs["two/rpo_local"]
    # Same first loss (all margins are 0 at the start), but a different gradient from the first step:
    # each process contrasts its own 2 pairs (2 x 2 matrices) instead of all 4 (a 4 x 4 matrix).
    assert local[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    assert abs(local[0]["grad_norm"] - one[0]["grad_norm"]) > 0.05 * one[0]["grad_norm"]
    assert abs(local[-1]["loss"] - one[-1]["loss"]) > 1e-2


def test_preftune_train_ends_its_process_group_on_every_rank(runs):
    # A rank that exits with its gloo group alive can abort in interpreter teardown (exit -6) after
    # training finished, failing the job; `preftune train` destroys the group once every rank is done.
    assert runs["ended"] == [{"code": 0, "group_alive": False}] * WORLD


def test_global_rpo_gathers_without_a_deprecated_collective(runs):
    # torch.distributed.nn.functional.all_gather warned a FutureWarning at every step of global RPO
    assert "FutureWarning" not in runs["logs"] and "is deprecated" not in runs["logs"]
