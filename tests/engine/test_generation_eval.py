"""``generation_eval: true``: after training, the saved final model answers the prompts of the data.eval
rows that carry an ``answer``; the record is the one ``preftune eval --prompts`` writes, the metrics
reach metrics.jsonl and the summary, and a config that cannot work fails before any model loads."""

from __future__ import annotations

import json

import pytest
import yaml

import preftune
from preftune.cli import main
from preftune.config import ConfigError, load_config
from preftune.data import DataError, load_examples
from preftune.data.check import answer_items
from preftune.rundir import RunDir

from .conftest import arithmetic_rows, metric_rows, write_jsonl

ANSWERED = (0, 2, 3)  # the eval rows that carry an answer (JSONL lines 1, 3, 4)


def eval_rows_with_answers(n: int = 5, answered=ANSWERED) -> list[dict]:
    rows = arithmetic_rows(n, seed=11)
    for i in answered:
        rows[i]["answer"] = int(rows[i]["chosen"][0]["content"].rsplit(" ", 1)[1].rstrip("."))
    return rows


@pytest.fixture
def answers_file(tmp_path):
    return write_jsonl(tmp_path / "eval-answers.jsonl", eval_rows_with_answers())


def _gen_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation_eval_answers_exactly_the_rows_with_answers(base_config, answers_file, tmp_path):
    from preftune.generation import generate
    from preftune.models import load_causal_lm

    cfg = base_config(
        data__eval=answers_file,
        generation_eval=True,
        generation_match="numeric",
        max_new_tokens=4,
        max_steps=2,
    )
    result = preftune.train(cfg)  # the Python entry point does it too, not only the CLI
    run = result.output_dir
    (record_path,) = RunDir(run).eval_results()
    record = json.loads(record_path.read_text())
    assert record["by"] == "preftune train (generation_eval)" and record["match"] == "numeric"
    assert record["model"] == str(run / "final")
    lines = _gen_lines(run / record["generations"])
    rows = eval_rows_with_answers()
    # one generation per answered row, in file order, with that row's prompt and answer
    assert [g["row"] for g in lines] == [i + 1 for i in ANSWERED]
    assert [g["prompt"] for g in lines] == [rows[i]["prompt"] for i in ANSWERED]
    assert [g["answer"] for g in lines] == [rows[i]["answer"] for i in ANSWERED]
    # the answers are the saved final model's greedy outputs (what `preftune eval` would load)
    model, tok = load_causal_lm(str(run / "final"))
    assert [g["output"] for g in lines] == generate(
        model, tok, [g["prompt"] for g in lines], max_new_tokens=4
    )
    metrics = record["metrics"]
    assert metrics["eval_prompts_n"] == 3
    assert metrics["eval_answer_match"] == sum(g["correct"] for g in lines) / 3
    assert metrics["eval_answer_phrase"] == sum(g["reached_answer_phrase"] for g in lines) / 3
    # next to the held-out preference metrics of the final evaluation (all 5 pairs)
    final_eval = metric_rows(run, "eval_loss")[-1]
    assert record["n"] == 5 and metrics["eval_loss"] == final_eval["eval_loss"]
    # metrics.jsonl: one row at the last step, which the report merges with the final evaluation
    (logged,) = metric_rows(run, "eval_answer_match")
    assert logged["step"] == result.steps == 2
    assert logged["eval_answer_match"] == metrics["eval_answer_match"]
    assert result.last_metrics["eval_answer_match"] == metrics["eval_answer_match"]


