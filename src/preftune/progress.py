"""Progress as a terminal and a log file each want it.

On a terminal, :func:`bar` is an ordinary tqdm bar redrawn in place. When stderr is not a terminal
(redirected to a file, a pipe, a cluster's log), the same bar prints a plain line now and then
(at its start, every :data:`PLAIN_INTERVAL_S` seconds, at its end): no carriage returns, no bar
characters, one line per report. :func:`library_bars` does the same for the bars of transformers,
huggingface_hub and datasets ("Loading weights", downloads, "Generating train split"): they are
turned off, for the duration of a run, when ``progress`` is off or stderr is not a terminal, and
set back as they were afterwards. Imports nothing of preftune.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

# How often a bar reports on a non-terminal stderr: a 20-minute run writes ~40 lines, not 20 000.
PLAIN_INTERVAL_S = 30.0
# {postfix}: what the bar carries besides the count (the training loss, ", loss=0.6931"), as on a terminal
PLAIN_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left{postfix}"
)
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {elapsed} elapsed{postfix}"


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr, where bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


# tqdm moves the cursor (ESC[A, up) around a nested bar that does not stay (leave=False, the held-out
# evaluation inside the training bar): meaningless in a file, where it printed a line "^[[A"
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns each redraw (``\\r`` + status + padding) into one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = _CURSOR_MOVES.sub("", text).replace("\r", "").strip()
        if line and line != self.last:  # close() redraws the last report: in a file, a second copy
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Any = None, *, enabled: bool = True, stream: TextIO | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (``kwargs`` as tqdm's) that is off unless ``enabled``, drawn in place on a terminal,
    and reported as occasional plain lines otherwise."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=True, **kwargs)
    if interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=stream, **kwargs)
    from tqdm.std import tqdm as plain_tqdm

    kwargs.pop("dynamic_ncols", None)
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    return plain_tqdm(
        iterable,
        file=_Lines(stream),
        mininterval=PLAIN_INTERVAL_S,
        maxinterval=PLAIN_INTERVAL_S,
        bar_format=PLAIN_FORMAT if total else PLAIN_FORMAT_NO_TOTAL,
        **kwargs,
    )


def _states() -> list[tuple[Any, Any, Any]]:
    """(is enabled, enable, disable) of each library's bars; transformers' first (it also switches
    huggingface_hub's, which are then set back on their own)."""
    found = []
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        found.append(
            (
                hf_logging.is_progress_bar_enabled,
                hf_logging.enable_progress_bar,
                hf_logging.disable_progress_bar,
            )
        )
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        found.append((lambda: not are_progress_bars_disabled(), enable_progress_bars, disable_progress_bars))
    with contextlib.suppress(ImportError):
        ds_tqdm = importlib.import_module("datasets.utils.tqdm")  # the module, not its tqdm class

        found.append(
            (
                lambda: not ds_tqdm.are_progress_bars_disabled(),
                ds_tqdm.enable_progress_bars,
                ds_tqdm.disable_progress_bars,
            )
        )
    return found


@contextlib.contextmanager
def library_bars(progress: bool, stream: TextIO | None = None) -> Iterator[None]:
    """Within the block, the libraries' own progress bars are shown only when ``progress`` is on and
    ``stream`` (default stderr) is a terminal; afterwards they are as they were."""
    if progress and interactive(stream):
        yield
        return
    with warnings.catch_warnings():  # an environment variable that has priority warns, and wins
        warnings.simplefilter("ignore")
        saved = [(was(), enable, disable) for was, enable, disable in _states()]
        for _, _, disable in saved:
            disable()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for was, enable, disable in saved:
                (enable if was else disable)()
