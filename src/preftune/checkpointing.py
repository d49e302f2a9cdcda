"""Checkpoints: write (atomically), find, rotate and load them, RNG state included.

A checkpoint is ``checkpoint-N/`` in the run directory: ``model/`` (safetensors weights, or the
LoRA adapter), ``trainer_state.json``, and the optimizer, LR scheduler and RNG states as
``<name>.safetensors`` + ``<name>.json`` (:mod:`preftune.statefile`: nothing in a checkpoint is
unpickled). The tokenizer is not in it: a run writes ``tokenizer/`` beside the checkpoints once, when
it starts (:func:`save_run_tokenizer`; ``final/`` and ``final-adapter/`` carry their own copy). Every directory is written under a temporary name and renamed into place, so a failure
(disk full, a crash) leaves the previous checkpoint intact. The last file written before the rename is
``manifest.json``: each file's size and sha256. Resuming verifies the newest checkpoint against it and
falls back to the newest intact one (:func:`select_resume_checkpoint`).

Under ``parallelism=fsdp`` a checkpoint is sharded: torch.distributed.checkpoint (DCP) files of the
model's trainable parameters and the optimizer, written by every rank, in place of ``model/`` and
``optimizer.*``. Both kinds are written by :func:`save_checkpoint` and read by :func:`load_checkpoint`
(``sharded=True`` for the second, called on every rank). The RNG streams are :mod:`preftune.seeding`'s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import statefile
from .config import TrainConfig
from .distributed import DEFAULT_TIMEOUT_S, barrier, rank, replace_directory
from .errors import TrainingError
from .rundir import CHECKPOINT_MODEL, CHECKPOINT_STATE, MANIFEST, RunDir
from .seeding import rng_state, set_rng_state
from .storage import raise_if_storage


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
# Writing


def save_model(model: nn.Module, tokenizer, directory: Path, *, merge_lora: bool = False) -> None:
    """``save_pretrained`` of the model (and of ``tokenizer``, unless None)."""
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_run_tokenizer(output_dir: Path, tokenizer) -> Path:
    """The run's ``tokenizer/`` (written atomically), once per run instead of in every checkpoint."""
    target = RunDir(output_dir).tokenizer
    write_atomically(target, tokenizer.save_pretrained)
    return target


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename: the old one survives any failure."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except Exception as e:  # OSError, SafetensorError, ...: the storage's refusal in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_storage(final, e, removed=tmp)
        raise
    replace_directory(tmp, final)


def rotate_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps all); returns those deleted."""
    doomed = find_checkpoints(output_dir)[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    *,
    sharded: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Write ``checkpoint-N`` (model, optimizer, scheduler, RNG and trainer ``state``), then keep the
    ``keep`` newest (the tokenizer is the run's ``tokenizer/``: :func:`save_run_tokenizer`). Plain:
    ``model`` is the policy, saved as safetensors by this process. ``sharded`` (parallelism=fsdp):
    ``model`` is the sharded root and every rank calls this (:func:`save_sharded_checkpoint`)."""
    if sharded:
        return save_sharded_checkpoint(output_dir, step, model, optimizer, scheduler, state, keep, timeout_s)
    path = RunDir(output_dir).checkpoint(step)

    def write(tmp: Path) -> None:
        save_model(model, None, tmp / CHECKPOINT_MODEL)
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


def load_checkpoint(path: Path, model, optimizer, scheduler, *, sharded: bool = False) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from ``path``; returns its trainer state.
    ``sharded``: a checkpoint written with ``sharded=True``, loaded into the root ``model``
    (:func:`load_sharded_checkpoint`; collective)."""
    if sharded:
        return load_sharded_checkpoint(path, model, optimizer, scheduler)
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


# --------------------------------------------------------------------------------------------------
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
    output_dir: Path, step: int, root, optimizer, scheduler, state: dict, keep: int, timeout_s
) -> Path:
    """Collective: every rank writes its shards of the model (trainable parameters) and optimizer
    into ``checkpoint-N.tmp``; rank 0 adds scheduler, RNG state and trainer state, and renames it
    once all ranks are done (an earlier checkpoint survives any failure); then rotates."""
    path = RunDir(output_dir).checkpoint(step)

    def write(tmp: Path) -> None:
        statefile.save_state(scheduler.state_dict(), tmp, "scheduler")
        statefile.save_state(rng_state(), tmp, "rng")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
        # last, once every rank's shards are on disk (dcp.save returned): resume verifies against it
        write_manifest(tmp)

    try:
        save_dcp_state(path, root, _plain_optimizer(optimizer), write=write, timeout_s=timeout_s)
    except Exception as e:  # OSError, SafetensorError, DCP's CheckpointException
        tmp = path.with_name(path.name + ".tmp")
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_storage(path, e, removed=tmp)
        raise
    if rank() == 0:
        rotate_checkpoints(output_dir, keep)
    return path


def load_sharded_checkpoint(path: Path, root, optimizer, scheduler) -> dict:
    """Restore a :func:`save_sharded_checkpoint` into ``root`` (sharded over any number of
    processes, or not sharded at all) and the optimizer, scheduler and RNG; returns the trainer state."""
    load_dcp_state(path, root, _plain_optimizer(optimizer))
    scheduler.load_state_dict(load_training_state(path, "scheduler"))
    set_rng_state(load_training_state(path, "rng"))
    return json.loads((path / CHECKPOINT_STATE).read_text())


def _plain_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (one process prepares it)."""
    return getattr(optimizer, "optimizer", optimizer)


# The sharded state itself (DCP): model (trainable parameters) and optimizer, resharded on load