def test_cli_train_prints_the_answer_metrics_of_a_lora_run_as_eval_would(
    base_config, answers_file, tmp_path, capsys
):
    cfg_path = tmp_path / "config.yaml"
    settings = dict(lora={"enabled": True, "r": 4, "alpha": 8}, learning_rate=1e-2, max_new_tokens=3)
    cfg_path.write_text(
        yaml.safe_dump(base_config(data__eval=answers_file, generation_eval=True, **settings))
    )
    capsys.readouterr()
    assert main(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    (record_path,) = RunDir(run).eval_results()
    record = json.loads(record_path.read_text())
    assert record["model"] == str(run / "final-adapter") and record["match"] == "contains"
    value = record["metrics"]["eval_answer_match"]
    summary = out.split("Held-out results after training", 1)[1]
    (line,) = [x.split() for x in summary.splitlines() if x.split()[:1] == ["eval_answer_match"]]
    assert line[1] == f"{value:.4f}"
    assert "eval_prompts_n" in summary and "generation_match contains" in summary
    assert str(record_path) in summary and str(run / record["generations"]) in summary

    # `preftune eval --prompts` of the same rows: the same adapter loaded, the same answers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r in eval_rows_with_answers() if "answer" in r])
    assert main(["eval", str(run), "--prompts", prompts, "--max-new-tokens", "3"]) == 0
    (other,) = [p for p in RunDir(run).eval_results() if p != record_path]
    again = json.loads(other.read_text())
    assert [g["output"] for g in _gen_lines(run / again["generations"])] == [
        g["output"] for g in _gen_lines(run / record["generations"])
    ]
    assert again["metrics"]["eval_answer_match"] == value

    # the report lists both records
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    held_out = (run / "report.md").read_text().split("## Held-out evaluation", 1)[1]
    assert record_path.name in held_out and other.name in held_out and "`eval_answer_match`" in held_out


def test_a_failed_answer_pass_keeps_the_model_and_resume_answers_without_retraining(
    base_config, answers_file, tmp_path, capsys, monkeypatch
):
    import preftune.generation_eval as evaluation

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        yaml.safe_dump(base_config(data__eval=answers_file, generation_eval=True, max_new_tokens=3))
    )

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while generating")

    monkeypatch.setattr(evaluation, "score_answers", broken)
    capsys.readouterr()
    assert main(["train", str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars of model loading come before
    run = tmp_path / "run"
    assert err.startswith("preftune train: error: generation_eval failed after training")
    assert (
        "out of memory while generating" in err
        and f"saved in {run / 'final'}" in err
        and "resume=true" in err
    )
    assert (run / "final" / "config.json").exists() and not RunDir(run).eval_results()
    steps = len(metric_rows(run, "loss"))

    monkeypatch.undo()
    assert main(["train", str(cfg_path), "resume=true"]) == 0
    assert len(metric_rows(run, "loss")) == steps  # nothing retrained
    (record_path,) = RunDir(run).eval_results()
    answered = json.loads(record_path.read_text())
    assert answered["max_new_tokens"] == 3 and len(metric_rows(run, "eval_answer_match")) == 1

    # a finished run rerun: the same answers are reused, not generated and recorded again
    def no_answers(*args, **kwargs):
        raise AssertionError("answered again")

    monkeypatch.setattr(evaluation, "score_answers", no_answers)
    capsys.readouterr()
    assert main(["train", str(cfg_path), "resume=true"]) == 0
    out = capsys.readouterr().out
    assert RunDir(run).eval_results() == [record_path] and len(metric_rows(run, "eval_answer_match")) == 1
    assert f"reused {record_path.name}" in out
    assert (
        f"{answered['metrics']['eval_answer_match']:.4f}"
        in out.split("Held-out results after training", 1)[1]
    )
    # other settings answer again: max_new_tokens changed
    monkeypatch.undo()
    assert main(["train", str(cfg_path), "resume=true", "max_new_tokens=2"]) == 0
    assert len(RunDir(run).eval_results()) == 2


def test_generation_eval_without_data_eval_is_a_config_error(base_config):
    cfg = base_config(generation_eval=True)
    del cfg["data"]["eval"]
    with pytest.raises(ConfigError, match=r"generation_eval: true needs data\.eval"):
        load_config(cfg)


@pytest.mark.parametrize("problem", ["no-answers", "numeric-text"])
def test_generation_eval_that_cannot_work_fails_before_any_model_loads(
    problem, base_config, pair_files, tmp_path, capsys, monkeypatch
):
    import preftune.prepare_run as prepare_run_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(prepare_run_module, "load_policy", no_model)
    if problem == "no-answers":
        eval_file = pair_files[1]  # preference pairs without any 'answer'
        expected = ["generation_eval", "data.eval", eval_file, "'answer'"]
    else:
        rows = eval_rows_with_answers()
        rows[2]["answer"] = "forty-two"
        eval_file = write_jsonl(tmp_path / "text-answers.jsonl", rows)
        expected = [eval_file, "line 3", "field 'answer'", "generation_match=numeric needs an integer"]
    cfg_path = tmp_path / "config.yaml"
    cfg = base_config(data__eval=eval_file, generation_eval=True, generation_match="numeric")
    cfg_path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert len(err.strip().splitlines()) == 1 and "model was loaded" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_answer_items_keep_valid_rows_and_skip_bad_answers_only_when_asked(tmp_path):
    rows = eval_rows_with_answers(6, answered=(1, 3, 4, 5))
    rows[3]["answer"] = "("  # not a regular expression
    rows[4]["answer"] = {"value": 3}  # not text or a number
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    assert load_examples(path).answers == {}  # kept only when asked: a training split holds none
    loaded = load_examples(path, with_answers=True)
    with pytest.raises(DataError, match=r"line 4, field 'answer'.*not a valid regular expression") as error:
        answer_items(loaded, "regex")
    assert "line 5" in str(error.value)  # every bad answer at once
    logged = []
    items = answer_items(loaded, "regex", on_error="skip", log=logged.append)
    assert [it["row"] for it in items] == [2, 6] and "left out 2 rows" in logged[0]
    assert [it["row"] for it in answer_items(loaded, "contains", on_error="skip", log=logged.append)] == [
        2,
        4,
        6,
    ]


@pytest.mark.distributed
def test_generation_eval_under_two_fsdp_processes_runs_once_on_rank_zero(base_config, answers_file, tmp_path):
    import sys

    import torch

    from .conftest import free_port, launch_processes, process_logs, rank_env

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    cfg = base_config(
        data__eval=answers_file,
        generation_eval=True,
        max_new_tokens=3,
        parallelism="fsdp",
        precision="fp32",
        batch_size=1,
        grad_accum=2,
    )
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    argv = [sys.executable, "-m", "preftune", "train", str(cfg_path)]
    commands = [(argv, rank_env(rank, 2, port, CUDA_VISIBLE_DEVICES="")) for rank in range(2)]
    codes, _ = launch_processes(commands, tmp_path, "geneval", timeout=600)
    logs = [(tmp_path / f"geneval-{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], process_logs(tmp_path, "geneval", 2)
    run = tmp_path / "run"
    (record_path,) = RunDir(run).eval_results()  # answered once, by rank 0, from the consolidated model
    record = json.loads(record_path.read_text())
    assert record["model"] == str(run / "final") and record["metrics"]["eval_prompts_n"] == 3
    assert "eval_answer_match" in logs[0] and "eval_answer_match" not in logs[1]
    assert len(metric_rows(run, "eval_answer_match")) == 1
