"""Command line: ``preftune train | precompute | eval | demo | report``."""

from __future__ import annotations

import argparse
import sys

USAGE = """preftune <command> ...

  train CONFIG.yaml [key=value ...]      train; writes a run directory (output_dir)
  precompute CONFIG.yaml [key=value ...] score references / entropies / embeddings ahead of training
  eval RUN_DIR|CONFIG.yaml [--data FILE] held-out preference metrics of a checkpoint
  demo [--method M] [--quick]            MRPO on SmolLM2-135M with a Gemma-3 reference, before/after report
  report RUN_DIR [RUN_DIR ...]           plots and report.md for one run, or several runs compared
  config                                 every config key with its default and meaning
"""


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a message from a library may span several)."""
    return " ".join(str(error).split())


def _config_args(argv: list[str], prog: str):
    parser = argparse.ArgumentParser(prog=f"preftune {prog}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=0.2 mrpo.clip_eps=0.05")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from .config import ConfigError
    from .data import DataError
    from .extras import MissingDependency

    try:
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
    except (ConfigError, DataError, FileNotFoundError, MissingDependency) as e:
        # Validation runs before anything is loaded or written: an earlier run's files are intact.
        # A missing optional package names the extra that installs it.
        print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # the trainer's own errors carry their explanation
        from .checkpointing import TrainingError

        if isinstance(e, TrainingError):
            print(f"preftune {command}: error: {_one_line(e)}", file=sys.stderr)
            return 1
        raise
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
