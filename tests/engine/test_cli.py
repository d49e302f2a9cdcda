"""The command line end to end on a tiny model: precompute, train, eval, report."""

import json

import pytest
import yaml

from preftune.cli import main


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
    assert state["phi_star"] > 0

    assert main(["eval", str(cfg)]) == 0  # a config names its run directory
    metrics = json.loads((run / "eval.json").read_text())
    last_eval = [json.loads(x) for x in open(run / "metrics.jsonl") if "eval_loss" in x][-1]
    # eval re-scores the final model against the cached initial policy: same numbers as training's eval
    assert metrics["eval_primary/rewards/accuracies"] == pytest.approx(
        last_eval["eval_primary/rewards/accuracies"]
    )
    assert metrics["eval_loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-4)

    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "loss.png").is_file()
    out = capsys.readouterr().out
    assert "eval_primary/rewards/accuracies" in out


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 0
    assert "preftune <command>" in capsys.readouterr().out


def test_config_command_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "mrpo.clip_eps" in out and "rpo.contrast_scope" in out and "mallows.phi_star" in out
