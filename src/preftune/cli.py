"""Command line: ``preftune train | precompute | eval | demo | report | config | presets | cache``."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import warnings
from pathlib import Path

from . import __version__
from .rundir import human_bytes

USAGE = """usage: preftune <command> [options]    (preftune <command> --help for each command's options)

  train CONFIG.yaml [KEY=VALUE ...]      train; writes a run directory (output_dir)
  iterate CONFIG.yaml [KEY=VALUE ...]    on-policy rounds: sample, judge, pair, train, repeat (rounds:)
  precompute CONFIG.yaml [KEY=VALUE ...] score references / entropies / embeddings ahead of training
  eval RUN_DIR|CONFIG.yaml [--data FILE] held-out preference metrics (and answers) of a trained run
  demo [--method M] [--quick]            DPO + SFT term on SmolLM2-135M (LoRA), before/after report
  report RUN_DIR [RUN_DIR ...]           plots and report.md for one run, or several runs compared
                                         (an iterate run: every rounds.jsonl metric against the round)
  config                                 every config key with its default and meaning
  presets                                the built-in models: size, where cached, whether converted
  cache ls | cache clear [KIND ...]      what the cache holds, and removing it

options:
  -h, --help     this message
  -V, --version  the installed preftune version

exit codes: 0 done, 1 the run failed (one line says why; unexpected errors leave error.log in the run
directory), 2 bad config or data (nothing was written), 3 a NaN/Inf loss or gradient stopped training,
75 preempted (SIGTERM or SIGUSR1: the step in progress was finished and checkpointed; the same
command continues with resume: auto), 130 interrupted (Ctrl-C; the line names the checkpoint and
the resume=true command)
"""

COMMANDS = ("train", "iterate", "precompute", "eval", "demo", "report", "config", "presets", "cache")


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a message from a library may span several)."""
    return " ".join(str(error).split())


def _config_parser(prog: str) -> argparse.ArgumentParser:
    what = {
        "train": "Train as CONFIG.yaml says; writes the run directory named by its output_dir.",
        "iterate": "On-policy rounds (the config's rounds: section): sample from the policy, judge the "
        "samples, build pairs, train on them, repeat; writes output_dir/round-N/, rounds.jsonl, final/.",
        "precompute": "Score the references (and MallowsPO entropies, RPO embeddings) into the cache, "
        "so that a later `preftune train` with the same config starts training at once.",
    }[prog]
    parser = argparse.ArgumentParser(
        prog=f"preftune {prog}",
        usage=f"preftune {prog} CONFIG.yaml [KEY=VALUE ...]",
        description=what,
        epilog="Every config key, its default and meaning: preftune config (or docs/config.md).",
    )
    parser.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="YAML config file")
    parser.add_argument(
        "overrides",
        metavar="KEY=VALUE",
        nargs="*",
        default=[],
        help="optional config overrides applied after the file, e.g. beta=0.2 mrpo.clip_eps=0.05",
    )
    return parser


def _config_args(argv: list[str], prog: str):
    parser = _config_parser(prog)
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("a config file is required (CONFIG.yaml); see examples/ for some")
    return args


def _simple_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"preftune {prog}", description=description)


def _presets(argv: list[str]) -> int:
    parser = _simple_parser("presets", "List the built-in model presets (usable as `model:` by name).")
    parser.add_argument(
        "--cache-dir", help="cache root to look in (default: $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    args = parser.parse_args(argv)
    from .models.presets import list_presets

    rows = list_presets(args.cache_dir)
    width = max(len(r["name"]) for r in rows)
    print(f"{'preset':<{width}}  {'converted':<9}  {'size':>8}  cached at")
    for r in rows:
        size = human_bytes(r["bytes"]) if r["converted"] else "—"
        print(f"{r['name']:<{width}}  {'yes' if r['converted'] else 'no':<9}  {size:>8}  {r['path']}")
        print(f"{'':<{width}}  {r['description']}")
    print("\na preset is converted on first use (about a minute); `preftune cache clear models` removes them")
    return 0


def _cache(argv: list[str]) -> int:
    from .cache import CACHE_KINDS, cache_usage, clear_cache

    parser = _simple_parser(
        "cache",
        "Show or clean preftune's cache. Everything in it is derived data (converted presets, reference "
        "scores, embeddings), recomputed when next needed.",
    )
    parser.add_argument("--cache-dir", help="cache root (default: $PREFTUNE_CACHE or ~/.cache/preftune)")
    sub = parser.add_subparsers(dest="action", metavar="{ls,clear}", required=True)
    sub.add_parser("ls", help="list the cache's folders with their sizes", description="List the cache.")
    clear = sub.add_parser(
        "clear",
        help="remove cache folders",
        description="Remove cache folders (all of them without KIND).",
    )
    clear.add_argument(
        "kinds",
        metavar="KIND",
        nargs="*",
        help=f"what to remove: {', '.join(CACHE_KINDS)} (default: everything)",
    )
    args = parser.parse_args(argv)
    from .cache import default_cache_dir

    root = args.cache_dir or default_cache_dir()
    if args.action == "ls":
        rows = cache_usage(root)
        print(f"cache: {root}")
        if not rows:
            print("(empty)")
            return 0
        width = max(len(r["kind"]) for r in rows)
        for r in rows:
            print(
                f"  {r['kind']:<{width}}  {human_bytes(r['bytes']):>8}  {r['entries']:>4} {'entry  ' if r['entries'] == 1 else 'entries'}  {r['meaning']}"
            )
        print(f"  {'total':<{width}}  {human_bytes(sum(r['bytes'] for r in rows)):>8}")
        return 0
    try:
        removed = clear_cache(args.kinds, root)
    except ValueError as e:
        clear.error(str(e))
    for path, size in removed:
        print(f"removed {path} ({human_bytes(size)})")
    print(f"freed {human_bytes(sum(s for _, s in removed))}" if removed else f"nothing to remove in {root}")
    return 0


def _quiet_third_party_warnings() -> None:
    """Hide libraries' deprecation notices (e.g. transformers' is_gradient_checkpointing FutureWarning):
    they are about library internals, not about anything the user can change. ``python -W default``
    or PYTHONWARNINGS shows them again."""
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning):
        for module in ("transformers", "peft", "accelerate", "torch", "datasets", "huggingface_hub", "trl"):
            warnings.filterwarnings("ignore", category=category, module=rf"{module}(\.|$)")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def _output_dir(command: str, rest: list[str]) -> Path | None:
    """The run directory a ``train``/``precompute``/``iterate`` command line names (None if it cannot tell)."""
    if command not in ("train", "precompute", "iterate") or not rest:
        return None
    try:
        from .config import load_config

        return Path(load_config(rest[0], [a for a in rest[1:] if "=" in a]).output_dir)
    except Exception:
        return None


