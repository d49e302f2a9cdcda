"""Inputs are never deleted or mixed into: checked before anything is created, cleared or written."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from preftune.config import ConfigError, load_config
from preftune.inputs_guard import check_inputs
from preftune.trainer import train

from .test_run_guards import cli_train, error_line, write_config


def digest(directory) -> dict[str, str]:
    """Every file under ``directory`` (names included) with its sha256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_model_inside_the_outputs_that_overwrite_would_clear_is_refused_intact(
    base_config, tmp_path, capsys
):
    out = tmp_path / "run"
    train(base_config(output_dir=str(out)))
    model = out / "final"
    before, run_before = digest(model), digest(out)
    cfg = write_config(tmp_path, base_config(output_dir=str(out), model=str(model)))
    code, _, err = cli_train(capsys, cfg, "overwrite_output_dir=true")
    line = error_line(err)
    assert code == 2, err
    assert f"model {model} is inside final of output_dir {out}" in line, line
    assert "overwrite_output_dir=true would delete it first" in line
    assert digest(model) == before and digest(out) == run_before  # nothing cleared, nothing written
    code, _, err = cli_train(capsys, cfg, "resume=true")  # would replace final/ at the end
    assert code == 2 and "which this run writes" in error_line(err)
    assert digest(model) == before


def test_output_dir_equal_to_or_inside_the_model_directory_is_refused(
    tiny_model_dir, base_config, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = digest(model)
    for out in (model, model / "runs" / "a"):
        cfg = write_config(tmp_path, base_config(output_dir=str(out), model=str(model)))
        code, _, err = cli_train(capsys, cfg)
        line = error_line(err)
        assert code == 2, err
        where = "is" if out == model else "is inside"
        assert f"output_dir {out} {where} the input model {model}" in line, line
        assert digest(model) == before and not (model / "runs").exists()


@pytest.mark.parametrize("key", ["data__train", "references", "cache_dir"])
def test_every_input_is_checked(key, base_config, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    inside = out / "checkpoint-4"
    inside.mkdir(parents=True)
    values = {
        "data__train": {"data__train": str(inside / "train.jsonl")},
        "references": {
            "references": [{"model": str(inside)}],
            "method": "mrpo",
            "mrpo__allow_single_reference": True,
        },
        "cache_dir": {"cache_dir": str(inside)},
    }[key]
    if key == "data__train":
        (inside / "train.jsonl").write_text("{}\n")
    cfg = load_config(base_config(output_dir=str(out), **values))
    with pytest.raises(ConfigError, match=r"is inside checkpoint-4 of output_dir"):
        check_inputs(cfg)


def test_the_demo_layout_is_allowed(base_config, tmp_path):
    """data/ inside the run directory (the demo's copy) and a cache next to it are inputs, not outputs."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("{}\n")
    check_inputs(load_config(base_config(output_dir=str(out), data__train=str(out / "data" / "train.jsonl"))))
