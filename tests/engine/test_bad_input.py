"""Bad input through the engine and the CLI: a clear error naming what is wrong, and nothing already
written is lost (an earlier run's checkpoints, final model and metrics stay as they were)."""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from preftune import cli, statefile
from preftune.trainer import TrainingError, train

from .conftest import arithmetic_rows, losses_by_step, write_jsonl

# --------------------------------------------------------------------------------------------- helpers


def run_cli(capsys, tmp_path, cfg: dict, *overrides: str) -> tuple[int, str, str]:
    """``preftune train cfg.yaml [overrides]`` -> (exit code, stdout, stderr)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = cli.main(["train", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its content."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture
def bad_rows_file(tmp_path):
    """Eight good pairs with a malformed JSON line 3 and an empty rejected completion on line 6."""
    lines = [json.dumps(r) for r in arithmetic_rows(8, seed=4)]
    lines.insert(2, '{"prompt": "What is 1 plus 1?", "chosen": "2"')  # line 3: truncated object
    bad = arithmetic_rows(1, seed=9)[0]
    bad["rejected"] = [{"role": "assistant", "content": "   "}]
    lines.insert(5, json.dumps(bad))  # line 6
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def finished_run(base_config, tmp_path_factory):
    """A completed run (checkpoint, final model, metrics) whose directory later runs must not damage."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train(base_config(output_dir=str(out), save_steps=1))
    return out


# ------------------------------------------------------------------------------------------------ data


def test_malformed_jsonl_line_names_file_and_line(base_config, bad_rows_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path, base_config(data={"train": bad_rows_file}))
    assert code == 2
    assert bad_rows_file in err and "line 3" in err and "invalid JSON" in err
    assert "Traceback" not in err


def test_missing_column_names_it_and_suggests_the_mapping(base_config, tmp_path, capsys):
    rows = [
        {"prompt": r["prompt"], "chosen_response": r["chosen"], "rejected": r["rejected"]}
        for r in arithmetic_rows(4)
    ]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    code, _, err = run_cli(capsys, tmp_path, base_config(data={"train": path}))
    assert code == 2
    assert path in err and "missing column 'chosen'" in err
    assert "Did you mean 'chosen_response'?" in err and "data.columns" in err


@pytest.mark.parametrize("problem", ["missing-file", "missing-columns", "bad-rows"])
def test_data_errors_come_before_any_model_loads(problem, base_config, tmp_path, capsys, monkeypatch):
    import preftune.prepare_run as prepare_run_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(prepare_run_module, "load_policy", no_model)
    rows = arithmetic_rows(6)
    if problem == "missing-file":
        cfg = base_config(data__eval=str(tmp_path / "no-such-eval.jsonl"))
        expected = [str(tmp_path / "no-such-eval.jsonl"), "data.eval", "file not found"]
    elif problem == "missing-columns":
        rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
        cfg = base_config(data__train=write_jsonl(tmp_path / "cols.jsonl", rows))
        expected = ["data.columns.prompt=question", "data.columns.chosen=good", "data.columns.rejected=bad"]
    else:
        rows[1]["chosen"] = rows[4]["rejected"] = [{"role": "assistant", "content": ""}]
        cfg = base_config(data__train=write_jsonl(tmp_path / "rows.jsonl", rows))
        expected = ["line 2, field 'chosen'", "line 5, field 'rejected'", "2 bad rows"]
    code, _, err = run_cli(capsys, tmp_path, cfg)
    assert code == 2, err
    assert all(part in err for part in expected), err
    assert "Traceback" not in err and "model was loaded" not in err


def test_empty_completion_names_line_and_field(base_config, tmp_path, capsys):
    rows = arithmetic_rows(6)
    rows[3]["rejected"] = [{"role": "assistant", "content": ""}]
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    code, _, err = run_cli(capsys, tmp_path, base_config(data={"train": path}))
    assert code == 2
    assert f"{path}, line 4, field 'rejected': empty completion" in err


