"""Every failure a user can cause is one line: a YAML tag in an override is a config error naming the
key (exit 2); a full disk while writing a checkpoint, the final model, a cache entry or metrics is one
storage error naming the path and the free space, the partial directory removed, the intact
checkpoint named (exit 1), whatever library raised it (OSError, SafetensorError, DCP)."""

from __future__ import annotations

import errno

import pytest
import safetensors.torch
from safetensors import SafetensorError

from preftune import cli
from preftune import metrics as metrics_module
from preftune.storage import StorageError, storage_reason

from .test_run_guards import cli_train, error_line, write_config

FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def test_a_yaml_tag_in_an_override_is_a_config_error_naming_the_key(
    base_config, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, base_config(output_dir=str(tmp_path / "run")))
    code, _, err = cli_train(capsys, cfg, 'beta=!!python/object/apply:os.system ["touch x"]')
    line = error_line(err)
    assert code == 2, err
    assert line.startswith("preftune train: error: beta: the override value '!!python/object/apply:os.system")
    assert "unexpected" not in line and "ConstructorError" not in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "run").exists()  # nothing ran, nothing written
    code, _, err = cli_train(capsys, cfg, "mrpo.clip_eps=[0.1, 0.2")  # broken syntax: the same
    assert code == 2 and "error: mrpo.clip_eps: the override value '[0.1, 0.2'" in error_line(err)


def test_a_full_disk_in_a_checkpoint_via_safetensors_is_one_line_without_leftovers(
    base_config, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-4.tmp" in str(filename):
            raise SafetensorError(FULL)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cfg = write_config(tmp_path, base_config(max_steps=6, save_steps=2, output_dir=str(out)))
    code, _, err = cli_train(capsys, cfg)
    line = error_line(err)
    assert code == 1, err
    assert f"could not write {out / 'checkpoint-4'}: No space left on device (" in line, line
    assert " free on the filesystem of " in line and "the partial checkpoint-4.tmp was removed" in line
    assert f"{out / 'checkpoint-2'} is intact" in line and "unexpected" not in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "error.log").exists()


def test_a_full_disk_while_saving_the_final_model_names_the_intact_checkpoint(
    base_config, tmp_path, capsys, monkeypatch
):
    import preftune.final_model as ckpt  # where final/ is written

    out = tmp_path / "run"
    real = ckpt.save_model

    def full_disk(model, tokenizer, directory, **kwargs):
        if directory.name == "final.tmp":
            (directory / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, tokenizer, directory, **kwargs)

    monkeypatch.setattr(ckpt, "save_model", full_disk)
    cfg = write_config(tmp_path, base_config(output_dir=str(out)))
    code, _, err = cli_train(capsys, cfg)
    line = error_line(err)
    assert code == 1, err
    assert f"could not write {out / 'final'}: No space left on device" in line, line
    assert f"{out / 'checkpoint-2'} is intact: free some space and rerun with resume=true" in line
    assert not (out / "final.tmp").exists() and not (out / "final").exists()
    monkeypatch.setattr(ckpt, "save_model", real)
    assert cli.main(["train", cfg, "resume=true"]) == 0 and (out / "final").is_dir()


def test_a_full_disk_while_writing_metrics_is_one_line(base_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", full_disk, raising=False)
    cfg = write_config(tmp_path, base_config(output_dir=str(out)))
    code, _, err = cli_train(capsys, cfg)
    line = error_line(err)
    assert code == 1, err
    assert f"could not write {out / 'metrics.jsonl'}: No space left on device" in line, line
    assert "no complete checkpoint to continue from" in line and not (out / "error.log").exists()


def test_a_full_disk_while_writing_a_cache_entry_removes_the_partial_file(tmp_path, monkeypatch):
    import torch

    from preftune.cache import TensorCache

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise SafetensorError(FULL)

    monkeypatch.setattr("preftune.cache.save_file", full_disk)
    cache = TensorCache(tmp_path, "references")
    with pytest.raises(StorageError, match=r"could not write .*: No space left on device \(.* free on"):
        cache.save("key", {"x": torch.zeros(3)})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_dcp_failures_and_plain_errors_are_told_apart():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    dcp = CheckpointException(
        "save failed", {1: _wrap_exception(OSError(errno.ENOSPC, "No space left on device"))}
    )
    assert storage_reason(dcp) == "No space left on device"
    assert storage_reason(SafetensorError(FULL)) == "No space left on device"
    assert storage_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    assert storage_reason(ValueError("a bug")) is None
    assert storage_reason(PermissionError(errno.EACCES, "Permission denied")) is None  # not the disk
