"""Checkpoints: write (atomically), find, rotate and load them, RNG state included.

A checkpoint is ``checkpoint-N/`` in the run directory: ``model/`` (safetensors weights, or the
LoRA adapter), ``trainer_state.json``, and the optimizer, LR scheduler and RNG states as
``<name>.safetensors`` + ``<name>.json`` (:mod:`preftune.statefile`: nothing in a checkpoint is
unpickled). Every directory is written under a temporary name and renamed into place, so a failure
(disk full, a crash) leaves the previous checkpoint intact. The last file written before the rename is
``manifest.json``: each file's size and sha256. Resuming verifies the newest checkpoint against it and
falls back to the newest intact one (:func:`select_resume_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import statefile
from .config import TrainConfig
from .rundir import CHECKPOINT_MODEL, CHECKPOINT_STATE, MANIFEST, RunDir


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what was kept."""


def prepare_output_dir(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """The run directory, created, checked writable and locked (:mod:`preftune.runlock`).

    A fresh run (neither ``resume`` nor ``overwrite_output_dir``) refuses a directory holding an
    earlier run's outputs; ``overwrite_output_dir`` clears them (the config was validated already, the
    data checked), so old checkpoints can neither outrank the new ones nor be resumed by mistake.
    """
    from . import runlock
    from .inputs_guard import check_inputs

    check_inputs(cfg)  # before anything is created, cleared or written: no input is inside the outputs
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir {out} is not writable: {e.strerror or e}") from e
    try:
        runlock.acquire(out, warn=log)
    except runlock.RunDirLockedError as e:
        raise TrainingError(str(e)) from e
    run = RunDir(out)
    try:
        old = run.previous_run()
        if old and not cfg.resume and not cfg.overwrite_output_dir:
            names = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
            raise TrainingError(
                f"{out} holds an earlier run ({names}); pass resume=true to continue that run or "
                "overwrite_output_dir=true to start over"
            )
        if cfg.overwrite_output_dir and not cfg.resume:
            clear_outputs(out, log)
    except BaseException:
        runlock.release(out)
        raise
    return out


def clear_outputs(output_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Delete an earlier run's outputs (see :meth:`RunDir.outputs`); returns what was deleted."""
    doomed = RunDir(output_dir).outputs()
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    if doomed:
        log(f"overwrite_output_dir: removed the earlier run's {len(doomed)} outputs from {output_dir}")
    return doomed


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run directory, oldest first."""
    return RunDir(output_dir).checkpoints()


# --------------------------------------------------------------------------------------------------
# RNG state


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    """Python's, torch's (CPU and CUDA) and numpy's global RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# --------------------------------------------------------------------------------------------------
# Writing


def save_model(model: nn.Module, tokenizer, directory: Path, *, merge_lora: bool = False) -> None:
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _stored_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the base checkpoint was saved in (its config.json), or None if it does not say."""
    config = getattr(model, "config", None)
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    source = getattr(config, "_name_or_path", None)
    if source and (Path(source) / "config.json").is_file():
        stored = json.loads((Path(source) / "config.json").read_text())
        name = stored.get("dtype") or stored.get("torch_dtype") or name
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, name, None) if isinstance(name, str) else None


def save_final(model: nn.Module, tokenizer, output_dir: Path, *, save_merged: bool = False) -> Path:
    """Write the trained model at the end of a run; returns the directory to load it from.

    Full-model runs: ``final/``. LoRA runs: the adapter alone in ``final-adapter/`` (a few MB; load it
    with peft on top of the base model, or ``preftune eval`` the run directory), plus, only with
    ``save_merged``, the merged model in ``final/``, cast to the dtype the base checkpoint was stored in
    (not the float32 used for training), so it is no larger than the model it came from.
    """
    run = RunDir(output_dir)
    if not hasattr(model, "peft_config"):
        write_atomically(run.final, lambda tmp: save_model(model, tokenizer, tmp))
        return run.final
    write_atomically(run.final_adapter, lambda tmp: save_model(model, tokenizer, tmp))
    if not save_merged:
        return run.final_adapter

    def merged(tmp: Path) -> None:
        import copy

        plain = copy.deepcopy(model).merge_and_unload()
        dtype = _stored_dtype(plain.get_base_model() if hasattr(plain, "get_base_model") else plain)
        if dtype is not None and dtype.is_floating_point:
            plain = plain.to(dtype)
        save_model(plain, tokenizer, tmp)

    write_atomically(run.final, merged)
    return run.final


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename: the old one survives any failure."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except Exception as e:  # OSError, SafetensorError, ...: the storage's refusal in one line
        from .storage import raise_if_storage

        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_storage(final, e, removed=tmp)
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def rotate_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps all); returns those deleted."""
    doomed = find_checkpoints(output_dir)[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int
) -> Path:
    path = RunDir(output_dir).checkpoint(step)

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp / CHECKPOINT_MODEL)
        # through the module attribute, so that tests can inject a failing write
        statefile.save_state(optimizer.state_dict(), tmp, "optimizer")
        statefile.save_state(scheduler.state_dict(), tmp, "scheduler")
        statefile.save_state(rng_state(), tmp, "rng")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
        write_manifest(tmp)  # last: a checkpoint with a manifest was written completely

    write_atomically(path, write)
    rotate_checkpoints(output_dir, keep)
    return path


# --------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from ``path``; returns its trainer state."""
    from safetensors.torch import load_file

    weights = path / CHECKPOINT_MODEL
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(weights / "adapter_model.safetensors"))
    else:
        state = {}
        for f in sorted(weights.glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied weights are saved once; anything else missing means the checkpoint is not this model.
        missing = [m for m in missing if "lm_head" not in m]
        if missing or unexpected:
            raise TrainingError(
                f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    optimizer.load_state_dict(load_training_state(path, "optimizer"))
    scheduler.load_state_dict(load_training_state(path, "scheduler"))
    set_rng_state(load_training_state(path, "rng"))
    return json.loads((path / CHECKPOINT_STATE).read_text())


def load_training_state(path: Path, name: str):
    """``name``'s state from a checkpoint: safetensors + JSON, never pickle.

    Checkpoints written before that format hold ``<name>.pt``; those load only through
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
    """
    if statefile.exists(path, name):
        try:
            return statefile.load_state(path, name)
        except statefile.StateFileError as e:
            raise TrainingError(str(e)) from e
    legacy = path / f"{name}.pt"
    if not legacy.is_file():
        raise TrainingError(f"{path}: checkpoint has no {name}.json/{name}.safetensors")
    try:
        return torch.load(legacy, weights_only=True, map_location="cpu")
    except Exception as e:  # the restricted unpickler refuses other globals with UnpicklingError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"{legacy}: refusing to load an old-format file that holds more than tensors ({reason}); "
            "start over with overwrite_output_dir=true"
        ) from e


# --------------------------------------------------------------------------------------------------
# Manifests: verify a checkpoint before resuming from it


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """``manifest.json``: size and sha256 of every file under ``directory`` (written last)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = directory / MANIFEST
    path.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    return path


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a short reason), or None when every file matches its manifest.

    Files not listed (e.g. planted ones) are ignored: the loader reads only what the manifest lists.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (incomplete, or written by an older preftune)"
    try:
        files = json.loads(manifest.read_text())["files"]
        items = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    if CHECKPOINT_STATE not in files:
        return f"{MANIFEST} does not list {CHECKPOINT_STATE}"
    for name, size, digest in items:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
        if _sha256(f) != digest:
            return f"{name} does not match its sha256"
    return None


def select_resume_checkpoint(output_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint (None if the directory has none at all).

    Damaged ones (truncated, altered or missing files) are skipped, saying which and why in one line;
    if checkpoints exist but none is intact, a one-line :class:`TrainingError`.
    """
    candidates = RunDir(output_dir).checkpoint_dirs()
    damaged: list[str] = []
    for path in reversed(candidates):
        reason = verify_checkpoint(path)
        if reason is None:
            if damaged:
                log(f"resume: skipping damaged {'; '.join(damaged)}; resuming from {path.name}")
            return path
        damaged.append(f"{path.name} ({reason})")
    if damaged:
        raise TrainingError(
            f"{output_dir} has no intact checkpoint to resume from: {'; '.join(damaged)}; "
            "start over with overwrite_output_dir=true"
        )
    return None


# Sharded checkpoints (parallelism=fsdp): torch.distributed.checkpoint, every rank writes its shards

SHARDED = "fsdp"
PLAIN = "ddp"


def checkpoint_format(path: Path) -> str:
    """``fsdp`` for a checkpoint written by torch.distributed.checkpoint (it has ``.metadata``),
    else ``ddp`` (safetensors model directory); what trainer_state.json says wins where present."""
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    return state.get("parallelism") or (SHARDED if (path / ".metadata").is_file() else PLAIN)


def check_checkpoint_format(path: Path, parallelism: str) -> None:
    """A one-line TrainingError when ``path`` was written under the other parallelism."""
    found = checkpoint_format(path)
    if found != parallelism:
        kind = {SHARDED: "sharded (torch.distributed.checkpoint)", PLAIN: "safetensors"}[found]
        raise TrainingError(
            f"{path} is a {kind} checkpoint written with parallelism={found}, this run has "
            f"parallelism={parallelism}: resume with parallelism={found}"
        )


def save_sharded_checkpoint(
    output_dir: Path, step: int, root, tokenizer, optimizer, scheduler, state: dict, keep: int, timeout_s
) -> Path:
    """Collective: every rank writes its shards of the model (trainable parameters) and optimizer
    into ``checkpoint-N.tmp``; rank 0 adds scheduler, RNG state, tokenizer and trainer state, and
    renames it once all ranks are done (an earlier checkpoint survives any failure); then rotates."""
    from . import distributed as D

    path = RunDir(output_dir).checkpoint(step)

    def write(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        statefile.save_state(scheduler.state_dict(), tmp, "scheduler")
        statefile.save_state(rng_state(), tmp, "rng")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
        # last, once every rank's shards are on disk (dcp.save returned): resume verifies against it
        write_manifest(tmp)

    try:
        D.save_checkpoint(path, root, _plain_optimizer(optimizer), write=write, timeout_s=timeout_s)
    except Exception as e:  # OSError, SafetensorError, DCP's CheckpointException
        from .storage import raise_if_storage

        tmp = path.with_name(path.name + ".tmp")
        if D.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_storage(path, e, removed=tmp)
        raise
    if D.rank() == 0:
        rotate_checkpoints(output_dir, keep)
    return path


def load_sharded_checkpoint(path: Path, root, optimizer, scheduler) -> dict:
    """Restore a :func:`save_sharded_checkpoint` into ``root`` (sharded over any number of
    processes, or not sharded at all) and the optimizer, scheduler and RNG; returns the trainer state."""
    from . import distributed as D

    D.load_checkpoint(path, root, _plain_optimizer(optimizer))
    scheduler.load_state_dict(load_training_state(path, "scheduler"))
    set_rng_state(load_training_state(path, "rng"))
    return json.loads((path / CHECKPOINT_STATE).read_text())


def _plain_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (one process prepares it)."""
    return getattr(optimizer, "optimizer", optimizer)