def _interrupted(command: str, rest: list[str]) -> str:
    """Ctrl-C: one line naming the last checkpoint and the command that continues from it."""
    if command == "iterate":  # every finished stage is on disk: resume=true continues after it
        again = " ".join(["preftune", "iterate", *[a for a in rest if a != "resume=false"]])
        return f"preftune iterate: interrupted; continue with: {again}" + (
            "" if "resume=true" in rest else " resume=true"
        )
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
    if argv[0] in ("-V", "--version"):
        print(f"preftune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
        hint = f" Did you mean `preftune {close[0]}`?" if close else ""
        print(f"preftune: unknown command {command!r}.{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    _quiet_third_party_warnings()
    from .config import ConfigError
    from .data import DataError
    from .extras import MissingDependency

    previous = None
    try:
        previous = signal.signal(signal.SIGINT, _second_interrupt_exits)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        pass
    try:
        code = _run(command, rest)
        # under torchrun / accelerate every rank ends its process group together (a group can exist
        # only where torch.distributed was imported: quick commands stay free of importing torch)
        if code == 0 and "torch.distributed" in sys.modules:
            from .distributed import end_process_group

            end_process_group()
        return code
    except KeyboardInterrupt:
        print(_interrupted(command, rest), file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, MissingDependency) as e:
        # Validation runs before anything is loaded or written: an earlier run's files are intact.
        # A missing optional package names the extra that installs it.
        print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # the trainer's own errors carry their explanation
        from .errors import TrainingError
        from .preemption import Preempted

        if isinstance(e, Preempted):  # every process stopped at the same step; the main one says so
            if os.environ.get("RANK", "0") == "0":
                print(f"preftune {command}: {_one_line(e)}", file=sys.stderr)
            return e.exit_code
        from .storage import StorageError, one_line, stages_hint

        out = _output_dir(command, rest)
        hint = stages_hint(out) if command == "iterate" else None  # iterate keeps stages, not checkpoints
        if isinstance(e, StorageError):  # naming the intact checkpoint
            print(f"preftune {command}: error: {one_line(e, out, hint)}", file=sys.stderr)
            return 1
        if isinstance(e, TrainingError):
            print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
            return getattr(e, "exit_code", 1)
        line = one_line(e, out, hint)  # ENOSPC & co. raised anywhere else: still one line
        if line is not None:
            print(f"preftune {command}: error: {line}", file=sys.stderr)
            return 1
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
        from .generation_eval import is_main_process, train_and_evaluate, train_summary

        args = _config_args(rest, "train")
        result, generated = train_and_evaluate(args.config, args.overrides)  # + generation_eval
        if is_main_process():  # under torchrun / accelerate: once, not once per process
            print(train_summary(result, generated))
        return 0
    if command == "iterate":
        from .iterate.loop import iterate

        args = _config_args(rest, "iterate")
        iterate(args.config, args.overrides)
        return 0
    if command == "precompute":
        from .precompute import precompute

        args = _config_args(rest, "precompute")
        precompute(args.config, args.overrides)
        return 0
    if command == "eval":
        from .held_out import main as eval_main

        return eval_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "report":
        from .iterate.report import is_iterate_run
        from .iterate.report import main as rounds_report

        if len(rest) == 1 and is_iterate_run(rest[0]):  # a `preftune iterate` run: rounds.jsonl
            return rounds_report(rest)
        from .report import main as report_main

        return report_main(rest)
    if command == "config":
        from .config import describe

        _simple_parser("config", "Print every config key with its default and meaning.").parse_args(rest)
        print(describe())
        return 0
    if command == "presets":
        return _presets(rest)
    if command == "cache":
        return _cache(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
