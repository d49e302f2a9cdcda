"""Intra-op threads that fit the machine: the CPUs this process may use, shared between local ranks.

PyTorch starts one intra-op thread per physical core of the machine, whatever the process may use
(a container's CPU set, ``taskset``) and whatever else runs. On a busy machine that costs a lot: on
2 cores with one other busy process, a 6-step training took 48.7 s at the default thread count and
23.1 s with ``OMP_NUM_THREADS=1`` (20.5 s when idle). So preftune picks, in this order:

1. the ``threads`` config key, when set;
2. ``OMP_NUM_THREADS``, when set (PyTorch read it already; preftune leaves it);
3. the CPUs of this process's affinity (``os.sched_getaffinity``) divided between the local ranks of
   a torchrun / accelerate launch (``LOCAL_WORLD_SIZE``), at least 1.

With the automatic choice, when the machine is oversubscribed -- other runnable tasks (the load of
/proc/loadavg now, else the 1-minute load average) plus these threads exceed the usable CPUs, or
other preftune processes are running -- one line says so and how to set fewer threads, once per
process. Nothing here imports torch at module level.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "threads", "OMP_NUM_THREADS" or "affinity"
    usable_cpus: int
    local_ranks: int
    note: str | None = None  # the oversubscription line, if any


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_ranks(env: dict | None = None) -> int:
    """Processes of this job on this machine (torchrun / accelerate set LOCAL_WORLD_SIZE)."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def busy_cpus(samples: int = 5, interval: float = 0.02, loadavg: str = "/proc/loadavg") -> float | None:
    """CPUs kept busy by other tasks now: the runnable tasks of /proc/loadavg (its 4th field, R/T)
    less this one, averaged over a few samples; the 1-minute load average where that is not
    available (it lags, and counts this process's own recent work). None if neither is."""
    import time

    counts = []
    for i in range(samples):
        try:
            running = int(Path(loadavg).read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            break
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return sum(counts) / len(counts)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def other_preftune_processes(proc: str = "/proc") -> int:
    """Running processes of another preftune job: a command line naming preftune, not this process,
    its parent (a launcher) nor its siblings (the other ranks of this job)."""
    me, parent = os.getpid(), os.getppid()
    count = 0
    try:
        entries = [p for p in Path(proc).iterdir() if p.name.isdigit()]
    except OSError:
        return 0
    for entry in entries:
        pid = int(entry.name)
        if pid in (me, parent):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else -1
        if ppid in (me, parent):  # our own workers, or another rank of this job
            continue
        if _is_preftune(argv):
            count += 1
    return count


def _is_preftune(argv: list[bytes]) -> bool:
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return False
    if os.path.basename(args[0]) == "preftune":
        return True
    python = os.path.basename(args[0]).startswith("python")
    return python and any(
        os.path.basename(a) == "preftune" or a == "preftune" or a.startswith("preftune.") for a in args[1:3]
    )


def choose_threads(
    configured: int | None,
    env: dict | None = None,
    *,
    cpus: int | None = None,
    busy: float | None = None,
    others: int | None = None,
) -> ThreadChoice:
    """The intra-op thread count for this process and, with the automatic choice on an oversubscribed
    machine, the line that says so. ``cpus`` (usable CPUs), ``busy`` (CPUs other tasks keep busy) and
    ``others`` (other preftune processes) default to what the machine reports."""
    env = os.environ if env is None else env
    cpus = usable_cpus() if cpus is None else cpus
    ranks = local_ranks(env)
    if configured:
        return ThreadChoice(configured, "threads", cpus, ranks)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS", cpus, ranks)
    threads = max(1, cpus // ranks)
    busy = busy_cpus() if busy is None else busy
    others = other_preftune_processes() if others is None else others
    # the other ranks of this job are runnable too: they are not "other" load
    elsewhere = max(0, round(busy) - (ranks - 1)) if busy is not None else 0
    reasons = []
    if elsewhere >= 1 and elsewhere + threads * ranks > cpus:
        reasons.append(
            f"about {elsewhere} other runnable task{'s' if elsewhere != 1 else ''} for the {cpus} "
            f"CPU{'s' if cpus != 1 else ''} this process may use"
        )
    if others:
        reasons.append(f"{others} other preftune process{'es' if others != 1 else ''} running")
    note = None
    if reasons:
        per = f" per process ({ranks} local ranks)" if ranks > 1 else ""
        head = f"the machine is oversubscribed ({'; '.join(reasons)}): "
        if threads > 1:
            fewer = max(1, min(threads - 1, (cpus - min(elsewhere, cpus - 1)) // ranks))
            note = (
                f"{head}{threads} intra-op threads{per} share the CPUs with them and may run several "
                f"times slower; set fewer with the `threads` config key (e.g. threads={fewer}; "
                f"`preftune demo --threads {fewer}`) or OMP_NUM_THREADS={fewer}"
            )
        else:
            note = (
                f"{head}training runs 1 intra-op thread{per} (the fewest; `threads` config key or "
                "OMP_NUM_THREADS) and will be slower while the other tasks run"
            )
    return ThreadChoice(threads, "affinity", cpus, ranks, note)


_said: set[str] = set()


def configure_threads(configured: int | None, log: Callable[[str], None] | None = None) -> ThreadChoice:
    """Apply :func:`choose_threads` to torch (``torch.set_num_threads``; OMP_NUM_THREADS is left to
    torch, which read it at start) and print its line, once per machine (local rank 0)."""
    import torch

    choice = choose_threads(configured)
    if choice.source != "OMP_NUM_THREADS" and torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if choice.note and log is not None and os.environ.get("LOCAL_RANK", "0") == "0" and "busy" not in _said:
        _said.add("busy")  # once per process (a train followed by generation_eval, the tests)
        log(choice.note)
    return choice
