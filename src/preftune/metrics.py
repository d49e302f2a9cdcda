"""What a run reports: console messages, metrics.jsonl / TensorBoard rows, held-out metrics, memory.

Metric names follow TRL's DPOTrainer (``loss``, ``rewards/margins``, ``eval_rewards/accuracies``,
...), so that runs of both can be read by the same tools.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .extras import MissingDependency, require
from .losses.output import preference_accuracy
from .rundir import RunDir


def log(msg: str, accelerator=None) -> None:
    """A progress message on the main process, printed without breaking tqdm bars."""
    if accelerator is None or accelerator.is_main_process:
        tqdm.write(f"[preftune] {msg}")


class MetricsLog:
    """metrics.jsonl (always) + TensorBoard (optional), TRL's names, written by the main process."""

    def __init__(self, output_dir: Path, report_to: list[str], enabled: bool):
        run = RunDir(output_dir)
        self.path = run.metrics
        self.enabled = enabled
        self.tb = None
        if enabled and "tensorboard" in report_to:
            try:
                require("tensorboard", "tensorboard")
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.tensorboard))
            except MissingDependency as error:
                log(f"{error}; logging to metrics.jsonl only")
            except ImportError as error:  # installed but unusable: say why, keep training
                log(f"TensorBoard is unavailable ({error}); logging to metrics.jsonl only")

    def reset(self) -> None:
        """A run starting at step 0 (fresh, or resumed without a checkpoint) starts the file afresh."""
        if self.enabled and self.path.is_file():
            self.path.unlink()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a crashed run wrote after its last checkpoint."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: strict_json(v) for k, v in values.items()}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        except OSError as e:  # a full disk: one line naming the file and the free space
            from .storage import raise_if_storage

            raise_if_storage(self.path, e)
            raise
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k != "epoch":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def strict_json(value):
    """NaN and ±Inf are not JSON (strict readers reject them): written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average logged metrics over processes (each saw only its share of the batch). Keys may differ
    between processes (unpaired batches without chosen or rejected items): average where present."""
    from accelerate.utils import gather_object

    per_process = gather_object([values])
    keys = dict.fromkeys(k for v in per_process for k in v)
    return {k: sum(v[k] for v in per_process if k in v) / sum(k in v for v in per_process) for k in keys}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class HeldOutMetrics:
    """Accumulates micro-batches of a held-out pass into TRL's ``eval_`` metrics.

    Besides the method's loss and rewards: rewards against the primary reference alone
    (``eval_primary/...``, β times the log-ratio to reference 0) and the policy's own preference
    ``eval_logps/accuracies`` (fraction of pairs with log π(y_w|x) > log π(y_l|x), no reference).
    """

    def __init__(self, beta: float, unpaired: bool, has_references: bool):
        self.beta, self.unpaired, self.has_references = beta, unpaired, has_references
        self.losses, self.rc, self.rr, self.pc, self.pr, self.own = [], [], [], [], [], []

    def add(self, out, policy: dict[str, torch.Tensor], refs: dict[str, torch.Tensor]) -> None:
        self.losses.append(out.losses.float().cpu())
        if out.chosen_rewards is not None:
            self.rc.append(out.chosen_rewards.float().cpu())
            self.rr.append(out.rejected_rewards.float().cpu())
        if not self.unpaired:
            self.own.append((policy["chosen"] > policy["rejected"]).float().cpu())
        if not self.unpaired and self.has_references:
            self.pc.append((policy["chosen"].float() - refs["chosen"][0]).cpu())
            self.pr.append((policy["rejected"].float() - refs["rejected"][0]).cpu())

    def result(self) -> dict[str, float]:
        result = {"eval_loss": float(torch.cat(self.losses).mean())}
        if self.own:
            result["eval_logps/accuracies"] = float(torch.cat(self.own).mean())
        if self.rc:
            c, r = torch.cat(self.rc), torch.cat(self.rr)
            result.update(
                {
                    "eval_rewards/chosen": float(c.mean()),
                    "eval_rewards/rejected": float(r.mean()),
                    "eval_rewards/margins": float(c.mean() - r.mean()),
                    "eval_rewards/accuracies": float(preference_accuracy(c, r))
                    if c.shape == r.shape
                    else float("nan"),
                    "eval_rewards/accuracies_strict": float((c > r).float().mean())
                    if c.shape == r.shape
                    else float("nan"),
                }
            )
        if self.pc:
            c, r = torch.cat(self.pc) * self.beta, torch.cat(self.pr) * self.beta
            result.update(
                {
                    "eval_primary/rewards/margins": float((c - r).mean()),
                    "eval_primary/rewards/accuracies": float(preference_accuracy(c, r)),
                    "eval_primary/rewards/accuracies_strict": float((c > r).float().mean()),
                }
            )
        return result
