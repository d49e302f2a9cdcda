"""``resume: auto``: one command for the first start and every restart; refused only when output_dir
holds something else than this run."""

from __future__ import annotations

import pytest

from preftune import autoresume
from preftune.config import load_config

from .test_inputs_guard import digest
from .test_run_guards import cli_train, error_line, write_config


def test_an_empty_directory_starts_fresh_and_the_finished_run_is_left_alone(base_config, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(output_dir=str(out), resume="auto"))
    code, stdout, err = cli_train(capsys, cfg)
    assert code == 0, err
    assert f"resume: auto: {out} holds no earlier run; starting fresh" in stdout
    before = digest(out)
    code, stdout, err = cli_train(capsys, cfg)  # the same command again: nothing to do
    assert code == 0 and "already finished" in stdout, stdout + err
    assert "holds this run; resuming from checkpoint-2" in stdout
    assert digest(out) == before


def test_another_runs_directory_is_refused_naming_what_differs(base_config, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(output_dir=str(out)))
    assert cli_train(capsys, cfg)[0] == 0
    before = digest(out)
    code, _, err = cli_train(capsys, cfg, "resume=auto", "beta=0.3")
    line = error_line(err)
    assert code == 1, err
    assert f"resume: auto: {out} holds another run (config differs: beta: 0.1 -> 0.3)" in line, line
    assert "pass resume=true to continue it anyway" in line
    assert digest(out) == before
    # what may change between restarts: where it reports, how often it saves, timeouts
    code, stdout, err = cli_train(capsys, cfg, "resume=auto", "save_steps=1", "preemption_grace_s=100")
    assert code == 0 and "already finished" in stdout, err


def test_outputs_without_a_config_are_refused(base_config, tmp_path):
    from preftune.checkpointing import TrainingError

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"holds outputs \(checkpoint-3\) but no readable config.yaml"):
        autoresume.resolve(load_config(base_config(output_dir=str(out), resume="auto")), log=lambda m: None)


def test_this_run_stopped_before_its_first_checkpoint_starts_again_from_step_0(base_config, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, base_config(output_dir=str(out), resume="auto"))
    assert cli_train(capsys, cfg)[0] == 0
    for p in out.glob("checkpoint-*"):  # as if killed after some metrics rows, before checkpoint-2
        import shutil

        shutil.rmtree(p)
    shutil.rmtree(out / "final")
    code, stdout, err = cli_train(capsys, cfg)
    assert code == 0, err
    assert "holds this run; resuming from step 0 (it has no checkpoint yet)" in stdout
    assert (out / "final").is_dir()


def test_resume_accepts_only_true_false_or_auto(base_config):
    from preftune.config import ConfigError

    with pytest.raises(ConfigError, match=r"resume: 'sometimes' is not `auto`"):
        load_config(base_config(resume="sometimes"))
