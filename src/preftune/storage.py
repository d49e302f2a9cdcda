"""A write that the disk refuses (full, quota, read-only, I/O error) is one line naming what and where.

Whatever library raises it: ``OSError`` (ENOSPC, EDQUOT, EIO, EROFS, EFBIG), safetensors'
``SafetensorError`` ("No space left on device" in its message), torch.distributed.checkpoint's
``CheckpointException`` (a failure per rank, possibly one of those). :func:`raise_if_storage` turns
any of them into a :class:`StorageError` naming the path and the free space; the callers remove their
temporary file or directory first and name the checkpoint that stays intact.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import TrainingError
from .rundir import human_bytes

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
STORAGE_WORDS = (
    "no space left on device",
    "disk quota exceeded",
    "read-only file system",
    "input/output error",
)


class StorageError(TrainingError):
    """Writing a checkpoint, the final model, a cache entry or metrics failed on the storage."""


def _causes(error: BaseException):
    """``error``, what caused it, and the per-rank failures of a DCP CheckpointException."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, BaseException):
                    todo.append(inner)


def storage_reason(error: BaseException, *, any_os_error: bool = False) -> str | None:
    """Why the storage refused the write (e.g. ``No space left on device``), or None if ``error`` is
    not a storage failure. ``any_os_error``: count every OSError (inside a write, there is no other kind)."""
    for e in _causes(error):
        if isinstance(e, OSError) and (any_os_error or e.errno in STORAGE_ERRNOS):
            return e.strerror or " ".join(str(e).split()) or type(e).__name__
        text = " ".join(str(e).split())
        for word in STORAGE_WORDS:
            if word in text.lower():
                return word[0].upper() + word[1:]
        if any_os_error and type(e).__name__ == "SafetensorError":
            return text or "SafetensorError"
    return None


def free_space(path: str | Path) -> str:
    """``12.3 MB free`` on the filesystem holding ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{human_bytes(shutil.disk_usage(p).free)} free on the filesystem of {p}"
    except OSError:
        return f"free space of {p} unknown"


def raise_if_storage(path: str | Path, error: BaseException, *, removed: str | Path | None = None) -> None:
    """Raise a one-line :class:`StorageError` for ``error`` (raised while writing ``path``) if the
    storage refused it; return otherwise (the caller re-raises the original error)."""
    reason = storage_reason(error, any_os_error=True)
    if reason is None:
        return
    gone = f"; the partial {Path(removed).name} was removed" if removed is not None else ""
    raise StorageError(f"could not write {path}: {reason} ({free_space(path)}{gone})") from error


def intact_hint(output_dir: str | Path | None) -> str:
    """Which checkpoint of ``output_dir`` a failed write left intact, and how to continue from it."""
    from .rundir import RunDir

    kept = RunDir(output_dir).checkpoints() if output_dir is not None else []
    if not kept:
        return "no complete checkpoint to continue from; free some space and rerun"
    return f"{kept[-1]} is intact: free some space and rerun with resume=true (or resume: auto) to continue"


def stages_hint(output_dir: str | Path | None) -> str:
    """How ``preftune iterate`` continues after a failed write: it keeps every finished stage (no
    checkpoint to name; a round's training names its own)."""
    where = f" in {output_dir}" if output_dir is not None else ""
    return (
        f"free some space and rerun with resume=true: the finished stages{where} are kept and the run "
        "continues at the stage it reached"
    )


def with_intact_hint(
    error: StorageError, output_dir: str | Path | None, hint: str | None = None
) -> StorageError:
    """``error`` with ``hint`` (default :func:`intact_hint`) added, unless it names what is intact already."""
    if "intact" in str(error) or "finished stages" in str(error):
        return error
    hinted = StorageError(f"{error}; {hint or intact_hint(output_dir)}")
    hinted.__cause__ = error
    return hinted


def one_line(error: BaseException, output_dir: str | Path | None, hint: str | None = None) -> str | None:
    """The one-line explanation of a storage failure raised outside the wrapped writes (an OSError
    whose errno is the disk's, anywhere), or None when ``error`` is no storage failure. ``hint`` says
    how to continue (default: :func:`intact_hint`, the intact checkpoint of ``output_dir``)."""
    if isinstance(error, StorageError):
        return str(with_intact_hint(error, output_dir, hint))
    reason = storage_reason(error)
    if reason is None:
        return None
    where = getattr(error, "filename", None) or output_dir or Path.cwd()
    return f"could not write {where}: {reason} ({free_space(where)}); {hint or intact_hint(output_dir)}"
