"""Methods that reduce to another say so: MRPO whose clipping pins the other references, identical
references, and the `references` schema in `preftune config`."""

from __future__ import annotations

import json

import pytest
import yaml

from preftune.config import ConfigError, describe, load_config
from preftune.data.formatting import DEFAULT_TEMPLATE
from preftune.metrics import ClipWatch, MetricsLog, method_diagnostics

from .conftest import metric_rows


@pytest.mark.parametrize(
    "references",
    [
        ["policy", "policy"],
        ["policy", {"model": "policy"}],
        ["policy", "MODEL"],  # the policy's own path is the initial policy
        ["MODEL", "MODEL/"],  # the same directory written two ways
        ["policy", "gemma3-270m", "gemma3-270m"],
        ["policy", {"model": "MODEL", "dtype": "bf16"}, {"model": "MODEL", "dtype": "bfloat16"}],
    ],
)
def test_identical_references_are_refused_in_one_line(references, base_config, tiny_model_dir):
    refs = [
        r.replace("MODEL", str(tiny_model_dir))
        if isinstance(r, str)
        else {**r, "model": r["model"].replace("MODEL", str(tiny_model_dir))}
        for r in references
    ]
    with pytest.raises(ConfigError) as error:
        load_config(base_config(method="mrpo", references=refs))
    message = str(error.value)
    assert message.startswith("references: entries ") and "are the same reference" in message
    assert "mrpo is DPO" in message and "\n" not in message


@pytest.mark.parametrize(
    "references",
    [
        ["policy", "gemma3-270m"],
        ["policy", {"model": "MODEL", "chat_template": "{{ messages }}"}],  # the policy, scored otherwise
        ["policy", {"model": "MODEL", "dtype": "bfloat16"}],
    ],
)
def test_references_that_score_differently_are_accepted(references, base_config, tiny_model_dir):
    refs = [r if isinstance(r, str) else {**r, "model": str(tiny_model_dir)} for r in references]
    cfg = load_config(base_config(method="mrpo", references=refs))
    assert len(cfg.references) == len(references)


def test_the_policys_own_path_under_data_chat_template_is_the_policy(base_config, tiny_model_dir):
    refs = ["policy", {"model": str(tiny_model_dir), "chat_template": "{{ messages }}"}]
    with pytest.raises(ConfigError, match="entries 0 and 1 are the same reference"):
        load_config(base_config(method="mrpo", references=refs, data__chat_template="{{ messages }}"))


@pytest.mark.parametrize("key", ["chat_template", "dtype"])
def test_a_policy_entry_refuses_settings_that_do_not_apply_to_it(key, base_config):
    refs = ["gemma3-270m", {"model": "policy", key: "bfloat16"}]
    with pytest.raises(ConfigError, match=rf"references\[1\]: the `policy` reference .*remove {key}"):
        load_config(base_config(method="mrpo", references=refs))


def test_duplicate_references_are_refused_by_the_cli_before_anything_is_written(
    base_config, tmp_path, capsys
):
    from preftune import cli

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(method="mdpo", references=["policy", "policy"])))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune train: error: references: entries 0 and 1 are the same reference")
    assert not (tmp_path / "run").exists()


def test_preftune_config_documents_the_references_schema():
    text = describe()
    (line,) = [line for line in text.splitlines() if line.startswith("references (")]
    assert "keyword `policy`" in line and "{model, chat_template, dtype}" in line
    for key in ("model", "chat_template", "dtype"):
        assert any(line.startswith(f"references[].{key} (default ") for line in text.splitlines()), key


# -- the clip fraction ---------------------------------------------------------------------------


def _rows(values, every=1):
    return [{"step": (i + 1) * every, "loss": 0.69, "mrpo/clip_fraction": v} for i, v in enumerate(values)]


