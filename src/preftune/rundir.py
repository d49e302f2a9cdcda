"""Every file and folder of a run directory, named in one place.

``preftune train`` writes a run directory; ``preftune eval``, ``preftune report`` and
``preftune demo`` read and add to it. They all go through :class:`RunDir`, so a name changes here
or nowhere::

    config.yaml          the resolved config (written once the run's inputs proved usable)
    run_state.json       what evaluation needs from training (MallowsPO's calibrated phi*, data counts;
                         final_step: the step final/ and final-adapter/ hold)
    tokenizer/           the policy's tokenizer, written once per run (checkpoints do not carry it)
    metrics.jsonl        one JSON object per logged step, TRL's metric names
    tensorboard/         TensorBoard events (report_to: [tensorboard])
    checkpoint-N/        model/, trainer_state.json, optimizer.*, scheduler.*, rng.* (see checkpointing)
    final/               the trained model with its tokenizer, loadable with plain transformers (LoRA
                         runs: only with save_merged: true or under FSDP, merged in the model's dtype)
    final-adapter/       the LoRA adapter alone, with the tokenizer (LoRA runs)
    eval-KEY-TIME.json   held-out metrics of one ``preftune eval`` call (KEY: its data, TIME: UTC)
    eval-KEY-TIME.generations.jsonl   the greedy answers of ``eval --prompts``, one per line
    eval.json            held-out metrics of earlier versions' ``preftune eval`` (read, not written)
    held_out_initial.json  the initial policy's log-probs of the held-out pairs (step 0), kept when no
                         reference is the initial policy: the yardstick of ``eval_initial/*``
    evaluation.json      before/after training comparison written by ``preftune demo``
    generations.json     the demo's greedy generations before and after training
    data/                the demo's copy of the data it trained and evaluated on
    report.md, *.png     ``preftune report``'s markdown report and plots
    .lock                the training process that owns the directory (preftune.runlock)
    error.log            the full traceback of an unexpected error (the console shows one line)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

CONFIG = "config.yaml"
RUN_STATE = "run_state.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "trainer_state.json"
FINAL = "final"
FINAL_ADAPTER = "final-adapter"
EVAL_METRICS = "eval.json"
HELD_OUT_INITIAL = "held_out_initial.json"
EVAL_RESULT_PREFIX = "eval-"
EVAL_GENERATIONS_SUFFIX = ".generations.jsonl"
BEFORE_AFTER = "evaluation.json"
GENERATIONS = "generations.json"
DATA = "data"
EVAL_SCRATCH = "eval-tmp"
REPORT = "report.md"
PLOTS = ("loss.png", "margins.png", "accuracy.png", "before_after.png")
LOCK = ".lock"
ERROR_LOG = "error.log"
MANIFEST = "manifest.json"


class RunDir:
    """Paths inside one run directory (nothing is created or checked here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_state(self) -> Path:
        return self.root / RUN_STATE

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def final_adapter(self) -> Path:
        return self.root / FINAL_ADAPTER

    @property
    def eval_metrics(self) -> Path:
        return self.root / EVAL_METRICS

    @property
    def held_out_initial(self) -> Path:
        return self.root / HELD_OUT_INITIAL

    def new_eval_result(self, key: str) -> Path:
        """A fresh ``eval-KEY-TIME.json`` for one ``preftune eval`` call: never an existing file, so
        evaluating again (other data, another checkpoint, or the same) keeps every earlier result."""
        key = re.sub(r"[^A-Za-z0-9._+@-]+", "_", key).strip("_") or "data"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path, n = self.root / f"{EVAL_RESULT_PREFIX}{key}-{stamp}.json", 2
        while path.exists():
            path, n = self.root / f"{EVAL_RESULT_PREFIX}{key}-{stamp}-{n}.json", n + 1
        return path

    @staticmethod
    def eval_generations(result: Path) -> Path:
        """The generations file saved next to an ``eval-KEY-TIME.json``."""
        return result.with_name(result.name[: -len(".json")] + EVAL_GENERATIONS_SUFFIX)

    def eval_results(self) -> list[Path]:
        """Every ``eval-KEY-TIME.json`` of the run, oldest first."""
        found = [
            p
            for p in self.root.glob(f"{EVAL_RESULT_PREFIX}*.json")
            if p.is_file() and not p.name.endswith(EVAL_GENERATIONS_SUFFIX)
        ]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    @property
    def before_after(self) -> Path:
        return self.root / BEFORE_AFTER

    @property
    def generations(self) -> Path:
        return self.root / GENERATIONS

    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def eval_scratch(self) -> Path:
        """A throwaway output_dir for ``preftune eval``'s trainer, removed when it is done."""
        return self.root / EVAL_SCRATCH

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def error_log(self) -> Path:
        return self.root / ERROR_LOG

    def outputs(self) -> list[Path]:
        """What a training run produces and ``overwrite_output_dir`` clears: checkpoints (complete or
        not), final models, the tokenizer, metrics, evaluation files, report and plots, TensorBoard
        events, error log. Not config.yaml / run_state.json (rewritten by the new run) nor the demo's
        data/."""
        found = [p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
        named = [
            self.final,
            self.final_adapter,
            self.tokenizer,
            self.metrics,
            self.tensorboard,
            self.eval_metrics,
            self.before_after,
            self.generations,
            self.eval_scratch,
            self.report,
            self.error_log,
            *(self.plot(name) for name in PLOTS),
        ]
        for p in named:
            for q in (p, p.with_name(p.name + ".tmp"), p.with_name(p.name + ".old")):
                if q.exists():
                    found.append(q)
        return sorted(found)

    def output_holding(self, path: str | Path) -> Path | None:
        """The output of this run directory that ``path`` lies in (or is): an entry that training writes
        or ``overwrite_output_dir`` clears (see :meth:`outputs`), named whether it exists or not;
        None when ``path`` is elsewhere (e.g. the demo's data/)."""
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        if not rel.parts:
            return None
        top = rel.parts[0]
        base = top.removesuffix(".tmp").removesuffix(".old")
        named = {FINAL, FINAL_ADAPTER, TOKENIZER, METRICS, TENSORBOARD, EVAL_METRICS, BEFORE_AFTER}
        named.add(GENERATIONS)
        named |= {EVAL_SCRATCH, REPORT, ERROR_LOG, CONFIG, RUN_STATE, LOCK, *PLOTS}
        if (
            base in named
            or base.startswith(CHECKPOINT_PREFIX)
            or (top.startswith(EVAL_RESULT_PREFIX) and top.endswith(".json"))
        ):
            return self.root / top
        return None

    def previous_run(self) -> list[Path]:
        """Outputs of an earlier run that a fresh run would mix with its own."""
        markers = [self.metrics, self.final, self.final_adapter]
        return [p for p in self.checkpoint_dirs() if p.is_dir()] + [p for p in markers if p.exists()]

    def checkpoint_dirs(self) -> list[Path]:
        """Every ``checkpoint-N`` directory, complete or damaged, oldest first (see checkpointing)."""
        found = []
        for p in self.root.glob(f"{CHECKPOINT_PREFIX}*"):
            if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit():
                found.append(p)
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def plot(self, name: str) -> Path:
        return self.root / name

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step}"

    def checkpoints(self) -> list[Path]:
        """Complete step checkpoints (those with their trainer state), oldest first."""
        found = []
        for p in self.root.glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = p.name[len(CHECKPOINT_PREFIX) :]
            if p.is_dir() and suffix.isdigit() and (p / CHECKPOINT_STATE).is_file():
                found.append(p)
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def tokenizer_dir(model_dir: str | Path) -> Path:
    """Where the tokenizer of a model directory is: the directory itself, or, for a checkpoint's
    ``checkpoint-N/model/`` (checkpoints do not carry one), its run's ``tokenizer/``."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    checkpoint = model_dir.parent
    if model_dir.name == CHECKPOINT_MODEL and checkpoint.name.startswith(CHECKPOINT_PREFIX):
        shared = checkpoint.parent / TOKENIZER
        if (shared / "tokenizer_config.json").is_file():
            return shared
    return model_dir


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (0 when it is not a directory)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units, e.g. ``512 B``, ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
