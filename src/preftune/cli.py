"""Command line: ``preftune train | precompute | eval | demo | report``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

USAGE = """preftune <command> ...

  train CONFIG.yaml [key=value ...]      train; writes a run directory (output_dir)
  precompute CONFIG.yaml [key=value ...] score references / entropies / embeddings ahead of training
  eval RUN_DIR|CONFIG.yaml [--data FILE] held-out preference metrics of a checkpoint
  demo [--method M] [--quick]            MRPO on SmolLM2-135M with a Gemma-3 reference, before/after report
  report RUN_DIR [RUN_DIR ...]           plots and report.md for one run, or several runs compared
  config                                 every config key with its default and meaning

exit codes: 0 done, 1 the run failed (one line says why; unexpected errors leave error.log in the run
directory), 2 bad config or data (nothing was written), 3 a NaN/Inf loss or gradient stopped training,
130 interrupted (Ctrl-C; the line names the checkpoint and the resume=true command)
"""


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a message from a library may span several)."""
    return " ".join(str(error).split())


def _config_args(argv: list[str], prog: str):
    parser = argparse.ArgumentParser(prog=f"preftune {prog}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0.2 mrpo.clip_eps=0.05")
    return parser.parse_args(argv)


def _output_dir(command: str, rest: list[str]) -> Path | None:
    """The run directory a ``train``/``precompute`` command line names (None if it cannot tell)."""
    if command not in ("train", "precompute") or not rest:
        return None
    try:
        from .config import load_config

        return Path(load_config(rest[0], [a for a in rest[1:] if "=" in a]).output_dir)
    except Exception:
        return None


def _interrupted(command: str, rest: list[str]) -> str:
    """Ctrl-C: one line naming the last checkpoint and the command that continues from it."""
    out = _output_dir(command, rest)
    if command != "train" or out is None:
        return f"preftune {command}: interrupted"
    from .rundir import RunDir

    kept = RunDir(out).checkpoints()
    if not kept:
        return f"preftune train: interrupted before the first checkpoint in {out}; rerun to start over"
    again = " ".join(["preftune", "train", *[a for a in rest if a != "resume=false"]])
    if "resume=true" not in rest:
        again += " resume=true"
    return f"preftune train: interrupted; last checkpoint {kept[-1]}; continue with: {again}"


def _crash_log(command: str, rest: list[str], error: BaseException) -> Path:
    """The full traceback of an unexpected error, in the run directory when there is one."""
    import tempfile
    import time
    import traceback

    from .rundir import RunDir

    out = _output_dir(command, rest)
    path = RunDir(out).error_log if out is not None and out.is_dir() else None
    if path is None:
        path = Path(tempfile.gettempdir()) / f"preftune-error-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} preftune {' '.join([command, *rest])}\n"
    )
    try:
        with open(path, "a") as f:
            f.write(header + text + "\n")
    except OSError:
        path = Path(tempfile.gettempdir()) / f"preftune-error-{os.getpid()}.log"
        path.write_text(header + text)
    return path


def _second_interrupt_exits(signum, frame):
    """The first Ctrl-C unwinds (closing files, releasing the run's lock); a second one exits at once."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from .config import ConfigError
    from .data import DataError
    from .extras import MissingDependency

    previous = None
    try:
        previous = signal.signal(signal.SIGINT, _second_interrupt_exits)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        pass
    try:
        return _run(command, rest)
    except KeyboardInterrupt:
        print(_interrupted(command, rest), file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, MissingDependency) as e:
        # Validation runs before anything is loaded or written: an earlier run's files are intact.
        # A missing optional package names the extra that installs it.
        print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # the trainer's own errors carry their explanation
        from .checkpointing import TrainingError

        if isinstance(e, TrainingError):
            print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
            return getattr(e, "exit_code", 1)
        log_path = _crash_log(command, rest, e)
        print(
            f"preftune {command}: unexpected error: {type(e).__name__}: {_one_line(e)[:300]} "
            f"(full traceback: {log_path})",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(command: str, rest: list[str]) -> int:
    if command == "train":
        from .trainer import train

        args = _config_args(rest, "train")
        result = train(args.config, args.overrides)
        print(f"run directory: {result.output_dir}\nfinal model:   {result.final_model_dir}")
        return 0
    if command == "precompute":
        from .evaluation import precompute

        args = _config_args(rest, "precompute")
        precompute(args.config, args.overrides)
        return 0
    if command == "eval":
        from .evaluation import main as eval_main

        return eval_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "report":
        from .report import main as report_main

        return report_main(rest)
    if command == "config":
        from .config import describe

        print(describe())
        return 0
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
