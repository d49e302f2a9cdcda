"""Sharded (FSDP2) training pieces: sharding, gradient sync, clipping, consolidation, process-group
timeouts and data-parallel scoring. Sharded checkpoints (DCP) live with the others in
:mod:`preftune.checkpointing`.

preftune never calls the Hugging Face model's ``forward``: the module that is called is the scoring
wrapper (``PolicyScorer``), whose forward runs the backbone and then reads the head's weight directly
(the fused chunked head in :mod:`preftune.scoring`). ``fully_shard`` unshards a module's parameters in
*its own* forward hooks, so the root of the sharding must be that wrapper: each decoder layer gets
its own FSDP group, and the wrapper (root) manages what is left (embeddings, final norm, ``lm_head``,
tied or not), which then stay unsharded from the start of the scoring forward to the end of its
backward. Sharding the HF model as the root instead fails: its forward never runs, so the
embedding is still a sharded DTensor when the backbone reads it ("aten.embedding.default got mixed
torch.Tensor and DTensor"), and so would be ``lm_head.weight`` in the fused head. Anything that
scores with a sharded policy (the LoRA reference with adapters disabled included) must therefore
call the root, never ``score_batch(model)``.

Nothing here imports transformers or peft at module import; every collective helper is a no-op
(or the plain single-process computation) when no process group is initialised.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective stage failed: names the stage and the rank(s) that did not arrive."""


# --------------------------------------------------------------------------------------------------
# Process group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> bool:
    """Join the job torchrun / SLURM started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment).

    ``timeout_s`` bounds every collective: a rank that died or hangs ends the job after that long
    instead of blocking it forever. Backend: NCCL with CUDA, else gloo. Returns False (and does
    nothing) outside a multi-process launch; does nothing if a group already exists.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def process_group_kwargs(timeout_s: float = DEFAULT_TIMEOUT_S):
    """The same timeout for a process group that ``accelerate.Accelerator`` creates:
    ``Accelerator(kwargs_handlers=[process_group_kwargs(cfg.dist_timeout_s)])``."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


_MONITOR_GROUP: Any = None


def _monitor_group():
    """A gloo group for monitored barriers (NCCL has none); created collectively on first use."""
    global _MONITOR_GROUP
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _MONITOR_GROUP is None:
        _MONITOR_GROUP = dist.new_group(backend="gloo")
    return _MONITOR_GROUP


