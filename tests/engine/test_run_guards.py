"""What guards a run directory: NaN stops the run (or skips the step), overwrite_output_dir clears the
old run, a fresh run never mixes with an old one, a finished run is not re-run, Ctrl-C and unexpected
errors print one line, and a run directory has one trainer at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from preftune import cli, runlock
from preftune import prepare_run as prepare_run_module
from preftune import trainer as trainer_module
from preftune.checkpointing import TrainingError
from preftune.trainer import train

from .conftest import metric_rows
from .faults import assert_each_step_once, final_weights, run_harness, strict_rows
from .test_bad_input import snapshot


def write_config(tmp_path, cfg: dict, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def error_line(err: str) -> str:
    """The one line the CLI wrote about the error (model loading may draw progress bars before it)."""
    lines = [line for line in err.splitlines() if line.startswith("preftune ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli_train(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------- non-finite


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the training loss NaN (hence every gradient) at the given optimiser steps (1-based)."""
    real = trainer_module.micro_batch_loss
    calls = {"n": 0}

    def install(*steps: int):
        def poisoned(*args, **kwargs):
            result = real(*args, **kwargs)
            if kwargs.get("grad"):
                calls["n"] += 1
                if calls["n"] in steps:
                    result[0].loss = result[0].loss * float("nan")
            return result

        monkeypatch.setattr(trainer_module, "micro_batch_loss", poisoned)

    return install


def test_nan_stops_the_run_with_exit_code_3_step_and_hint(base_config, tmp_path, capsys, nan_at_step):
    nan_at_step(3)
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(max_steps=4, save_steps=1, output_dir=str(out)))
    code, _, err = cli_train(capsys, cfg)
    assert code == 3
    err = error_line(err)
    assert "step 3: the loss is not finite" in err, err
    assert (
        "lower learning_rate" in err and f"{out / 'checkpoint-2'} is intact" in err and "resume=true" in err
    )
    assert not (out / "final").exists() and not (out / "checkpoint-3").exists()
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert not (out / ".lock").exists()


