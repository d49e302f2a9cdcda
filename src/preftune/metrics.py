"""What a run reports: console messages, metrics.jsonl / TensorBoard rows, held-out metrics, memory.

Metric names follow TRL's DPOTrainer (``loss``, ``rewards/margins``, ``eval_rewards/accuracies``,
...), so that runs of both can be read by the same tools.
"""

from __future__ import annotations

import json
import math
import os
import time
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
    """metrics.jsonl (always) + TensorBoard and the trackers of ``report_to`` (Trackio, W&B, MLflow:
    :mod:`preftune.trackers`), TRL's names, written by the main process only (``enabled``); every
    training row also feeds the :class:`ClipWatch` (MRPO/MDPO reducing to DPO)."""

    def __init__(self, output_dir: Path, report_to: list[str], enabled: bool):
        from .trackers import Trackers

        run = RunDir(output_dir)
        self.path = run.metrics
        self.enabled = enabled
        self.tb = None
        self.trackers = Trackers(output_dir, report_to if enabled else [], log)
        self.clip_watch = ClipWatch(_clip_eps(run))
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
        """A run starting at step 0 (fresh, or resumed without a checkpoint) starts the file afresh,
        and new tracker runs."""
        if self.enabled and self.path.is_file():
            self.path.unlink()
        if self.enabled:
            self.trackers.forget()

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
        for line in kept:  # the watch goes on from the steps already trained
            self.clip_watch.add(json.loads(line), quiet=True)

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
        self.trackers.write(step, values)
        warning = self.clip_watch.add(row)
        if warning:
            log(f"warning: {warning}")

    def close(self) -> None:
        """Close TensorBoard and the trackers; a run shorter than the watch's window is judged here."""
        if self.tb is not None:
            self.tb.close()
        self.trackers.close()
        warning = self.clip_watch.finish() if self.enabled else None
        if warning:
            log(f"warning: {warning}")


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


INITIAL_PREFIX = "eval_initial/"  # held-out rewards against the initial policy (not TRL's names)


class HeldOutMetrics:
    """Accumulates micro-batches of a held-out pass into TRL's ``eval_`` metrics.

    Two yardsticks: TRL's ``eval_rewards/*`` (and ``eval_loss``) are measured against the method's
    reference (DPO: the initial policy; MRPO: its virtual reference; reference-free methods: none);
    ``eval_initial/rewards/*`` against the initial policy (β times the log-ratio to it), the same for
    every method, so runs of different methods compare. ``initial`` log-probs are passed per batch
    when known (a reference that is the initial policy, or its step-0 scores). Besides, the policy's
    own preference ``eval_logps/accuracies`` (fraction of pairs with log π(y_w|x) > log π(y_l|x),
    no reference).
    """

    def __init__(self, beta: float, unpaired: bool):
        self.beta, self.unpaired = beta, unpaired
        self.losses, self.rc, self.rr, self.pc, self.pr, self.own = [], [], [], [], [], []

    def add(self, out, policy: dict[str, torch.Tensor], initial: dict[str, torch.Tensor] | None) -> None:
        self.losses.append(out.losses.float().cpu())
        if out.chosen_rewards is not None:
            self.rc.append(out.chosen_rewards.float().cpu())
            self.rr.append(out.rejected_rewards.float().cpu())
        if not self.unpaired:
            self.own.append((policy["chosen"] > policy["rejected"]).float().cpu())
        if not self.unpaired and initial is not None:
            self.pc.append(policy["chosen"].float().cpu() - initial["chosen"].float().cpu())
            self.pr.append(policy["rejected"].float().cpu() - initial["rejected"].float().cpu())

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
                    INITIAL_PREFIX + "rewards/margins": float((c - r).mean()),
                    INITIAL_PREFIX + "rewards/accuracies": float(preference_accuracy(c, r)),
                    INITIAL_PREFIX + "rewards/accuracies_strict": float((c > r).float().mean()),
                }
            )
        return result


