"""Checkpoints: write (atomically), find, rotate and load them, RNG state included.

A checkpoint is ``checkpoint-N/`` in the run directory: ``model/`` (safetensors weights, or the
LoRA adapter), ``trainer_state.json``, and the optimizer, LR scheduler and RNG states as
``<name>.safetensors`` + ``<name>.json`` (:mod:`preftune.statefile`: nothing in a checkpoint is
unpickled). Every directory is written under a temporary name and renamed into place, so a failure
(disk full, a crash) leaves the previous checkpoint intact.
"""

from __future__ import annotations

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
from .rundir import CHECKPOINT_MODEL, CHECKPOINT_STATE, RunDir


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what was kept."""


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """The run directory, created and checked writable; refuses to mix two runs' checkpoints."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir {out} is not writable: {e.strerror or e}") from e
    if find_checkpoints(out) and not cfg.resume and not cfg.overwrite_output_dir:
        raise TrainingError(
            f"{out} already holds checkpoints; pass resume=true to continue that run or "
            "overwrite_output_dir=true to start over"
        )
    return out


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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write {final}: {e.strerror or e}") from e
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
