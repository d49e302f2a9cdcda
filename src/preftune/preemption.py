"""Preemption: SIGTERM or SIGUSR1 stop a run at the end of its optimizer step, checkpointed, exit 75.

Schedulers stop a job by sending SIGTERM (Kubernetes, SLURM at the end of the grace it grants) or a
chosen signal ahead of time (SLURM's ``--signal=B:USR1@120``, forwarded by the batch script), then
SIGKILL after a grace period (30 s by default for both). What preftune does with it:

1. The handler records the signal and its time, nothing else: no I/O, no collective, so a signal
   arriving inside a forward, a backward or an all-reduce breaks nothing.
2. After each optimizer step, :func:`at_step_end` asks whether any process got a signal (one
   all-reduce of a flag under several processes), so every rank stops after the same step.
3. The checkpoint of that step is written through the trainer's normal path (DCP under FSDP) unless
   the step was just checkpointed; then :class:`Preempted` (exit code :data:`EXIT_PREEMPTED`) unwinds,
   releasing the run lock, and the main process prints one line::

       preftune train: preempted at step 7 (SIGTERM): checkpoint-7 written; the same command resumes it

4. A watchdog thread bounds all of it by ``preemption_grace_s`` from the signal: if the step or the
   checkpoint is not done by then, it prints which complete checkpoint remains, releases the lock and
   exits with the same code (a partly written ``checkpoint-N.tmp`` is never resumed from). A signal
   before the first step (setup: loading, scoring references) exits at once: nothing new to save.

``preftune iterate`` watches the whole run (``watch(..., command="iterate")``; a round's training
nests in it): its sampling stops after the batch in progress (:func:`signalled`, local) and every
rank meets :func:`at_stage_end` after each stage, which raises :class:`Preempted` on all of them.

SIGINT (Ctrl-C) keeps its behaviour: KeyboardInterrupt, exit 130 (see :mod:`preftune.cli`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import TrainingError
from .rundir import RunDir

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped cleanly, the same command continues it
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)
DEFAULT_GRACE_S = 25.0  # under SLURM's KillWait and Kubernetes' terminationGracePeriodSeconds (30 s)


class Preempted(TrainingError):
    """The run stopped on a preemption signal; the message is the one line to print."""

    exit_code = EXIT_PREEMPTED
    every_rank = True  # every process raises it at the same step: not a failure of one rank


def _signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "signal"
    except ValueError:
        return f"signal {signum}"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Watch:
    """One run's preemption state: the signal (if any), the phase, the watchdog."""

    def __init__(
        self,
        output_dir: str | Path,
        grace_s: float,
        resumes_itself: bool,
        stage: Callable[[], str] = lambda: "setup",
        command: str = "train",
        kept: Callable[[], str] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.stage = stage  # the trainer's stage: "setup", "resume from ...", "step N", ...
        self.command = command  # the line starts "preftune <command>:"
        self.kept = kept  # what a stop at this moment leaves to resume from (default: the checkpoints)
        self.grace_s = float(grace_s)
        self.resumes_itself = resumes_itself  # resume: auto / true: the same command continues it
        self.signum: int | None = None
        self.signal_at: float | None = None  # time.monotonic() of the first signal
        self.phase = "setup"  # setup -> training (a step ended) -> finishing (the last one) -> done
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: dict[int, object] = {}

    # -- the handler: a flag and a time, nothing else ------------------------------------------------

    def _handler(self, signum, frame) -> None:
        if self.signal_at is None:
            self.signal_at = time.monotonic()
            self.signum = signum

    def install(self) -> bool:
        """Install the handlers (main thread only; False elsewhere) and start the watchdog."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        self._thread = threading.Thread(target=self._watchdog, name="preftune-preemption", daemon=True)
        self._thread.start()
        return True

    def uninstall(self) -> None:
        self.phase = "done"
        self._stop.set()
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)

    # -- what the line says --------------------------------------------------------------------------

    def how_to_continue(self) -> str:
        if self.resumes_itself:
            return "the same command resumes it"
        return "rerun with resume=true to continue (with resume: auto the same command does)"

    def _remaining(self) -> str:
        if self.kept is not None:
            return f"{self.kept()}; {self.how_to_continue()}"
        kept = RunDir(self.output_dir).checkpoints()
        if not kept:
            return f"no complete checkpoint in {self.output_dir} (the run starts over)"
        return f"{kept[-1]} is the last complete checkpoint; {self.how_to_continue()}"

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.signal_at if self.signal_at is not None else 0.0

    # -- the watchdog: the grace budget holds even if a step or a checkpoint takes too long ----------

    def _watchdog(self) -> None:
        while not self._stop.wait(0.05):
            if self.signal_at is None or self.phase == "done":
                continue
            name = _signal_name(self.signum)
            if self.phase == "setup" and self._before_first_step():
                when = "before the first step" if self.command == "train" else "during setup"
                self._exit(f"preempted ({name}) {when}: nothing new to save; {self._remaining()}")
            elif self.seconds_since_signal() >= self.grace_s:
                self._exit(
                    f"preempted ({name}): the step and its checkpoint did not finish within "
                    f"preemption_grace_s={self.grace_s:g} (exiting {self.seconds_since_signal():.1f} s "
                    f"after the signal); {self._remaining()}"
                )

    def _before_first_step(self) -> bool:
        try:
            stage = self.stage()
        except Exception:  # the trainer is being built
            return True
        return stage == "setup" or stage.startswith("resume")

    def _exit(self, line: str) -> None:
        from . import runlock

        if _is_main_process():
            print(f"preftune {self.command}: {line}", file=sys.stderr, flush=True)
        runlock.release_all()  # os._exit runs no atexit handler: an iterate run holds its round's too
        sys.stdout.flush()
        os._exit(EXIT_PREEMPTED)


_active: Watch | None = None


@contextlib.contextmanager
def watch(
    cfg,
    stage: Callable[[], str] = lambda: "setup",
    command: str = "train",
    kept: Callable[[], str] | None = None,
) -> Iterator[Watch | None]:
    """Handle SIGTERM / SIGUSR1 for the duration of one training run (``cfg``: its TrainConfig;
    ``stage``: what the trainer is doing, so that a signal before its first step exits at once) or
    of a ``preftune iterate`` run (``command="iterate"``; ``kept()``: what its files keep)."""
    global _active
    if _active is not None:  # nested (a round's training inside iterate): the outer one handles signals
        yield _active
        return
    resumes = cfg.resume in (True, "auto")
    w = Watch(cfg.output_dir, cfg.preemption_grace_s, resumes, stage, command, kept)
    if not w.install():
        yield None
        return
    _active = w
    try:
        yield w
    finally:
        _active = None
        w.uninstall()


def signalled() -> bool:
    """Whether this process got a preemption signal (local, no collective): a loop that writes as it
    goes (iterate's sampling) stops after the item in progress."""
    return _active is not None and _active.signal_at is not None


def requested(device=None) -> bool:
    """Whether any process got a preemption signal (collective under several processes)."""
    w = _active
    local = w is not None and w.signal_at is not None
    from . import distributed

    if not distributed.is_distributed():
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def at_step_end(trainer, done: int, total: int, optimizer, scheduler) -> None:
    """Called once per optimizer step, after its periodic checkpoint: on a signal (any rank's),
    checkpoint step ``done`` (unless just written) and raise :class:`Preempted` on every rank."""
    w = _active
    if w is None:
        return
    w.phase = "training"
    if done >= total:  # the last step: finishing the run is its checkpoint (the watchdog bounds it)
        w.phase = "finishing"
        return
    run = trainer.run  # the prepared run (preftune.prepare_run)
    if not requested(run.accelerator.device):
        return
    cfg = run.cfg
    name = _signal_name(w.signum) if w.signal_at is not None else "another process's signal"
    started = time.monotonic()
    if not (cfg.save_steps > 0 and done % cfg.save_steps == 0):
        trainer._checkpoint(done, optimizer, scheduler)
    path = run.run_dir.checkpoint(done)
    raise Preempted(
        f"preempted at step {done} ({name}): {path.name} written in {time.monotonic() - started:.1f} s "
        f"({w.seconds_since_signal():.1f} s after the signal, preemption_grace_s={w.grace_s:g}); "
        f"{w.how_to_continue()} ({path})"
    )


def at_stage_end(kept: Callable[[], str], device=None) -> None:
    """Called by every rank of ``preftune iterate`` between its stages (after the sampled batches,
    the judging, the pairs, a round's evaluation): on a signal (any rank's) raise :class:`Preempted`
    on every rank; ``kept()`` says what stays on disk ("in round 2 sampling: 3 of 5 batches ...")."""
    w = _active
    if w is None or not requested(device):
        return
    name = _signal_name(w.signum) if w.signal_at is not None else "another process's signal"
    raise Preempted(
        f"preempted {kept()} ({name}; {w.seconds_since_signal():.1f} s after the signal, "
        f"preemption_grace_s={w.grace_s:g}); {w.how_to_continue()}"
    )
