"""One trainer per run directory: ``<run>/.lock`` holds the owner's pid, host and start time.

A second ``preftune train`` on the same ``output_dir`` fails at once, naming the holder. A lock left by
a process that died (same host, pid no longer alive, e.g. after ``kill -9``) is taken over with a
warning. The lock is re-entrant within one process (a script that trains, then resumes, in the same
directory), released when training ends or fails, and at exit at the latest.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .rundir import RunDir


class RunDirLockedError(RuntimeError):
    """Another live process trains into this run directory."""


_held: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "an unknown process (unreadable lock file)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}"


def acquire(run_dir: str | Path, warn: Callable[[str], None] = print) -> Path:
    """Take the run directory's lock (creating it atomically); raises :class:`RunDirLockedError`."""
    path = RunDir(run_dir).lock
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            if info and info.get("pid") == me["pid"] and info.get("host") == me["host"]:
                _held.add(path)
                return path  # this process already holds it
            if info and info.get("host") == me["host"] and not _pid_alive(int(info.get("pid", -1))):
                warn(f"taking over the lock of {path.parent} left by {_describe(info)}, no longer running")
                path.unlink(missing_ok=True)
                continue
            if info is None and time.time() - _mtime(path) < 5:
                time.sleep(0.2)  # the holder is still writing its details
                continue
            raise RunDirLockedError(
                f"{path.parent} is in use by {_describe(info)} (lock file {path}); wait for that run "
                "to end, or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump({**me, "started": time.time()}, f)
        _held.add(path)
        return path
    raise RunDirLockedError(f"{path.parent} is in use by {_describe(_read(path))} (lock file {path})")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release(run_dir: str | Path) -> None:
    """Give the lock back (only if this process holds it)."""
    path = RunDir(run_dir).lock
    if path not in _held:
        return
    _held.discard(path)
    info = _read(path)
    if info and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release(path.parent)