def _state_options(root: nn.Module, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base is the model file already on disk; a checkpoint holds what trains
    frozen = any(not p.requires_grad for p in root.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, **extra)


_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod")  # not part of a state-dict name


def _trainable_names(root: nn.Module) -> set[str]:
    """State-dict names of ``root``'s trainable parameters (every name of a shared one)."""
    return {
        ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
        for name, p in root.named_parameters(remove_duplicate=False)
        if p.requires_grad
    }


def _trainable_only(path: Path, root: nn.Module, model_state: dict) -> dict:
    """With frozen parameters (LoRA), the model state cut to the trainable ones.

    ``ignore_frozen_params`` drops a frozen parameter under its first name only: a tied head
    (``lm_head.weight`` sharing the embedding, as in SmolLM2) stayed in every LoRA checkpoint, 113 MB
    of SmolLM2-135M in float32, and so did persistent buffers. What a checkpoint holds is what trains.
    """
    if all(p.requires_grad for p in root.parameters()):
        return model_state
    keep = _trainable_names(root)
    absent = sorted(keep - model_state.keys())
    if absent:  # a name this function does not know how to map: refuse rather than drop weights
        raise RuntimeError(f"{path}: trainable parameters missing from the state dict: {absent[:3]}")
    return {k: v for k, v in model_state.items() if k in keep}


def _check_loaded(path: Path, root: nn.Module, result) -> None:
    """Non-strict loading (LoRA) may skip what does not train (the base model's weights), nothing else."""
    if result is None:
        return
    trainable = _trainable_names(root)
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )


def save_dcp_state(
    path: str | Path,
    root: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    json_files: dict[str, Any] | None = None,
    write: Callable[[Path], None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Save the sharded model (its trainable parameters) and optimizer state to ``path``.

    Every rank writes its own shards into ``<path>.tmp``; rank 0 adds ``json_files`` (name -> a
    JSON-serialisable object: scheduler, trainer state, ...), calls ``write(tmp_dir)`` for anything
    else (tokenizer, RNG state files) and, once every rank has finished (barrier), renames the
    directory to ``path``. A crash at any point leaves no half-written ``path``: an earlier one
    stays intact. Collective: every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"checkpoint {path.name}: start", timeout_s)
    options = _state_options(root)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": _trainable_only(path, root, get_model_state_dict(root, options=options))}
    else:
        model_sd, optim_sd = get_state_dict(root, optimizer, options=options)
        state = {"model": _trainable_only(path, root, model_sd), "optimizer": optim_sd}
    with _single_process_said():
        dcp.save(state, checkpoint_id=str(tmp))
    if rank() == 0:
        for name, value in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=1))
        if write is not None:
            write(tmp)
    barrier(f"checkpoint {path.name}: written", timeout_s)
    if rank() == 0:
        replace_directory(tmp, path)
    barrier(f"checkpoint {path.name}: renamed", timeout_s)
    return path


@contextmanager
def _single_process_said():
    """DCP on one process without a process group (``parallelism: sharded`` alone): torch warns
    "assuming the intent is to save/load in a single process" at every save and load, even when
    told so; that is the intent here, so the warning is not shown."""
    import warnings

    import torch.distributed as dist

    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings(
                "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
            )
        yield


def load_dcp_state(
    path: str | Path, root: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a :func:`save_dcp_state` directory into ``root`` (and ``optimizer``), resharding to
    this run's number of processes (any world size, one process without a process group included).
    Returns the JSON files saved with it (name -> object). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no .metadata)")
    options = _state_options(root)
    if optimizer is None:
        # only what trains: a checkpoint written before the tied head was dropped still loads
        state = {"model": _trainable_only(path, root, get_model_state_dict(root, options=options))}
        with _single_process_said():
            dcp.load(state, checkpoint_id=str(path))
        _check_loaded(path, root, set_model_state_dict(root, state["model"], options=options))
    else:
        model_sd, optim_sd = get_state_dict(root, optimizer, options=options)
        state = {"model": _trainable_only(path, root, model_sd), "optimizer": optim_sd}
        with _single_process_said():
            dcp.load(state, checkpoint_id=str(path))
        result = set_state_dict(
            root,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
        _check_loaded(path, root, result)
    return {f.name: json.loads(f.read_text()) for f in sorted(path.glob("*.json"))}


def batch_choices(global_batch, processes: int, shown: int = 4) -> str:
    """What to set to resume at ``global_batch`` pairs per step on ``processes`` processes: the
    ``batch_size``/``grad_accum`` pairs whose product is ``global_batch / processes`` (largest batch
    first), or the process counts that divide it."""
    if not isinstance(global_batch, int) or global_batch < 1:
        return "the checkpoint does not say its global batch"
    if global_batch % processes:
        counts = [n for n in range(1, global_batch + 1) if global_batch % n == 0][:shown]
        return (
            f"{global_batch} pairs cannot be split over {processes} processes: resume on "
            f"{', '.join(map(str, counts))}{' ...' if len(counts) == shown else ''} process(es)"
        )
    per = global_batch // processes
    pairs = [(b, per // b) for b in range(per, 0, -1) if per % b == 0]
    listed = ", ".join(f"batch_size={b} grad_accum={g}" for b, g in pairs[:shown])
    return f"on {processes} process(es) resume with {listed}{' ...' if len(pairs) > shown else ''}"


@contextmanager
def naming_intact_checkpoint(output_dir: Path, *, resume: bool):
    """A checkpoint that failed to save: its error names the newest intact one (and, ``resume``,
    how to continue from it)."""
    try:
        yield
    except TrainingError as e:
        kept = find_checkpoints(output_dir)
        if not kept:
            hint = "no earlier checkpoint exists"
        elif resume:
            hint = f"{kept[-1]} is intact: rerun with resume=true to continue from it"
        else:
            hint = f"{kept[-1]} is intact"
        raise TrainingError(f"{e}; {hint}") from e
