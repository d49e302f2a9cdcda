"""Held-out numbers with their yardsticks (tiny models): ``eval_initial/*`` against the initial policy
beside TRL's reference-relative ``eval_rewards/*``, the closing table grouped by yardstick, eval
records that say which model they evaluated, and ``preftune eval --prompts`` before and after."""

import json
import math

import pytest
import yaml

from preftune import generation
from preftune.cli import main
from preftune.generation_eval import train_summary
from preftune.report import load_run, write_comparison, write_report
from preftune.trainer import train

from .conftest import arithmetic_rows, metric_rows, write_jsonl


def _groups(table: str) -> dict[str, list[str]]:
    """The closing table's metric keys under each ``  vs YARDSTICK:`` heading."""
    groups, current = {}, None
    for line in table.splitlines():
        if line.startswith("  vs ") and line.endswith(":"):
            current = groups.setdefault(line[5:-1], [])
        elif line.startswith("    eval_") and current is not None:
            current.append(line.split()[0])
        elif not line.startswith("    "):
            current = None
    return groups


def test_mrpo_reports_both_yardsticks_and_says_which_is_which(base_config, other_tokenizer_model_dir):
    result = train(base_config(method="mrpo", references=["policy", str(other_tokenizer_model_dir)]))
    evals = metric_rows(result.metrics_path, "eval_loss")
    before = evals[0]
    # against the initial policy the step-0 policy is a tie; against the virtual reference it is not
    assert before["eval_initial/rewards/accuracies"] == 0.5
    assert before["eval_initial/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert abs(before["eval_loss"] - math.log(2)) > 1e-3
    assert before["eval_rewards/margins"] != pytest.approx(0.0, abs=1e-5)
    table = train_summary(result)
    groups = _groups(table)
    assert "eval_initial/rewards/accuracies" in groups["the initial policy"]
    virtual = groups["the MRPO virtual reference of the 2 references"]
    assert "eval_loss" in virtual and "eval_rewards/accuracies" in virtual
    assert "eval_logps/accuracies" in groups["no reference (the policy's own log-probs)"]
    assert "need not be ln 2" in table  # the note that explains the step-0 loss
    # report.md: every held-out metric with what it is measured against
    final = write_report(result.output_dir, plots=False).read_text().split("## Final metrics", 1)[1]
    row = next(line for line in final.splitlines() if line.startswith("| `rewards/accuracies`"))
    assert row.rstrip(" |").endswith("the MRPO virtual reference of the 2 references")
    row = next(line for line in final.splitlines() if line.startswith("| `initial/rewards/accuracies`"))
    assert row.rstrip(" |").endswith("the initial policy")


def test_dpo_groups_its_reference_with_the_initial_policy(base_config):
    result = train(base_config(method="dpo"))
    groups = _groups(train_summary(result))
    assert {"eval_initial/rewards/accuracies", "eval_rewards/accuracies", "eval_loss"} <= set(
        groups["the initial policy"]
    )
    assert "ln 2" not in train_summary(result)
    last = metric_rows(result.metrics_path, "eval_loss")[-1]
    # DPO's reference is the initial policy: the two yardsticks give the same numbers
    assert last["eval_initial/rewards/margins"] == pytest.approx(last["eval_rewards/margins"], abs=1e-5)


def test_initial_policy_that_is_not_reference_zero_is_still_the_yardstick(
    base_config, other_tokenizer_model_dir, tmp_path
):
    cfg = base_config(method="mrpo", references=[str(other_tokenizer_model_dir), "policy"])
    result = train(cfg)
    evals = metric_rows(result.metrics_path, "eval_loss")
    assert evals[0]["eval_initial/rewards/accuracies"] == 0.5  # reference 1 is the initial policy
    assert not (result.output_dir / "held_out_initial.json").exists()  # a reference is the yardstick
    assert main(["eval", str(result.output_dir)]) == 0
    (saved,) = result.output_dir.glob("eval-*.json")
    record = json.loads(saved.read_text())
    assert record["evaluated"] == "final" and record["checkpoint"] is None
    for key in ("eval_initial/rewards/margins", "eval_initial/rewards/accuracies", "eval_loss"):
        assert record["metrics"][key] == pytest.approx(evals[-1][key], abs=1e-4), key


def test_reference_free_runs_keep_the_initial_scores_through_a_resume(base_config, tmp_path):
    cfg = base_config(method="simpo", max_steps=4, eval_steps=2, save_steps=2)
    result = train(cfg)
    rows = metric_rows(result.metrics_path, "eval_loss")
    assert [r["eval_initial/rewards/accuracies"] for r in rows][:1] == [0.5]
    # a resumed run (the step-0 pass is not run again) measures against the kept step-0 scores
    resumed_dir = tmp_path / "resumed"
    train(base_config(method="simpo", max_steps=2, save_steps=2, output_dir=str(resumed_dir)))
    train(
        base_config(
            method="simpo", max_steps=4, eval_steps=2, save_steps=2, output_dir=str(resumed_dir), resume=True
        )
    )
    resumed = metric_rows(resumed_dir, "eval_loss")
    assert resumed[-1]["step"] == 4
    assert resumed[-1]["eval_initial/rewards/margins"] == pytest.approx(
        rows[-1]["eval_initial/rewards/margins"], abs=1e-4
    )
    # and `preftune eval` of the same data uses them too
    assert main(["eval", str(result.output_dir)]) == 0
    (saved,) = result.output_dir.glob("eval-*.json")
    metrics = json.loads(saved.read_text())["metrics"]
    assert metrics["eval_initial/rewards/margins"] == pytest.approx(
        rows[-1]["eval_initial/rewards/margins"], abs=1e-4
    )


def test_eval_of_another_model_is_labelled_and_never_the_runs_result(base_config, tiny_model_dir, tmp_path):
    runs = {}
    for name in ("a", "b"):
        result = train(base_config(output_dir=str(tmp_path / name)))
        runs[name] = result.output_dir
    assert main(["eval", str(runs["a"])]) == 0  # the final model
    assert main(["eval", str(runs["a"]), "--checkpoint", str(tiny_model_dir)]) == 0  # the base model, later
    assert main(["eval", str(runs["b"]), "--checkpoint", "checkpoint-2"]) == 0  # a folder of the run
    records = {json.loads(p.read_text())["evaluated"]: p for p in runs["a"].glob("eval-*.json")}
    assert set(records) == {"final", "other model"}
    (b_record,) = runs["b"].glob("eval-*.json")
    assert json.loads(b_record.read_text())["evaluated"] == "checkpoint-2"
    run_a = load_run(runs["a"])
    base = json.loads(records["other model"].read_text())
    assert base["checkpoint"] == str(tiny_model_dir)
    assert run_a.held_out == json.loads(records["final"].read_text())["metrics"]  # not the newer base eval
    assert run_a.held_out["eval_initial/rewards/margins"] != base["metrics"]["eval_initial/rewards/margins"]
    text = write_comparison([run_a, load_run(runs["b"])], tmp_path / "cmp").read_text()
    held_out = text.split("## Held-out evaluation", 1)[1].split("## Evaluations of other models", 1)[0]
    assert records["final"].name in held_out and records["other model"].name not in held_out
    assert "| b |" not in held_out  # b has no evaluation of its final model
    others = text.split("## Evaluations of other models", 1)[1]
    assert records["other model"].name in others and "checkpoint-2" in others
    # the run's own report labels the column of the base model
    single = write_report(runs["a"], plots=False).read_text().split("## Held-out evaluation", 1)[1]
    assert "**other model**" in single and "final model" in single


def test_eval_prompts_reports_before_and_after_with_the_initial_answers_cached(
    base_config, tmp_path, capsys, monkeypatch
):
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(max_steps=2, learning_rate=1e-2)))
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "run"
    prompts = write_jsonl(
        tmp_path / "capitals.jsonl", [{"prompt": r["prompt"], "answer": "7"} for r in arithmetic_rows(3, 5)]
    )
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["eval", str(run), "--prompts", prompts, "--max-new-tokens", "4"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(calls) == 2  # the trained model, then the initial model
    (result,) = run.glob("eval-*.json")
    assert result.name.startswith("eval-eval+capitals-")  # the data, then the prompts file
    record = json.loads(result.read_text())
    assert record["generations"].startswith("eval-eval+capitals-")
    before = record["before"]
    assert before["model"] == base_config()["model"] and before["cached"] is False
    initial_lines = (run / before["generations"]).read_text().splitlines()
    assert len(initial_lines) == 3
    assert before["metrics"]["eval_answer_match"] == sum(json.loads(x)["correct"] for x in initial_lines) / 3
    match_line = next(line for line in out.splitlines() if "eval_answer_match" in line)
    assert "→" in match_line  # before → after
    # contains matching on any data: no "The answer is N" metric
    assert "eval_answer_phrase" not in record["metrics"] and "eval_answer_phrase" not in out

    calls.clear()
    assert main([*args, "--match", "numeric"]) == 0  # another match mode rescores the cached outputs
    out = capsys.readouterr().out
    assert len(calls) == 1  # only the trained model generated
    newest = max(run.glob("eval-*.json"), key=lambda p: p.stat().st_mtime_ns)
    record = json.loads(newest.read_text())
    assert record["before"]["cached"] is True and "reused from the cache" in out
    assert "eval_answer_phrase" in record["metrics"] and "eval_answer_phrase" in record["before"]["metrics"]
    # the run's report shows the answers before → after, per eval call
    held_out = write_report(run, plots=False).read_text().split("## Held-out evaluation", 1)[1]
    row = next(line for line in held_out.splitlines() if line.startswith("| `eval_answer_match`"))
    assert row.count("→") == 2  # both calls


def test_eval_checkpoint_accepts_a_preset_name(base_config, tiny_model_dir, tmp_path, monkeypatch):
    from preftune.models import loading, presets

    result = train(base_config())
    # a preset named "tiny-preset", resolved as `model:` resolves presets (here: to the tiny model)
    monkeypatch.setitem(presets.PRESETS, "tiny-preset", presets.PRESETS["smollm2-135m-instruct"])
    asked = []
    monkeypatch.setattr(loading, "resolve_model", lambda name, **_: asked.append(name) or tiny_model_dir)
    assert main(["eval", str(result.output_dir), "--checkpoint", "tiny-preset"]) == 0
    assert asked[0] == "tiny-preset"
    (saved,) = result.output_dir.glob("eval-*.json")
    record = json.loads(saved.read_text())
    assert record["checkpoint"] == "tiny-preset" and record["evaluated"] == "other model"
    assert record["model"] == str(tiny_model_dir)
    assert main(["eval", str(result.output_dir), "--checkpoint", "no-such-preset"]) == 2
