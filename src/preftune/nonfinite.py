"""Non-finite losses and gradients: detect them before the optimizer step, stop or skip the step.

A NaN or Inf that reaches ``optimizer.step()`` poisons every weight for good (and, unnoticed, a NaN
model would be saved as ``final/``). ``on_nonfinite: stop`` ends the run with :class:`NonFiniteError`
(exit code 3 from the CLI) naming the step and what usually helps; ``skip_step`` drops that step's
update and continues.
"""

from __future__ import annotations

import torch

from .errors import TrainingError
from .metrics import log
from .rundir import RunDir


class NonFiniteError(TrainingError):
    """The loss, the gradients or the weights stopped being finite numbers."""

    exit_code = 3


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter or gradient; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_part(losses: list[torch.Tensor], params, accelerator=None) -> str | None:
    """``"loss"`` or ``"gradients"`` when this step's loss or gradients hold a NaN/Inf (on any
    process), else None. One reduction over the gradients: cheap next to the backward pass."""
    bad_loss = not all(bool(torch.isfinite(x).all()) for x in losses)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    bad_grad = False
    if grads and not bad_loss:
        norms = torch.stack([g.detach().float().norm() for g in grads])
        bad_grad = not bool(torch.isfinite(norms).all())
    flags = torch.tensor([float(bad_loss), float(bad_grad)])
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    if flags[0] > 0:
        return "loss"
    if flags[1] > 0:
        return "gradients"
    return None


def weights_finite(model) -> bool:
    return all(
        bool(torch.isfinite(_local(p.detach())).all()) for p in model.parameters() if p.is_floating_point()
    )


def hint(cfg, last_checkpoint: str | None) -> str:
    """What usually helps, in one clause."""
    tips = [f"lower learning_rate (now {cfg.learning_rate:g})"]
    if cfg.model_dtype in ("float16", "fp16", "half") or cfg.precision == "fp16":
        tips.append("train in bf16 or fp32 instead of fp16 (model_dtype / precision)")
    if cfg.max_grad_norm == 0:
        tips.append("clip gradients (max_grad_norm=1)")
    tips.append("or set on_nonfinite=skip_step")
    where = (
        f"{last_checkpoint} is intact: fix the config and rerun with resume=true"
        if last_checkpoint
        else "no checkpoint was written"
    )
    return f"try: {', '.join(tips)}; {where}"


def skip_or_stop(cfg, part: str, step: int, optimizer, scheduler, output_dir, accelerator=None):
    """A NaN/Inf ``part`` (the loss, or a gradient) at ``step``: raise :class:`NonFiniteError`
    (``on_nonfinite: stop``, naming the intact checkpoint of ``output_dir``) or drop the update and
    advance the schedule (``skip_step``); returns (grad norm None, the learning rate of the step)."""
    if cfg.on_nonfinite == "stop":
        kept = RunDir(output_dir).checkpoints()
        raise NonFiniteError(
            f"step {step}: the {part} is not finite (NaN/Inf); stopped before the optimizer step, "
            f"nothing of it was saved; {hint(cfg, str(kept[-1]) if kept else None)}"
        )
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()  # the schedule follows the step count, skipped or not
    log(f"step {step}: the {part} is not finite; on_nonfinite=skip_step dropped this update", accelerator)
    return None, lr