def test_prompt_longer_than_max_length_names_row_and_remedy(base_config, tmp_path, capsys):
    rows = arithmetic_rows(6)
    rows[2]["prompt"] = [{"role": "user", "content": "Please add these numbers carefully. " * 20}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    code, _, err = run_cli(capsys, tmp_path, base_config(data={"train": path}, max_length=64))
    assert code == 2
    assert f"{path}, line 3, field 'prompt'" in err and "max_length=64" in err


def test_on_error_skip_skips_bad_rows_logs_the_counts_and_trains(
    base_config, bad_rows_file, tmp_path, capsys
):
    # line 3 (malformed) and line 6 (empty completion) are dropped while loading; the prompt of
    # line 9 (the 7th good pair) does not fit max_length and is dropped while tokenizing
    text = open(bad_rows_file).read().splitlines()
    long_row = json.loads(text[8])
    long_row["prompt"] = [{"role": "user", "content": "Please add these numbers carefully. " * 20}]
    text[8] = json.dumps(long_row)
    open(bad_rows_file, "w").write("\n".join(text) + "\n")
    cfg = base_config(data={"train": bad_rows_file, "on_error": "skip"}, max_length=64)
    code, out, err = run_cli(capsys, tmp_path, cfg)
    assert code == 0, err
    assert "train: skipped 2 bad rows" in out
    assert "line 3 (invalid JSON" in out and "line 6 ('rejected': empty completion)" in out
    assert "skipped 1 row" in out and "max_length=64" in out
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["data"]["train/rows"] == {"read": 10, "skipped": 2, "skipped_rows": [3, 6]}
    assert state["data"]["train/policy"] == {"total": 8, "truncated": 0, "skipped": 1}
    assert sorted(losses_by_step(tmp_path / "run" / "metrics.jsonl")) == [1, 2]


def test_bad_data_leaves_an_earlier_run_untouched(base_config, bad_rows_file, finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    cfg = base_config(output_dir=str(finished_run), data={"train": bad_rows_file}, resume=True)
    code, _, err = run_cli(capsys, tmp_path, cfg)
    assert code == 2 and "line 3" in err
    assert snapshot(finished_run) == before


# ---------------------------------------------------------------------------------------------- models


def test_missing_reference_path_is_named(base_config, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, tmp_path, base_config(method="mrpo", references=["policy", str(missing)]))
    assert code == 2
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from preftune.testing import tiny_tokenizer

    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(path)
    tiny_tokenizer(512).save_pretrained(path)
    return path


@pytest.mark.parametrize("role", ["model", "reference"])
def test_a_model_that_is_not_a_causal_lm_is_refused(role, base_config, bert_dir, tmp_path, capsys):
    if role == "model":
        cfg = base_config(model=str(bert_dir))
    else:
        cfg = base_config(method="mrpo", references=["policy", str(bert_dir)])
    code, _, err = run_cli(capsys, tmp_path, cfg)
    assert code == 2, err
    assert str(bert_dir) in err and "not a causal language model" in err and "BertModel" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- output / disk


def test_unwritable_output_dir_is_named_with_the_reason(base_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "run"  # root may write anywhere, but never below a regular file
    code, _, err = run_cli(capsys, tmp_path, base_config(output_dir=str(target)))
    assert code == 1
    assert f"output_dir {target} is not writable" in err and "Not a directory" in err
    assert blocker.read_text() == "not a directory"
    with pytest.raises(TrainingError, match="is not writable"):
        train(base_config(output_dir=str(target)))


def test_disk_full_at_the_second_checkpoint_keeps_the_first_and_resume_finishes(
    base_config, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    cfg = base_config(max_steps=6, save_steps=2, output_dir=str(out))
    real_save = statefile.save_state

    def save(obj, directory, name):
        if "checkpoint-4" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real_save(obj, directory, name)

    monkeypatch.setattr(statefile, "save_state", save)
    code, _, err = run_cli(capsys, tmp_path, cfg)
    assert code == 1
    assert f"could not write {out / 'checkpoint-4'}: No space left on device" in err
    assert f"{out / 'checkpoint-2'} is intact: rerun with resume=true" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "final").exists()
    before_crash = losses_by_step(out / "metrics.jsonl")
    assert sorted(before_crash) == [1, 2, 3, 4]
    first = snapshot(out / "checkpoint-2")
    assert {"trainer_state.json", "optimizer.json", "scheduler.safetensors", "rng.json"} <= set(first)

    # a fresh start is refused (it would mix two runs), resume finishes from step 2
    with pytest.raises(TrainingError, match="resume=true"):
        train(cfg)
    monkeypatch.setattr(statefile, "save_state", real_save)
    result = train({**cfg, "resume": True})
    assert result.steps == 6 and (out / "final" / "config.json").is_file()
    logged = [json.loads(line)["step"] for line in open(result.metrics_path) if '"loss"' in line]
    assert logged == [1, 2, 3, 4, 5, 6]  # the failed run's steps 3-4 were replaced, not duplicated
    resumed = losses_by_step(result.metrics_path)
    for step in (3, 4):  # resumed from checkpoint-2, the run retraces the steps the failed one took
        assert resumed[step] == pytest.approx(before_crash[step], abs=1e-6)
    assert (out / "checkpoint-6").is_dir()


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_config_key_exits_2_and_suggests_the_right_one(where, base_config, tmp_path, capsys):
    cfg = base_config()
    overrides = []
    if where == "file":
        cfg["learning_rat"] = cfg.pop("learning_rate")
    else:
        overrides = ["data.on_eror=skip"]
    code, _, err = run_cli(capsys, tmp_path, cfg, *overrides)
    assert code == 2
    if where == "file":
        assert "Unknown config key `learning_rat`" in err and "Did you mean `learning_rate`?" in err
    else:
        assert "Unknown config key `data.on_eror`" in err and "Did you mean `data.on_error`?" in err
    assert not (tmp_path / "run").exists()  # rejected before anything is written


# ------------------------------------------------------------------------------- fifty bad inputs


def run_bad_input(case: str, base_config, tmp_path, capsys) -> tuple[int, str]:
    """Run one case of bad_input_cases through ``preftune train``: (exit code, stderr)."""
    from .bad_input_cases import CASES

    config, overrides = CASES[case](tmp_path, base_config)
    path = tmp_path / "case.yaml"
    if isinstance(config, dict):
        path.write_text(yaml.safe_dump(config))
    elif isinstance(config, str):
        path.write_text(config)
    capsys.readouterr()
    code = cli.main(["train", str(path), *overrides])
    return code, capsys.readouterr().err


def _case_names():
    from .bad_input_cases import CASES

    return list(CASES)


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_with_exit_code_2(case, base_config, tmp_path, capsys):
    code, err = run_bad_input(case, base_config, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("preftune ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("preftune train: error: ") and len(lines[0]) < 600, lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run directory is created
