"""The command line end to end on a tiny model: precompute, train, eval, report."""

import json

import pytest
import yaml

from preftune.cli import main
from preftune.config import load_config
from preftune.trainer import Trainer

from .conftest import metric_rows


@pytest.fixture
def config_file(base_config, tmp_path):
    def make(**overrides):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(base_config(**overrides)))
        return path

    return make


def test_precompute_train_eval_report(config_file, tmp_path, capsys):
    cfg = config_file(method="mallows_theta", max_steps=3)
    assert main(["precompute", str(cfg)]) == 0
    cached = set((tmp_path / "cache" / "references").glob("*.safetensors"))
    assert len(cached) == 2
    assert main(["train", str(cfg), "beta=0.2"]) == 0
    assert set((tmp_path / "cache" / "references").glob("*.safetensors")) == cached  # reused
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["beta"] == 0.2 and saved["method"] == "mallows_theta"
    state = json.loads((run / "run_state.json").read_text())
    # phi* is calibrated so that the mean dispersion c(x) over the training set is 1
    check = Trainer(load_config(run / "config.yaml", [f"output_dir={tmp_path / 'check'}"]))
    assert check.phi_star == state["phi_star"]
    assert float(check.inputs.dispersion_c["train"].mean()) == pytest.approx(1.0, abs=1e-4)

    assert main(["eval", str(cfg)]) == 0  # a config names its run directory
    metrics = json.loads((run / "eval.json").read_text())
    last_eval = metric_rows(run, "eval_loss")[-1]
    # eval re-scores the final model against the cached initial policy: same numbers as training's eval
    assert metrics["eval_primary/rewards/accuracies"] == pytest.approx(
        last_eval["eval_primary/rewards/accuracies"]
    )
    assert metrics["eval_loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-4)

    assert main(["report", str(run)]) == 0
    assert (run / "loss.png").is_file()
    report = (run / "report.md").read_text()
    # report shows what eval wrote (eval.json), not only what training logged
    held_out = report.split("## Held-out evaluation", 1)[1]
    assert "`eval_primary/rewards/accuracies`" in held_out and "`eval_loss`" in held_out


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 0
    assert "preftune <command>" in capsys.readouterr().out


def test_config_command_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "mrpo.clip_eps" in out and "rpo.contrast_scope" in out and "mallows.phi_star" in out
