"""The trained model at the end of a run: ``final/`` and ``final-adapter/``.

Which folders a run writes follows from its config alone (:func:`final_directories`), so a resumed
run ends with what a fresh run would write: the folders it saves are rewritten, any other final
folder an earlier end of the run left is removed (:func:`remove_stale_finals`), and run_state.json
records the step they hold (``final_step``), which tells a finished run from one whose last
checkpoint is newer than its final model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpointing import SHARDED, save_model, write_atomically
from .config import TrainConfig
from .rundir import FINAL, FINAL_ADAPTER, RunDir


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

    Full-model runs: ``final/``. LoRA runs: the adapter alone in ``final-adapter/`` (23 MB for
    SmolLM2-135M at r=16, all linear layers; load it
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


def final_directories(output_dir: Path, cfg: TrainConfig, num_processes: int = 1) -> list[Path]:
    """The model folders the end of a run with ``cfg`` writes: ``final/`` (full model; LoRA with
    ``save_merged``, and always under FSDP over several processes) and ``final-adapter/`` (LoRA)."""
    run = RunDir(output_dir)
    lora = cfg.lora.enabled
    fsdp = cfg.parallelism == SHARDED and num_processes > 1
    found = [run.final] if not lora or cfg.save_merged or fsdp else []
    return found + ([run.final_adapter] if lora else [])


def remove_stale_finals(
    output_dir: Path, written: list[Path], log: Callable[[str], None] = print
) -> list[Path]:
    """Once this run's final folders (``written``) are saved: delete the final folders an earlier end of
    the run left that this one did not rewrite (e.g. a merged ``final/`` of step N, after resuming to
    a later step without ``save_merged``), and their ``.tmp``/``.old`` leftovers, so that nothing in
    the run directory holds an older model than its newest checkpoint. Returns what was deleted."""
    run = RunDir(output_dir)
    doomed = []
    for p in (run.final, run.final_adapter):
        leftovers = [p.with_name(p.name + ".tmp"), p.with_name(p.name + ".old")]
        doomed += [q for q in ([] if p in written else [p]) + leftovers if q.exists()]
    for p in doomed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    stale = [p.name + "/" for p in doomed if p.parent == run.root and p.name in (FINAL, FINAL_ADAPTER)]
    if stale:
        log(
            f"removed {', '.join(stale)} of an earlier end of this run: this run saves "
            f"{', '.join(p.name + '/' for p in written)} (final/ of a LoRA run needs save_merged: true)"
        )
    return doomed


def record_final_step(output_dir: Path, step: int) -> None:
    """``final_step`` in run_state.json: the step the final folders hold (written after them)."""
    path = RunDir(output_dir).run_state
    state = json.loads(path.read_text()) if path.is_file() else {}
    state["final_step"] = step
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def recorded_final_step(output_dir: Path) -> int | None:
    """The step run_state.json says the final folders hold; None when it does not say (a run that
    never ended, or one written before preftune recorded it)."""
    path = RunDir(output_dir).run_state
    try:
        step = json.loads(path.read_text()).get("final_step") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