def test_clip_watch_warns_once_when_the_fraction_stays_above_0_9_over_the_window():
    watch = ClipWatch(clip_eps=0.1, window=10)
    said = [watch.add(row) for row in _rows([1.0] * 9)]
    assert said == [None] * 9  # fewer steps than the window: not yet
    warning = watch.add(_rows([1.0] * 10)[-1])
    assert warning and "mrpo/clip_fraction averaged 1.00 over steps 1-10" in warning
    assert "mrpo.clip_eps (now 0.1)" in warning
    assert watch.add({"step": 11, "loss": 1, "mrpo/clip_fraction": 1.0}) is None  # once
    assert watch.finish() is None


def test_clip_watch_weighs_logged_rows_by_the_steps_they_stand_for():
    watch = ClipWatch(clip_eps=0.1, window=10)
    # logging_steps 5: two rows of 5 steps each; 0.95 and 0.8 average 0.875 < 0.9
    assert [watch.add(r) for r in _rows([0.95, 0.8], every=5)] == [None, None]
    assert watch.finish() is None
    watch = ClipWatch(clip_eps=0.1, window=10)
    assert watch.add(_rows([1.0, 0.95], every=5)[0]) is None
    assert "over steps 1-10" in watch.add(_rows([1.0, 0.95], every=5)[1])


def test_clip_watch_stays_quiet_below_the_limit_and_judges_short_runs_at_the_end():
    watch = ClipWatch(clip_eps=0.1, window=10)
    for row in _rows([0.5] * 30):
        assert watch.add(row) is None
    assert watch.finish() is None
    short = ClipWatch(clip_eps=0.1, window=10)
    assert [short.add(r) for r in _rows([1.0, 1.0])] == [None, None]
    assert "over steps 1-2" in short.finish()
    assert ClipWatch(None).add({"step": 1, "loss": 0.7}) is None  # DPO rows: nothing to watch


def test_metrics_log_prints_the_clip_warning_naming_clip_eps(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"mrpo": {"clip_eps": 0.05}}))
    log = MetricsLog(tmp_path, [], enabled=True)
    log.reset()
    for row in _rows([1.0] * 10):
        log.write(row["step"], {k: v for k, v in row.items() if k != "step"})
    out = capsys.readouterr().out
    assert out.count("warning: mrpo/clip_fraction averaged 1.00") == 1
    assert "a larger mrpo.clip_eps (now 0.05)" in out
    log.close()
    assert "warning" not in capsys.readouterr().out  # said once


def test_closing_table_shows_mrpo_diagnostics_and_the_warning(base_config, tiny_model_dir):
    """A real MRPO run whose second reference is clipped on every log-prob (clip_eps 0: the band
    is the primary itself): the log warns, and the closing table lists mrpo/* with the warning."""
    from preftune.generation_eval import train_and_evaluate, train_summary

    # the second reference: the policy under another chat template, so its log-probs differ
    cfg = base_config(
        method="mrpo",
        references=["policy", {"model": str(tiny_model_dir), "chat_template": DEFAULT_TEMPLATE}],
        mrpo__clip_eps=0.0,
    )
    result, generated = train_and_evaluate(cfg)
    rows = metric_rows(result.metrics_path, "loss")
    assert [r["mrpo/clip_fraction"] for r in rows] == [1.0, 1.0]
    table = train_summary(result, generated)
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method diagnostics"))
    shown = {line.split()[0] for line in lines[start + 1 :] if line.startswith("  mrpo/")}
    assert shown == {"mrpo/alpha_0", "mrpo/alpha_1", "mrpo/clip_fraction"}
    clip_line = next(line for line in lines if line.startswith("  mrpo/clip_fraction"))
    assert clip_line.split()[1:3] == ["1.0000", "1.0000"]
    assert any(line.startswith("warning: mrpo/clip_fraction averaged 1.00 over steps 1-2") for line in lines)
    assert "mrpo.clip_eps (now 0)" in table


def test_closing_table_has_no_diagnostics_for_dpo(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    assert method_diagnostics(tmp_path / "metrics.jsonl") == []
    assert method_diagnostics(tmp_path / "missing.jsonl") == []
