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


# A worker of the 2-process FSDP run below: the final model's weights (written by rank 0 through
# transformers, which holds its own reference to safetensors' writer) meet a full disk half-way.
FULL_AT_FINAL = """
import sys
import transformers.modeling_utils as mu
from safetensors import SafetensorError

real = mu.safe_save_file

def full_disk(tensors, filename, *args, **kwargs):
    if "final.tmp" in str(filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise SafetensorError({full!r})
    return real(tensors, filename, *args, **kwargs)

mu.safe_save_file = full_disk
from preftune.cli import main

sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_a_full_disk_while_two_processes_write_the_final_model_is_one_line(
    base_config, tmp_path, parallelism
):
    """2 processes (gloo); rank 0 writes ``final/`` (FSDP: gathered from the shards) and the write
    fails with safetensors' "No space left on device": the one-line storage error naming ``final``
    and the free space, exit 1 on rank 0 and no traceback from it, the partial ``final.tmp`` removed,
    the last checkpoint intact (its manifest verifies) and resumed from to the end once there is space."""
    import sys

    import yaml

    from preftune.checkpointing import verify_checkpoint

    from .conftest import free_port, launch_processes, process_logs, rank_env

    out = tmp_path / "run"
    per_rank = {"fsdp": {"batch_size": 1, "grad_accum": 2}, "ddp": {"batch_size": 2}}[parallelism]
    cfg = base_config(
        output_dir=str(out), parallelism=parallelism, precision="fp32", max_steps=3, save_steps=2,
        dist_timeout_s=60, **per_rank,
    )  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = FULL_AT_FINAL.format(full=FULL)
    port = free_port()
    commands = [
        ([sys.executable, "-c", script, str(path)], rank_env(r, 2, port, ACCELERATE_USE_CPU="1"))
        for r in range(2)
    ]
    codes, _ = launch_processes(commands, tmp_path, "full", timeout=300)
    rank0 = (tmp_path / "full-0.log").read_text()
    logs = process_logs(tmp_path, "full", 2, tail=20000)
    assert codes[0] == 1 and codes[1] != 0, logs
    (line,) = [x for x in rank0.splitlines() if "final save failed" in x]
    assert line.startswith(f"[preftune] rank 0: final save failed: could not write {out / 'final'}: "), line
    assert "No space left on device (" in line and " free on the filesystem of " in line, line
    assert "the partial final.tmp was removed" in line, line
    assert f"{out / 'checkpoint-3'} is intact: free some space and rerun with resume=true" in line, line
    assert "Traceback" not in rank0 and "SafetensorError(" not in rank0, rank0[-3000:]
    assert not (out / "final.tmp").exists() and not (out / "final").exists()
    assert verify_checkpoint(out / "checkpoint-3") is None
    if parallelism == "fsdp":
        assert (out / "checkpoint-3" / ".metadata").is_file()  # the sharded (DCP) checkpoint

    again = [
        ([sys.executable, "-m", "preftune", "train", str(path), "resume=true"], env) for _, env in commands
    ]
    port = free_port()
    again = [(argv, {**env, "MASTER_PORT": str(port)}) for argv, env in again]
    codes, _ = launch_processes(again, tmp_path, "resumed", timeout=300)
    assert codes == [0, 0], process_logs(tmp_path, "resumed", 2)
    assert (out / "final" / "model.safetensors").stat().st_size > 1000