def test_fp16_hint_and_nan_weights_are_never_saved(base_config, tmp_path, capsys, tiny_model_dir):
    """A model whose weights are NaN: the run stops at step 1 and saves nothing (issue: corrupted weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bad)
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path, base_config(model=str(bad), output_dir=str(out), reference_free=True, model_dtype="float16")
    )
    code, _, err = cli_train(capsys, cfg)
    err = error_line(err)
    assert code == 3 and "step 1:" in err and "instead of fp16" in err and "no checkpoint" in err, err
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


def test_skip_step_drops_the_update_logs_it_and_writes_strict_json(
    base_config, tmp_path, capsys, nan_at_step
):
    nan_at_step(2)
    out = tmp_path / "run"
    result = train(base_config(max_steps=3, output_dir=str(out), on_nonfinite="skip_step"))
    assert (
        "step 2: the loss is not finite; on_nonfinite=skip_step dropped this update"
        in capsys.readouterr().out
    )
    rows = {r["step"]: r for r in strict_rows(result.metrics_path) if "loss" in r}
    assert rows[2]["loss"] is None and rows[2]["nonfinite_skipped_steps"] == 1
    assert rows[1]["loss"] > 0 and rows[3]["loss"] > 0
    assert "NaN" not in result.metrics_path.read_text()
    weights = final_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())

    # the skipped step changed nothing: a run whose step 2 is skipped ends where steps 1 and 3 lead
    from preftune.metrics import strict_json

    assert strict_json(float("inf")) is None and strict_json(1.5) == 1.5


def test_metrics_rows_are_strict_json_even_with_nan_values(tmp_path):
    from preftune.metrics import MetricsLog

    log = MetricsLog(tmp_path, [], True)
    log.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "epoch": 0.5})
    assert strict_rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": None, "grad_norm": None, "epoch": 0.5}
    ]


# -------------------------------------------------------------------------- old runs and overwriting


def test_overwrite_clears_the_old_run_so_nothing_of_it_survives(base_config, tmp_path):
    out = tmp_path / "run"
    train(base_config(max_steps=4, save_steps=1, save_total_limit=0, output_dir=str(out)))
    for extra in ("eval.json", "report.md", "loss.png", "error.log"):
        (out / extra).write_text("old")
    (out / "tensorboard").mkdir()
    (out / "checkpoint-9.tmp").mkdir()
    new = train(base_config(max_steps=2, save_steps=1, overwrite_output_dir=True, output_dir=str(out)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for gone in ("eval.json", "report.md", "loss.png", "error.log", "tensorboard"):
        assert not (out / gone).exists(), gone
    assert_each_step_once(out, 2, eval_steps=(0, 2))  # 0: the evaluation before training
    fresh = train(base_config(max_steps=2, save_steps=1, output_dir=str(tmp_path / "fresh")))
    a, b = final_weights(new.output_dir), final_weights(fresh.output_dir)
    assert all(a[k].equal(b[k]) for k in a)  # final/ is the new run's model
    # and resume=true continues the new run, not the old one: it is finished
    again = train(base_config(max_steps=2, save_steps=1, resume=True, output_dir=str(out)))
    assert again.steps == 2


def test_overwrite_with_bad_data_clears_nothing(base_config, tmp_path, capsys):
    out = tmp_path / "run"
    train(base_config(output_dir=str(out)))
    before = snapshot(out)
    cfg = write_config(
        tmp_path, base_config(output_dir=str(out), data={"train": str(tmp_path / "nope.jsonl")})
    )
    code, _, err = cli_train(capsys, cfg, "overwrite_output_dir=true")
    assert code == 2 and "nope.jsonl" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "final", "checkpoint-3"])
def test_a_fresh_run_refuses_an_old_runs_directory_in_one_line(leftover, base_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if leftover == "metrics.jsonl":  # a run killed before its first checkpoint
        (out / leftover).write_text('{"step": 1, "loss": 0.69}\n')
    else:
        (out / leftover).mkdir()
    before = snapshot(out)
    code, _, err = cli_train(capsys, write_config(tmp_path, base_config(output_dir=str(out))))
    err = error_line(err)
    assert code == 1, err
    assert str(out) in err and leftover in err and "resume=true" in err and "overwrite_output_dir=true" in err
    assert snapshot(out) == before


def test_resume_without_a_checkpoint_starts_the_metrics_afresh(base_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.68}\n')
    train(base_config(resume=True, output_dir=str(out)))
    assert_each_step_once(out, 2, eval_steps=(0, 2))  # 0: the evaluation before training


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])  # LoRA runs keep final-adapter/ only
def test_resuming_a_finished_run_changes_nothing_and_says_so(base_config, tmp_path, capsys, lora):
    out = tmp_path / "run"
    extra = {"lora": {"enabled": True, "r": 4, "alpha": 8}} if lora else {}
    train(base_config(output_dir=str(out), **extra))
    before = snapshot(out)
    code, stdout, err = cli_train(
        capsys, write_config(tmp_path, base_config(output_dir=str(out), **extra)), "resume=true"
    )
    assert code == 0 and "already finished" in stdout, stdout + err
    assert snapshot(out) == before
    assert [r["step"] for r in metric_rows(out, "eval_loss")] == [0, 2]  # not re-appended


# ------------------------------------------------------------------------------------- locks


def test_a_live_process_on_another_host_holds_the_lock(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(runlock.RunDirLockedError, match=r"in use by pid 1 on elsewhere since 1970"):
        runlock.acquire(tmp_path)


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    path = runlock.acquire(tmp_path)
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"] > 0
    assert runlock.acquire(tmp_path) == path
    runlock.release(tmp_path)
    assert not path.exists()


def test_a_live_process_on_this_host_holds_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0})
        )
        with pytest.raises(runlock.RunDirLockedError, match=f"pid {holder.pid}"):
            runlock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    runlock.acquire(tmp_path)  # now stale: taken over
    runlock.release(tmp_path)


def test_setup_failure_releases_the_lock(base_config, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise TrainingError("model could not load")

    monkeypatch.setattr(prepare_run_module, "load_policy", broken)
    with pytest.raises(TrainingError):
        train(base_config(output_dir=str(out)))
    assert out.is_dir() and not (out / ".lock").exists()


# -------------------------------------------------------------------------- Ctrl-C and crashes


def test_ctrl_c_prints_one_line_with_the_last_checkpoint_and_the_resume_command(
    base_config, tmp_path, capsys, monkeypatch
):
    from preftune.metrics import MetricsLog

    real = MetricsLog.write

    def interrupted(self, step, values):
        real(self, step, values)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "write", interrupted)
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(max_steps=4, save_steps=2, output_dir=str(out)))
    code, _, err = cli_train(capsys, cfg, "beta=0.2")
    err = error_line(err)
    assert code == 130, err
    assert f"last checkpoint {out / 'checkpoint-2'}" in err
    assert f"continue with: preftune train {cfg} beta=0.2 resume=true" in err
    assert "Traceback" not in err and not (out / ".lock").exists()
    monkeypatch.setattr(MetricsLog, "write", real)
    assert cli.main(["train", cfg, "beta=0.2", "resume=true"]) == 0
    assert_each_step_once(out, 4, eval_steps=(0, 4))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from preftune.cli import _second_interrupt_exits\n"
        "signal.signal(signal.SIGINT, _second_interrupt_exits)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('cleaning up', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
        "print('still running')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, env=env)
    assert done.returncode == 130 and done.stdout == "cleaning up\n", (done.stdout, done.stderr)


def test_an_unexpected_error_is_one_line_with_a_traceback_log(base_config, tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(trainer_module, "apply_update", bug)
    out = tmp_path / "run"
    code, _, err = cli_train(capsys, write_config(tmp_path, base_config(output_dir=str(out))))
    err = error_line(err)
    assert code == 1, err
    log = out / "error.log"
    assert "ZeroDivisionError: division by zero second line" in err and f"full traceback: {log}" in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in bug" in text
    assert not (out / ".lock").exists()


def test_sigint_to_a_training_process_exits_130_with_one_line(base_config, tmp_path):
    """A real Ctrl-C (SIGINT) in a CLI subprocess, mid-run."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(max_steps=4, save_steps=2, output_dir=str(out)))
    done = run_harness(["sigint:after-update", "3", "train", cfg])
    assert done.returncode == 130, done.stderr[-2000:]
    line = error_line(done.stderr)
    assert f"last checkpoint {out / 'checkpoint-2'}; continue with: preftune train {cfg} resume=true" in line
    assert not (out / ".lock").exists()
