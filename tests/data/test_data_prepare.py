"""prepare_data: every split for the policy (and each reference), and its errors."""

from __future__ import annotations

import pytest

from preftune.config import ConfigError, load_config
from preftune.data.check import check_data, configured_sources
from preftune.data.prepare import prepare_data
from preftune.testing import tiny_tokenizer

from .conftest import write_jsonl


def _config(tmp_path, train: str, **extra):
    return load_config(
        {
            "model": str(tmp_path / "policy"),
            "data": {"train": train, "num_proc": 1, "on_error": "skip"},
            "method": "dpo",
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
            **extra,
        }
    )


def test_check_and_prepare_name_the_same_splits_and_refuse_no_train_data(tmp_path):
    cfg = _config(tmp_path, "train.jsonl", **{"data": {"train": "train.jsonl", "eval": "eval.jsonl"}})
    assert configured_sources(cfg) == {
        "train": ("data.train", "train.jsonl", "train"),
        "eval": ("data.eval", "eval.jsonl", "test"),
    }
    cfg.data.train = ""
    for stage in (lambda: check_data(cfg), lambda: prepare_data(cfg, None, tmp_path, unpaired=False)):
        with pytest.raises(ConfigError, match="data.train is required"):
            stage()


def test_a_split_whose_every_row_fails_to_tokenize_is_a_config_error_naming_it(tmp_path):
    long_prompt = " ".join(["word"] * 200)  # fills max_length before any completion token
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": long_prompt, "chosen": "yes", "rejected": "no"} for _ in range(3)],
    )
    cfg = _config(tmp_path, str(path), max_length=16)
    logged: list[str] = []
    with pytest.raises(ConfigError, match=f"train: no usable rows in {path}"):
        prepare_data(cfg, tiny_tokenizer(), tmp_path / "policy", unpaired=False, log=logged.append)
    assert any("skipped 3 row(s) that do not tokenize" in line for line in logged), logged
