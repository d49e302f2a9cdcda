"""The typed config: YAML + overrides, unknown keys rejected with a suggestion, saved resolved."""

from pathlib import Path

import pytest

from preftune.config import ConfigError, describe, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nmethod: mrpo\nmrpo: {clip_eps: 0.2}\nreferences: [policy, other]\n")
    cfg = load_config(path, ["beta=0.3", "mrpo.weights=[1, 3]", "lora.enabled=true", "data.train=x.jsonl"])
    assert cfg.beta == 0.3 and cfg.mrpo.clip_eps == 0.2 and cfg.mrpo.weights == [1.0, 3.0]
    assert cfg.lora.enabled is True and cfg.data.train == "x.jsonl"
    assert [r.model for r in cfg.references] == ["policy", "other"]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config({"model": "m", "mallows": {"phi_star": 0.29}, "rpo": {"tau": 0.25}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"learning_rat": 1e-5}, "Did you mean `learning_rate`"),
        ({"mrpo": {"clip_epsilon": 0.1}}, "Did you mean `mrpo.clip_eps`"),
        ({"beta": "big"}, "beta"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"mrpo": {"clip": "soft"}}, "mrpo.clip"),
        ({"mallows": {"phi_star": "sometimes"}}, "mallows.phi_star"),
        ({"rpo": {"contrast_scope": "world"}}, "rpo.contrast_scope"),
    ],
)
def test_bad_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(data)


def test_numbers_are_numbers_and_quoted_numbers_are_refused(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as text; preftune reads it as the number YAML 1.2 and users mean,
    # so the only text that reaches a numeric key is a quoted one, refused like any other wrong type.
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlearning_rate: 5e-6\nadam_eps: 1E-8\n")
    cfg = load_config(path, ["weight_decay=1e-2"])
    assert (cfg.learning_rate, cfg.adam_eps, cfg.weight_decay) == (5e-6, 1e-8, 1e-2)
    path.write_text('model: m\nbeta: "0.1"\n')
    with pytest.raises(ConfigError, match=r"beta: expected a number, got the text '0.1'"):
        load_config(path)
    with pytest.raises(ConfigError, match="max_steps: expected a number"):
        load_config({"model": "m", "max_steps": "3"})


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config({}, ["beta"])


def test_config_reference_doc_is_current():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert describe() in doc, "docs/config.md is stale: regenerate it from preftune.config.describe()"


def test_allowed_values_come_from_field_metadata_and_show_in_the_reference():
    import dataclasses

    from preftune.config import TrainConfig

    text = describe()
    ranged = [f for f in dataclasses.fields(TrainConfig) if "range" in f.metadata]
    assert len(ranged) > 10
    for f in ranged:
        assert (
            f"{f.name} (default {f.default!r}; {f.metadata['range']})" in text
            or f.default is dataclasses.MISSING
        )
    assert "max_steps (default -1; -1 or at least 1)" in text
    assert "label_smoothing (default 0.0; at least 0 and below 0.5)" in text