def barrier(stage: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait for every rank; raise :class:`DistributedError` naming ``stage`` and the missing rank(s)
    if some do not arrive within ``timeout_s``.

    Uses gloo's monitored barrier (on a side gloo group under NCCL, so the missing ranks are named
    there too). Call it once early (e.g. ``barrier("start")``) while every rank is alive: under NCCL
    that creates the side group.
    """
    if not is_distributed():
        return
    try:
        dist.monitored_barrier(
            group=_monitor_group(), timeout=timedelta(seconds=timeout_s), wait_all_ranks=True
        )
    except RuntimeError as e:
        found = re.search(r"[Rr]anks? ([\d, ]+) failed", str(e))
        who = f"rank(s) {found.group(1).strip()}" if found else "some rank(s)"
        if not found and rank() != 0:
            who = "rank 0 (or a rank it waited for)"
        raise DistributedError(
            f"{stage}: {who} did not reach the barrier within {timeout_s:g} s (seen from rank {rank()}): {e}"
        ) from e


def end_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """At the end of a command that succeeded: wait for every rank, then destroy the process group.

    A process that exits with its group alive leaves gloo's threads to interpreter teardown, where a
    rank can abort after its work is done (``terminate called without an active exception``, exit
    -6: the job fails although it trained); NCCL warns of the same. The barrier first, so no rank
    tears its connections down while a peer still uses them. Only on success: after an error the rank
    leaves at once (:func:`exit_on_error`), as a collective teardown could wait on a stuck peer.
    """
    global _MONITOR_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return
    if is_distributed():
        barrier("end of run", timeout_s)
    dist.destroy_process_group()
    _MONITOR_GROUP = None


@contextlib.contextmanager
def exit_on_error(
    stage: str | Callable[[], str] = "training",
    explain: Callable[[BaseException], tuple[str, int] | None] | None = None,
):
    """In a multi-process run, on an exception: print it and end this process at once, exit code 1.

    ``stage`` names what was running in the message; a callable is asked at the moment of failure
    (the trainer's current stage: setup, step N, checkpoint N, final save, ...). ``explain(error)``:
    ``(line, exit_code)`` for an error whose message is the whole explanation (a full disk, a refused
    checkpoint), printed as that one line without a traceback; None for the others.

    A rank that fails must not wait in process-group teardown (NCCL's destructor can block on peers
    stuck in a collective); the launcher (torchrun) sees the exit and stops the other ranks, which
    otherwise end at their next collective (gloo: at once, the peer's connection is gone) or at the
    process-group timeout. In one process the exception propagates as usual.
    """
    try:
        yield
    except BaseException as e:
        if not is_distributed() or (isinstance(e, SystemExit) and not e.code) or getattr(e, "every_rank", 0):
            raise
        import sys
        import traceback

        name = stage() if callable(stage) else stage
        explained = explain(e) if explain is not None else None
        if explained is not None:
            line, code = explained
            print(f"[preftune] rank {rank()}: {name} failed: {line}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"[preftune] rank {rank()}: {name} failed: {e!r}; exiting", file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------------------------------
# Sharding


def _policy(root: nn.Module) -> nn.Module:
    """The outermost HF / PEFT model inside ``root`` (the module that has ``save_pretrained``)."""
    for _, module in root.named_modules():
        if hasattr(module, "save_pretrained") and hasattr(module, "config"):
            return module
    raise ValueError(f"{type(root).__name__} holds no Hugging Face model (nothing with save_pretrained)")


def _policy_prefix(root: nn.Module) -> str:
    policy = _policy(root)
    for name, module in root.named_modules():
        if module is policy:
            return f"{name}." if name else ""
    raise AssertionError("unreachable")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM (plain or PEFT): its ``_no_split_modules`` classes,
    else the backbone's ``layers`` list."""
    from .scoring import backbone_and_head

    backbone, _, _ = backbone_and_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in backbone.modules() if type(m).__name__ in names]
    if not found and isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        found = list(backbone.layers)
    if not found:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard")
    return found


def mixed_precision_policy(precision: str, device: torch.device | str):
    """FSDP2's mixed precision for a preftune ``precision`` value.

    bf16 (or ``auto`` on a bf16-capable GPU): bf16 compute weights, fp32 gradient reduction; the
    sharded master weights and the optimizer state stay in the load dtype (fp32 by default).
    fp32 or CPU: none. fp16 needs a sharded gradient scaler, which this engine does not have.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16":
        raise ValueError("precision: fp16 is not supported with parallelism=fsdp; use bf16 or fp32")
    if precision == "bf16" and device.type != "cpu":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_policy(
    root: nn.Module,
    *,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard ``root`` (the scoring wrapper around the policy) with FSDP2, in place; returns ``root``.

    Each decoder layer is one FSDP group (all-gathered for its forward, resharded after it, gathered
    again for its backward); ``root`` manages the remaining parameters (embeddings, final norm,
    ``lm_head``; a tied head and embedding are one parameter, so they stay tied). Apply LoRA
    (``get_peft_model``) and activation checkpointing *before*, and build the optimizer *after*: its
    parameters must be the sharded DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policy = _policy(root)
    if mesh is None:
        # CPU offload keeps the shards in host memory but computes on the GPU
        on_gpu = next(root.parameters()).is_cuda or (cpu_offload and torch.cuda.is_available())
        device_type = "cuda" if on_gpu else "cpu"
        mesh = init_device_mesh(device_type, (world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(policy):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(root, **kwargs)
    return root


@contextlib.contextmanager
def no_sync(root: nn.Module, enabled: bool = True):
    """Backward passes inside accumulate gradients locally without reducing them (gradient
    accumulation); the next backward outside reduces everything. Replaces ``accelerator.no_sync``.
    Costs unsharded gradient memory until then; skipping it (reduce-scatter every micro-batch) gives
    the same result with less memory and more communication."""
    if not enabled or not hasattr(root, "set_requires_gradient_sync"):
        yield
        return
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> float:
    """Clip the global gradient norm over (DTensor or plain) parameters; returns the norm before
    clipping as a float, the same on every rank."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# --------------------------------------------------------------------------------------------------
# Consolidation: one ordinary Hugging Face directory from the shards


def full_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's complete state dict (keys as the HF / PEFT model names them), gathered to CPU on
    rank 0; the other ranks get ``{}``. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(root, options=options)
    prefix = _policy_prefix(root)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rebuild(policy: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU copy of ``policy`` (HF or PEFT) holding ``state``: built on the meta device, no init."""
    import copy

    from transformers import AutoModelForCausalLM

    is_peft = hasattr(policy, "peft_config")
    base = policy.get_base_model() if is_peft else policy
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(base.config))
    if is_peft:
        from peft import get_peft_model

        model = get_peft_model(model, copy.deepcopy(policy.peft_config["default"]))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    inner = model.get_base_model() if is_peft else model
    if getattr(inner.config.get_text_config(), "tie_word_embeddings", False):
        inner.tie_weights()  # assign=True replaced the shared parameter by two tensors
        missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(
            f"gathered state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    # non-persistent buffers (rotary inv_freq) stay on meta: this copy is only saved, never run
    return model


def save_consolidated(
    root: nn.Module,
    directory: str | Path,
    *,
    tokenizer=None,
    merge_lora: bool = True,
    adapter_directory: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    write_directory: Callable[[Path, Callable[[Path], None]], None] | None = None,
) -> None:
    """Write the sharded policy as an ordinary Hugging Face directory (``from_pretrained`` loads it).

    With LoRA: ``directory`` gets the merged model (adapters folded into the base weights, as
    ``merge_and_unload``) when ``merge_lora``, else the adapter; ``adapter_directory``, if given,
    gets the adapter alone. Each directory is written by ``write_directory(final, write)`` (default
    :func:`write_directory_atomically`; the trainer passes checkpointing's, which also turns a full
    disk into one line), under ``<name>.tmp`` and then renamed, so an existing one survives a failure.
    Collective: every rank gathers, rank 0 builds and writes (it needs CPU memory for one full copy of
    the model, twice while merging).
    """
    write_directory = write_directory or write_directory_atomically
    policy = _policy(root)
    state = full_state_dict(root)
    if rank() == 0:
        model = _rebuild(policy, state)
        del state
        is_peft = hasattr(model, "peft_config")

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        if is_peft and adapter_directory is not None:
            write_directory(Path(adapter_directory), save)
        if is_peft and merge_lora:
            model = model.merge_and_unload()
        write_directory(Path(directory), save)
    barrier(f"save {Path(directory).name}", timeout_s)


def write_directory_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(<final>.tmp)``, then rename it to ``final``; on a failure the partial ``.tmp`` is
    removed and an existing ``final`` is untouched."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the written ``tmp`` to ``final``; an existing ``final`` is moved aside, then removed."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Data-parallel scoring


def shard_indices(
    n: int,
    *,
    rank_: int | None = None,
    world: int | None = None,
    equal: bool = False,
    contiguous: bool = False,
) -> list[int]:
    """This rank's rows of ``range(n)``: strided (``rank::world``, balanced when rows are sorted by
    length) or contiguous. ``equal`` pads every share to ``ceil(n / world)`` rows by repeating its
    last row (row 0 for an empty share), for score functions that run collectives (an FSDP-sharded
    model), which every rank must call the same number of times."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if contiguous:
        per = -(-n // w)
        mine = list(range(r * per, min(n, (r + 1) * per)))
    else:
        mine = list(range(r, n, w))
    if equal:
        size = -(-n // w)
        mine += [mine[-1] if mine else 0] * (size - len(mine))
    return mine


Scores = torch.Tensor | dict[str, torch.Tensor]


def scatter_score(
    n: int,
    score: Callable[[Sequence[int]], Scores],
    *,
    equal: bool = False,
    contiguous: bool = False,
    to_all: bool = True,
) -> Scores | None:
    """Score rows 0..n-1 split over the ranks; every rank (or only rank 0 with ``to_all=False``; the
    others get None) gets the results in the original order, as one process scoring all rows would.

    ``score(indices)`` returns a tensor, or a dict of tensors, whose first dimension follows
    ``indices`` (rows on dim 0: transpose [K, N] stacks). It is called once per rank, with the
    rank's rows (possibly none), and batches them as it likes; with ``equal`` (for an FSDP-sharded
    model) every rank gets the same number of rows, so a fixed batch size gives every rank the same
    number of forwards. Results travel through ``all_gather_object`` on CPU.
    """
    mine = shard_indices(n, equal=equal, contiguous=contiguous)
    local = score(mine) if mine else None
    if not is_distributed():
        return local
    local = _to_cpu(local)
    world = world_size()
    gathered: list[Any] = [None] * world
    if to_all:
        dist.all_gather_object(gathered, (mine, local))
    else:
        dist.gather_object((mine, local), gathered if rank() == 0 else None, dst=0)
        if rank() != 0:
            return None
    first = next((out for _, out in gathered if out is not None), None)
    if first is None:
        return None

    def assemble(get) -> torch.Tensor:
        sample = get(first)
        result = sample.new_empty((n, *sample.shape[1:]))
        for rows, out in gathered:
            if out is not None and rows:
                result[torch.tensor(rows)] = get(out)
        return result

    if isinstance(first, dict):
        return {key: assemble(lambda out, key=key: out[key]) for key in first}
    return assemble(lambda out: out)


def _to_cpu(x):
    if isinstance(x, dict):
        return {k: v.detach().cpu() for k, v in x.items()}
    return None if x is None else x.detach().cpu()