# --------------------------------------------------------------------------------------------------
# Methods that reduce to another: MRPO/MDPO whose CTRO clipping pins every other reference


CLIP_FRACTION_LIMIT = 0.9  # above this, the other references barely differ from the primary
CLIP_WINDOW_STEPS = 10  # optimizer steps the fraction must stay above the limit (or the whole run)
DIAGNOSTIC_PREFIXES = ("mrpo/", "mdpo/")  # the multi-reference methods' own training metrics

DIAGNOSTIC_MEANINGS = {
    "clip_fraction": "share of the other references' log-probs CTRO clipped into the primary's band "
    "(1 = they act as the primary: the run is DPO with it)",
    "alpha": "mean weight α_k of reference k (index 0: the primary)",
}


def _clip_eps(run: RunDir) -> float | None:
    """mrpo.clip_eps of the run's saved config (None when there is none)."""
    import yaml

    try:
        data = yaml.safe_load(run.config.read_text()) if run.config.is_file() else None
        return float(data["mrpo"]["clip_eps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _clip_key(row: dict) -> str | None:
    return next(
        (k for k in DIAGNOSTIC_PREFIXES if isinstance(row.get(k + "clip_fraction"), (int, float))), None
    )


class ClipWatch:
    """Says once when an MRPO/MDPO run's ``mrpo/clip_fraction`` stays above 0.9: averaged over the
    last ``window`` optimizer steps (each logged row stands for the steps since the previous one), or
    over the whole run when it is shorter (:meth:`finish`). Then CTRO clips nearly every log-prob of
    the other references onto the primary's band: the virtual reference is the primary, and the run
    is DPO with it. The message names ``mrpo.clip_eps``, the band's radius."""

    def __init__(
        self, clip_eps: float | None, window: int = CLIP_WINDOW_STEPS, limit: float = CLIP_FRACTION_LIMIT
    ):
        self.clip_eps, self.window, self.limit = clip_eps, window, limit
        self.rows: list[tuple[int, int, float]] = []  # (first step, last step, mean fraction)
        self.key: str | None = None
        self.last_step = 0
        self.warned = False

    def add(self, row: dict, quiet: bool = False) -> str | None:
        """Feed one metrics row; the warning (once) when the last window is above the limit."""
        key = _clip_key(row)
        if key is None or "step" not in row:
            return None
        step = int(row["step"])
        if step <= self.last_step:  # rows of an earlier attempt at these steps: start over from them
            self.rows = [r for r in self.rows if r[1] < step]
        first = self.rows[-1][1] + 1 if self.rows else 1
        self.rows.append((min(first, step), step, float(row[key + "clip_fraction"])))
        self.key, self.last_step = key, step
        window = self._mean(self.window)
        if window is None or quiet:
            return None
        return self._warn(*window)

    def finish(self) -> str | None:
        """At the end: a run shorter than the window is judged over all its steps."""
        whole = self._mean(None)
        return self._warn(*whole) if whole is not None else None

    def _mean(self, steps: int | None) -> tuple[float, int, int] | None:
        """(step-weighted mean, first step, last step) over the last ``steps`` steps (None: all rows);
        None when fewer steps than that were logged."""
        if not self.rows:
            return None
        total = weighted = 0.0
        first = self.rows[-1][1]
        for lo, hi, value in reversed(self.rows):
            span = hi - lo + 1
            total += span
            weighted += span * value
            first = lo
            if steps is not None and total >= steps:
                return weighted / total, first, self.rows[-1][1]
        return (weighted / total, first, self.rows[-1][1]) if steps is None else None

    def _warn(self, mean: float, first: int, last: int) -> str | None:
        if self.warned or mean <= self.limit:
            return None
        self.warned = True
        return clip_warning(self.key or "mrpo/", mean, first, last, self.clip_eps)


def clip_warning(key: str, mean: float, first: int, last: int, clip_eps: float | None) -> str:
    eps = f" (now {clip_eps:g})" if clip_eps is not None else ""
    method = key.rstrip("/")
    return (
        f"{key}clip_fraction averaged {mean:.2f} over steps {first}-{last} (above {CLIP_FRACTION_LIMIT:g}): "
        f"CTRO clips nearly every log-prob of the other references onto the primary's band, so this "
        f"{method} run is close to DPO with the primary reference; a larger mrpo.clip_eps{eps} lets the "
        "other references act (docs/methods.md#mrpo)"
    )


def method_diagnostics(metrics_path: Path) -> list[str]:
    """Lines for the closing table: each ``mrpo/*`` (``mdpo/*``) training metric's step-weighted mean
    over the run and its last value, and the clip warning when the run ended clipped (as
    :class:`ClipWatch` judged it). Nothing for other methods or without metrics.jsonl."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rows = [r for r in rows if "loss" in r and "step" in r]
    keys = sorted({k for r in rows for k in r if k.startswith(DIAGNOSTIC_PREFIXES)})
    if not keys:
        return []
    watch = ClipWatch(_clip_eps(RunDir(path.parent)))
    warning = None
    for row in rows:
        warning = watch.add(row) or warning
    warning = warning or watch.finish()
    sums: dict[str, float] = {}
    spans: dict[str, int] = {}
    last: dict[str, float] = {}
    previous = 0
    for row in rows:
        span = max(1, int(row["step"]) - previous)
        previous = int(row["step"])
        for k in keys:
            value = row.get(k)
            if isinstance(value, (int, float)) and math.isfinite(value):
                sums[k] = sums.get(k, 0.0) + span * value
                spans[k] = spans.get(k, 0) + span
                last[k] = value
    steps = int(rows[-1]["step"])
    lines = [f"method diagnostics (training, steps 1-{steps}: step-weighted mean, last logged value):"]
    width = max(len(k) for k in keys)
    for k in keys:
        if k not in spans:
            continue
        name = k.split("/", 1)[1]
        meaning = DIAGNOSTIC_MEANINGS.get("alpha" if name.startswith("alpha_") else name, "")
        lines.append(f"  {k:<{width}}  {sums[k] / spans[k]:>8.4f}  {last[k]:>8.4f}  {meaning}".rstrip())
    if warning:
        lines.append(f"warning: {warning}")
    return lines


class MetricsWindow:
    """The training metrics of the steps since the last logged row: each step's loss, the mean of
    its micro-batches' loss metrics and its gradient norm; tokens and time for the throughput."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.step_metrics: dict[str, list[float]] = {}
        self.tokens, self.start = 0, time.perf_counter()

    def add_micro_batch(self, metrics: dict, tokens: int) -> None:
        self.tokens += tokens
        for key, value in metrics.items():
            self.step_metrics.setdefault(key, []).append(float(value))

    def end_step(self, loss: float, grad_norm) -> None:
        self.values.setdefault("loss", []).append(loss)
        for key, values in self.step_metrics.items():
            self.values.setdefault(key, []).append(sum(values) / len(values))
        if grad_norm is not None:
            self.values.setdefault("grad_norm", []).append(float(grad_norm))
        self.step_metrics = {}

    def row(self, acc, *, epoch: float, learning_rate, skipped: int) -> dict[str, float]:
        """The metrics.jsonl row of these steps (averaged over processes); starts the next window."""
        elapsed = time.perf_counter() - self.start
        row = {key: sum(values) / len(values) for key, values in self.values.items()}
        if acc.num_processes > 1:
            row = mean_over_processes(row)
        row.update(
            epoch=epoch,
            learning_rate=learning_rate,
            tokens_per_second=self.tokens * acc.num_processes / max(elapsed, 1e-9),
            peak_memory_mb=peak_memory_mb(acc.device),
        )
        if skipped:
            row["nonfinite_skipped_steps"] = skipped
        self.values, self.tokens, self.start = {}, 0, time.perf_counter()
        return row
