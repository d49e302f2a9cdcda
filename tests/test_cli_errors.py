"""Bad configuration: one line naming the key, exit code 2, and nothing of an earlier run overwritten."""

import subprocess
import sys

import pytest
import yaml

from preftune.cli import main
from preftune.config import ConfigError, load_config

# Validation runs before any model or data is touched, so these need neither.
BASE = {"model": "no-such-model", "data": {"train": "no-such-file.jsonl"}}

BAD = [
    ({"method": "mrp"}, "method", "did you mean 'mrpo'?"),
    ({"method": "mallows_thta+rpo"}, "method", "did you mean 'mallows_theta'?"),
    ({"method": "mrpo+mdpo", "references": ["policy", "x"]}, "method", "'mrpo' and 'mdpo'"),
    ({"method": "rpo+rpo_unpaired"}, "method", "'rpo' and 'rpo_unpaired'"),
    ({"method": "rpo_unpaired+mallows_theta"}, "method", "'mallows_theta'"),
    ({"method": "mrpo"}, "method", "mrpo.allow_single_reference"),
    ({"method": "mdpo", "references": ["policy"]}, "method", "at least 2 references"),
    ({"method": "dpo", "references": ["policy", "x"]}, "references", "mrpo or mdpo"),
    ({"logging_steps": 0}, "logging_steps", "at least 1"),
    ({"rpo": {"tau": 0}}, "rpo.tau", "more than 0"),
    ({"learning_rate": -1}, "learning_rate", "more than 0"),
    ({"label_smoothing": 2}, "label_smoothing", "below 0.5"),
    ({"label_smoothing": 0.5}, "label_smoothing", "below 0.5"),
    ({"beta": 0}, "beta", "more than 0"),
    ({"mallows": {"phi_star": 0}}, "mallows.phi_star", "more than 0"),
    ({"mallows": {"phi_star": -0.3}}, "mallows.phi_star", "more than 0"),
    ({"max_steps": 0}, "max_steps", "-1 or at least 1"),
    ({"max_steps": -5}, "max_steps", "-1 or at least 1"),
    ({"epochs": 0}, "epochs", "more than 0"),
    ({"save_steps": -1}, "save_steps", "at least 0"),
    ({"eval_steps": -2}, "eval_steps", "at least 0"),
    ({"warmup_ratio": 1.5}, "warmup_ratio", "at most 1"),
    ({"adam_betas": [0.9, 1.0]}, "adam_betas[1]", "below 1"),
    ({"adam_betas": [0.9]}, "adam_betas", "two numbers"),
    ({"rpo": {"diagonal_weight": 1.5}}, "rpo.diagonal_weight", "at most 1"),
    (
        {"method": "mrpo", "references": ["policy", "x"], "mrpo": {"weights": [1, 2, 3]}},
        "mrpo.weights",
        "3 weights",
    ),
    (
        {"method": "mrpo", "references": ["policy", "x"], "mrpo": {"weights": [0, 0]}},
        "mrpo.weights",
        "all be zero",
    ),
    ({"mrpo": {"clip_eps": -0.1}}, "mrpo.clip_eps", "at least 0"),
    ({"method": "mrpo", "references": ["policy", "x"], "reference_free": True}, "reference_free", "mrpo"),
    ({"lr_scheduler": "step"}, "lr_scheduler", "one of linear, cosine, constant"),
    ({"learning_rate": float("nan")}, "learning_rate", "more than 0"),
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case[0].items())


@pytest.mark.parametrize("data, key, message", BAD, ids=[_ids(c) for c in BAD])
def test_bad_value_is_one_line_naming_the_key_with_exit_code_2(data, key, message, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "run"), **data}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preftune train: error: "), err
    assert key in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing was created


def test_bad_override_is_caught_the_same_way(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["train", str(path), "max_steps=0"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_invalid_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("model: m\nbeta: [0.1\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML" in err and str(path) in err


def test_an_earlier_run_keeps_its_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("earlier: run\n")
    (run / "run_state.json").write_text('{"earlier": true}')
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(run), "method": "MRPO+mdpo"}))
    assert main(["train", str(path)]) == 2
    assert (run / "config.yaml").read_text() == "earlier: run\n"
    assert (run / "run_state.json").read_text() == '{"earlier": true}'
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "run_state.json"]


def test_the_process_exits_2_with_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "method": "mallows-thta"}))
    out = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "did you mean 'mallows_theta'?" in out.stderr


@pytest.mark.parametrize(
    "data",
    [
        {"max_steps": -1},
        {"max_steps": 3, "epochs": 0.5},
        {"label_smoothing": 0.49},
        {"method": "mrpo", "mrpo": {"allow_single_reference": True}},
        {"method": "mrpo", "references": ["policy", "x"], "mrpo": {"weights": [1, 0]}},
        {"mallows": {"phi_star": 0.29}},
    ],
)
def test_good_values_pass(data):
    load_config({**BASE, **data})


def test_method_spelling_is_canonicalised():
    cfg = load_config({**BASE, "method": "Mallows-Theta+RPO"})
    assert cfg.method == "mallows_theta+rpo"


def test_a_config_error_is_also_a_value_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^rpo\.tau must be more than 0, got 0"):
        load_config({"rpo": {"tau": 0}})


def test_eval_prompts_file_problems_name_the_file_line_and_field(tmp_path):
    """`preftune eval --prompts`: a missing file was a bare "[Errno 2] ..." and a row without its answer
    "FILE:4: needs the fields 'prompt' and 'answer'", unlike the data errors (file, line, field)."""
    from preftune.held_out import _read_prompts

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"nope.jsonl: file not found \(set by --prompts\)"):
        _read_prompts(missing)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "Capital of Peru?", "answer": "Lima"}\n\n{"prompt": "Capital of Chile?"}\n')
    with pytest.raises(ConfigError, match=r"qa.jsonl, line 3, field 'answer': missing .*found: 'prompt'"):
        _read_prompts(qa)
    qa.write_text('["Capital of Peru?", "Lima"]\n')
    with pytest.raises(ConfigError, match=r"qa.jsonl, line 1: not a JSON object"):
        _read_prompts(qa)
    qa.write_text('{"prompt": "Capital of Peru?", "answer": "Lima"}\n')
    assert _read_prompts(qa) == [{"prompt": "Capital of Peru?", "answer": "Lima"}]


def test_empty_answers_get_a_line_saying_why_they_may_be_empty():
    """A chat model given plain-text prompts answered "" before and after training: the table showed
    0 → 0 with nothing to say why."""
    from preftune.held_out import empty_answers_note

    plain = [{"prompt": "Capital of Peru?", "answer": "Lima"}] * 2
    chat = [{"prompt": [{"role": "user", "content": "Capital of Peru?"}], "answer": "Lima"}] * 2
    empty, full = {"output": " "}, {"output": "The capital of Peru is Lima."}
    note = empty_answers_note([empty, full], [empty, empty], plain)
    assert note.startswith("1 of 2 answers are empty (2 of the initial model's)")
    assert "as chat messages" in note
    assert "chat messages" not in empty_answers_note([empty, full], None, chat)
    assert empty_answers_note([full, full], [full, full], plain) is None
