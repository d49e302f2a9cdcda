"""report_to: trackio, wandb and mlflow, each checked in its own offline store.

One tiny training logs to all three at once, in a subprocess (Trackio reads TRACKIO_DIR when it is
imported, W&B starts a service process: both end with the subprocess); each test then reads its
tracker's files as the tracker wrote them and finds the step-1 loss of metrics.jsonl under TRL's name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from preftune.config import ConfigError, load_config
from preftune.extras import MissingDependency
from preftune.metrics import MetricsLog
from preftune.trackers import mlflow_names, require_trackers, trl_names

from .conftest import metric_rows

TRAIN = """
import preftune
result = preftune.train({config!r})
print("DONE", result.steps)
"""


def _tracker_vars(root: Path) -> dict[str, str]:
    """Every tracker writes under ``root``, offline."""
    return dict(
        TRACKIO_DIR=str(root / "trackio"),
        WANDB_MODE="offline",
        WANDB_DIR=str(root),
        WANDB_SILENT="true",
        MLFLOW_TRACKING_URI=f"file:{root / 'mlruns'}",
        MLFLOW_ALLOW_FILE_STORE="true",
    )


def _tracker_env(root: Path) -> dict[str, str]:
    env = {**os.environ, **_tracker_vars(root)}
    env.pop("WANDB_PROJECT", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return env


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, pair_files, tmp_path_factory):
    """A 2-step run with report_to [trackio, wandb, mlflow]: (tracker root, run directory)."""
    for module in ("trackio", "wandb", "mlflow"):
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("trackers")
    config = {
        "model": str(tiny_model_dir),
        "data": {"train": pair_files[0], "eval": pair_files[1]},
        "batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "progress": False,
        "report_to": ["trackio", "wandb", "mlflow"],
        "run_name": "tiny-dpo",
    }
    code = textwrap.dedent(TRAIN).format(config=config)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=_tracker_env(root),
        cwd=root,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "DONE 2" in out.stdout
    assert "could not start" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-4000:]
    return root, root / "run"


def _step1(run: Path) -> dict:
    (row,) = [r for r in metric_rows(run, "loss") if r["step"] == 1]
    return row


def test_trackio_local_store_holds_the_step1_loss(tracked):
    root, run = tracked
    db = root / "trackio" / "preftune.db"  # project: `project` unset -> preftune
    assert db.is_file(), sorted(p.name for p in (root / "trackio").iterdir())
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
    logged = {step: json.loads(metrics) for name, step, metrics in rows if name == "tiny-dpo"}
    assert logged[1]["train/loss"] == pytest.approx(_step1(run)["loss"], abs=1e-6)
    assert logged[1]["train/rewards/margins"] == pytest.approx(_step1(run)["rewards/margins"], abs=1e-6)
    assert logged[1]["train/global_step"] == 1
    # the held-out rows under TRL's eval/ names, at step 0 (before training) and the last step
    assert "eval/loss" in logged[0] and "eval/loss" in logged[2]


def _wandb_records(path: Path):
    """The records of a .wandb file: W&B's header, then LevelDB-log framed protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_holds_the_step1_loss(tracked):
    root, run = tracked
    (path,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    by_step = {}
    for row in history:
        by_step.setdefault(row["train/global_step"], {}).update(row)
    assert by_step[1]["train/loss"] == pytest.approx(_step1(run)["loss"], abs=1e-6)
    assert "eval/rewards/accuracies" in by_step[2]
    state = json.loads((run / "trackers.json").read_text())
    assert state["wandb"]["id"] in path.name  # kept: a resumed run logs into the same W&B run


def test_mlflow_file_store_holds_the_step1_loss(tracked):
    root, run = tracked
    (run_dir,) = [p for p in (root / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    lines = (run_dir / "metrics" / "loss").read_text().split("\n")
    by_step = {int(step): float(value) for _, value, step in (line.split() for line in lines if line)}
    assert by_step[1] == pytest.approx(_step1(run)["loss"], abs=1e-6)
    assert (run_dir / "metrics" / "eval_loss").is_file()  # MLflow gets metrics.jsonl's names, as TRL's
    assert (run_dir / "tags" / "mlflow.runName").read_text() == "tiny-dpo"
    assert (run_dir / "params" / "beta").read_text() == "0.1"  # the resolved config
    assert json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"] == run_dir.name


def test_trl_metric_names():
    row = {"loss": 0.5, "eval_rewards/accuracies": 1.0, "epoch": 0.5, "note": "x", "nan": float("nan")}
    assert trl_names(row) == {"train/loss": 0.5, "eval/rewards/accuracies": 1.0, "train/epoch": 0.5}
    assert mlflow_names({"loss": 1, "a(b)": 2.0}) == {"loss": 1.0, "a_b_": 2.0}


def test_a_resumed_run_logs_into_the_same_mlflow_run_and_a_fresh_start_makes_a_new_one(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "run"
    run.mkdir()

    def session(step: int, resume: bool) -> str:
        log = MetricsLog(run, ["mlflow"], enabled=True)
        if resume:
            log.truncate_after(step - 1)
        else:
            log.reset()
        log.write(step, {"loss": float(step)})
        log.close()
        return json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]

    first = session(1, resume=False)
    assert session(2, resume=True) == first
    steps = [
        line.split()[2]
        for line in (tmp_path / "mlruns").glob(f"*/{first}/metrics/loss").__next__().read_text().splitlines()
    ]
    assert steps == ["1", "2"]
    assert session(1, resume=False) != first


def test_only_the_main_process_logs(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLog(run, ["mlflow"], enabled=False)  # what every process but the main one gets
    log.reset()
    log.write(1, {"loss": 0.7})
    log.close()
    assert not (tmp_path / "mlruns").exists() and list(run.iterdir()) == []


def test_an_unknown_tracker_is_refused_with_the_closest_name(base_config):
    with pytest.raises(ConfigError, match=r"report_to: 'wandbb' is not one of .*did you mean 'wandb'"):
        load_config(base_config(report_to=["wandbb"]))
    assert load_config(base_config(report_to="none")).report_to == ["none"]


@pytest.mark.parametrize(
    "tracker,hint",
    [
        (
            "trackio",
            "install trackio (Trackio logging, report_to: [trackio]): pip install 'preftune[trackio]'",
        ),
        (
            "wandb",
            "install wandb (Weights & Biases logging, report_to: [wandb]): pip install 'preftune[wandb]'",
        ),
        (
            "mlflow",
            "install mlflow-skinny (MLflow logging, report_to: [mlflow]): pip install 'preftune[mlflow]'",
        ),
    ],
)
def test_a_missing_tracker_is_one_line_before_any_model_loads(
    tracker, hint, base_config, tmp_path, monkeypatch, capsys
):
    from preftune import cli
    from preftune.models import loading

    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    with pytest.raises(MissingDependency) as error:
        require_trackers(["tensorboard", tracker])
    assert str(error.value) == hint

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(report_to=[tracker])))
    capsys.readouterr()
    assert cli.main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"preftune train: error: {hint}"


DDP_WORKER = """
import json, sys, torch
from preftune.trainer import train
train(json.load(open(sys.argv[1])))
print("THREADS", torch.get_num_threads())
"""


@pytest.mark.distributed
def test_under_two_processes_only_the_main_one_logs_and_threads_are_shared(
    tiny_model_dir, pair_files, tmp_path
):
    """A 2-process DDP run (as torchrun starts it, OMP_NUM_THREADS unset): one MLflow run holding
    each step once, and each rank with its share of the usable CPUs."""
    pytest.importorskip("mlflow")
    if not torch_distributed_gloo():
        pytest.skip("torch.distributed with gloo is not available")
    from .conftest import free_port, launch_processes, process_logs, rank_env

    config = {
        "model": str(tiny_model_dir),
        "data": {"train": pair_files[0]},
        "batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "report_to": ["mlflow"],
    }
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps(config))
    port = free_port()
    commands = []
    for r in range(2):
        env = rank_env(r, 2, port, ACCELERATE_USE_CPU="1", **_tracker_vars(tmp_path))
        env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
        commands.append(([sys.executable, "-c", DDP_WORKER, str(spec)], env))
    codes, _ = launch_processes(commands, tmp_path, "ddp", timeout=400)
    assert codes == [0, 0], process_logs(tmp_path, "ddp", 2)
    runs = [p for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1, runs
    steps = [line.split()[2] for line in (runs[0] / "metrics" / "loss").read_text().splitlines()]
    assert steps == ["1", "2"]
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for r in range(2):
        assert f"THREADS {share}" in (tmp_path / f"ddp-{r}.log").read_text(), process_logs(tmp_path, "ddp", 2)


def torch_distributed_gloo() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_gloo_available()
