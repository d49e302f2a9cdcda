"""One trainer per run directory: ``<run>/.lock`` names its holder, and the holder keeps it fresh.

The lock file holds the owner's pid, host, start time, the kernel's boot id and the process's own
start time (``/proc/PID/stat``). While the lock is held, a thread of the holding process touches the
file every :data:`HEARTBEAT_S` seconds (its mtime is the heartbeat). Another ``preftune train`` on
the same ``output_dir`` is refused at once, naming the holder and the heartbeat's age, unless the lock
is stale:

- its heartbeat is older than :data:`STALE_AFTER_S`, wherever it was taken (a job requeued on another
  node of a shared filesystem takes its dead predecessor's lock over once that is so);
- it was taken on this host by a pid that no longer runs (``kill -9``), or whose process started at
  another time than the one recorded, or before the last reboot (the pid number was reused, e.g. by a
  restarted container);
- it was taken by an earlier run of this SLURM job (the same ``SLURM_JOB_ID``, a lower
  ``SLURM_RESTART_COUNT``): SLURM starts a requeued job only once the previous run has ended, so its
  lock is taken over at once, on whichever node the job lands.

A stale lock is taken over with a warning. The lock is re-entrant within one process (a script that
trains, then resumes, in the same directory), released when training ends or fails, and at exit at
the latest. Hosts sharing a run directory are assumed to agree on the time within seconds (NTP).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .rundir import RunDir

HEARTBEAT_S = 5.0  # how often the holder refreshes the lock file's mtime
STALE_AFTER_S = 60.0  # a lock whose heartbeat is older than this is stale, whoever holds it


class RunDirLockedError(RuntimeError):
    """Another live process trains into this run directory."""


_held: dict[Path, dict] = {}  # path -> the details this process wrote into it
_beat_lock = threading.Lock()
_beat_thread: threading.Thread | None = None


# -------------------------------------------------------------------------------- process identity


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def slurm_job() -> dict | None:
    """This process's SLURM job and how often it was requeued (None outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restart = 0
    return {"id": job, "restart": restart}


def _me() -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "proc_start": process_start(pid),
        "slurm_job": slurm_job(),
    }


# --------------------------------------------------------------------------------------- reading


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def heartbeat_age(path: Path) -> float:
    """Seconds since the lock's holder last refreshed it."""
    return max(0.0, time.time() - _mtime(path))


def _describe(info: dict | None) -> str:
    if not info:
        return "an unknown process (unreadable lock file)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}"


def stale_reason(path: Path, info: dict | None) -> str | None:
    """Why the lock ``info`` (read from ``path``) is stale, or None when its holder may be alive."""
    age = heartbeat_age(path)
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:g} s)"
    held, mine = (info or {}).get("slurm_job"), slurm_job()
    if isinstance(held, dict) and mine and str(held.get("id")) == mine["id"]:
        try:
            before = int(held.get("restart", 0))
        except (TypeError, ValueError):
            before = None
        if before is not None and before < mine["restart"]:
            return (
                f"it was taken by SLURM job {mine['id']} before it was requeued (SLURM_RESTART_COUNT "
                f"{before}, now {mine['restart']}), so that run has ended"
            )
    if not info or info.get("host") != socket.gethostname():
        return None
    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        return None
    if not _pid_alive(pid):
        return "no longer running"
    recorded_boot, recorded_start = info.get("boot_id"), info.get("proc_start")
    if recorded_boot and boot_id() and recorded_boot != boot_id():
        return "taken before this host last booted"
    if recorded_start is not None and process_start(pid) not in (None, recorded_start):
        return f"pid {pid} now belongs to another process (it started at another time)"
    return None


# ------------------------------------------------------------------------------- taking, releasing


def acquire(run_dir: str | Path, warn: Callable[[str], None] = print) -> Path:
    """Take the run directory's lock (creating it atomically); raises :class:`RunDirLockedError`."""
    path = RunDir(run_dir).lock
    me = _me()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info and info.get("pid") == me["pid"] and info.get("host") == me["host"]:
                if path not in _held:
                    _held[path] = info
                    _start_heartbeat()
                return path  # this process already holds it
            if info is None and time.time() - _mtime(path) < 5:
                time.sleep(0.2)  # the holder is still writing its details
                continue
            reason = stale_reason(path, info)
            if reason is not None:
                if _take_over(path, info):
                    warn(f"taking over the lock of {path.parent} left by {_describe(info)}: {reason}")
                continue
            age = heartbeat_age(path)
            raise RunDirLockedError(
                f"{path.parent} is in use by {_describe(info)} (lock file {path}, heartbeat {age:.0f} s "
                f"ago); wait for that run to end; if it is gone, its lock is taken over once its heartbeat "
                f"is {STALE_AFTER_S:g} s old (in {max(0.0, STALE_AFTER_S - age):.0f} s), or delete {path}"
            ) from None
        details = {**me, "started": time.time(), "heartbeat_s": HEARTBEAT_S}
        with os.fdopen(fd, "w") as f:
            json.dump(details, f)
        _held[path] = details
        _start_heartbeat()
        return path
    raise RunDirLockedError(f"{path.parent} is in use by {_describe(_read(path))} (lock file {path})")


def _take_over(path: Path, info: dict | None) -> bool:
    """Remove the stale lock ``info``, unless another process replaced it meanwhile (then False)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # someone else removed it: try again
    if _read(aside) != info:  # a fresh lock, created between our read and the rename: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def release(run_dir: str | Path) -> None:
    """Give the lock back (only if this process holds it)."""
    path = RunDir(run_dir).lock
    mine = _held.pop(path, None)
    if mine is None:
        return
    info = _read(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == mine.get("host"):
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- heartbeat


def beat() -> None:
    """Refresh every lock this process holds (the heartbeat thread calls it every HEARTBEAT_S)."""
    for path, mine in list(_held.items()):
        info = _read(path)
        if info is None or info.get("pid") != mine.get("pid") or info.get("started") != mine.get("started"):
            continue  # no longer ours (taken over after a long stall): never refresh another's lock
        try:
            os.utime(path)
        except OSError:
            pass


def _heartbeat_loop() -> None:
    global _beat_thread
    while True:
        time.sleep(HEARTBEAT_S)
        with _beat_lock:
            if not _held:
                _beat_thread = None
                return
        beat()


def _start_heartbeat() -> None:
    global _beat_thread
    with _beat_lock:
        if _beat_thread is None or not _beat_thread.is_alive():
            _beat_thread = threading.Thread(
                target=_heartbeat_loop, name="preftune-lock-heartbeat", daemon=True
            )
            _beat_thread.start()


@atexit.register
def release_all() -> None:
    """Give back every lock this process holds (at exit; before ``os._exit``, which skips atexit)."""
    for path in list(_held):
        release(path.parent)
