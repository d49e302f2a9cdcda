"""``preftune eval``: held-out metrics of a trained run, and the pieces ``preftune train`` shares.

Preference metrics compare the trained policy with the *initial* policy (the primary reference) and
with the method's own reference (the MRPO virtual reference), on held-out pairs. With ``--prompts``,
greedy-decoded answers are checked too (:mod:`preftune.generation`, ``--match`` chooses how). Each
call saves its results to a new ``eval-KEY-TIME.json`` in the run directory (KEY names the data; the
generations go next to it), which ``preftune report`` shows; nothing earlier is overwritten.

Both ``preftune train`` and ``preftune eval`` end with the same table (:func:`results_table`): each
held-out metric, its n, what it means, and where the files are; both score and save answers with
:func:`score_answers` and :func:`save_eval_result` (``generation_eval`` after training:
:mod:`preftune.generation_eval`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, ReferenceConfig, TrainConfig, load_config, resolved_method
from .mrpo_validation import uses_validation_weights
from .prepare_run import prepare_run
from .reference_identity import initial_policy_index
from .report import METRIC_MEANINGS
from .rundir import CHECKPOINT_MODEL, RunDir, dir_bytes, human_bytes
from .trainer import Trainer
from .yardsticks import (
    LOSS,
    METHOD,
    InitialScores,
    family,
    group_by_yardstick,
    run_yardsticks,
    yardstick_note,
)

# Prompts generated at once (`preftune eval --batch-size`'s default, and generation_eval's).
GENERATION_BATCH_SIZE = 16

# Shown first, in this order; anything else follows.
MAIN_METRICS = (
    "eval_initial/rewards/accuracies",
    "eval_initial/rewards/margins",
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_primary/rewards/accuracies",
    "eval_primary/rewards/margins",
    "eval_logps/accuracies",
    "eval_answer_match",
    "eval_answer_phrase",
)


# --------------------------------------------------------------------------------------------------
# Printing


def _ordered(metrics: dict) -> list[str]:
    keys = [k for k in MAIN_METRICS if k in metrics]
    return keys + sorted(k for k in metrics if k not in keys and k != "eval_n")


def _shown(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(
    title: str,
    metrics: dict,
    files: list[tuple[str, Path]],
    run_dir: Path,
    notes: tuple[str, ...] = (),
    before: dict | None = None,
) -> str:
    """The closing printout of ``train`` and ``eval``: metrics grouped by what they are measured
    against (:mod:`preftune.yardsticks`), with n and meaning, files, disk used. ``before``: values of
    the initial model, shown as ``before → after`` where it has the key."""
    lines = [title]
    if metrics:
        n = metrics.get("eval_n")
        lines[0] += f" (n = {int(n)} held-out pairs)" if n is not None else ""
        keys = _ordered(metrics)
        before = before or {}
        values = {
            k: f"{_shown(before[k])} → {_shown(metrics[k])}" if k in before else _shown(metrics[k])
            for k in keys
        }
        width, value_width = max(len(k) for k in keys), max(8, *(len(v) for v in values.values()))
        sticks = run_yardsticks(run_dir)
        for stick, group in group_by_yardstick(keys, sticks):
            lines.append(f"  vs {stick}:" if stick else "  other:")
            for k in group:
                meaning = METRIC_MEANINGS.get(k, "")
                lines.append(f"    {k:<{width}}  {values[k]:>{value_width}}  {meaning}".rstrip())
        note = yardstick_note(sticks) if any(family(k) in (LOSS, METHOD) for k in keys) else None
        if note:
            lines.append(note)
    else:
        lines.append("  (no held-out data: set data.eval, or run `preftune eval RUN_DIR --data FILE`)")
    lines += list(notes)
    lines.append("files:")
    width = max(len(name) for name, _ in files)
    for name, path in files:
        size = f"  ({human_bytes(dir_bytes(path) if path.is_dir() else path.stat().st_size)})"
        lines.append(f"  {name:<{width}}  {path}{size if path.exists() else ''}")
    lines.append(f"disk used by the run directory: {human_bytes(dir_bytes(run_dir))}")
    return "\n".join(lines)


# Evaluating a run


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def trained_model(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The directory holding the model to evaluate: ``--checkpoint`` (a directory, a folder of the
    run such as ``checkpoint-4``, or a preset name, resolved as ``model:`` in a config is), else
    ``final/``, else (LoRA runs saved without ``save_merged``) ``final-adapter/``. A ``checkpoint-N``
    folder means its model."""
    run = RunDir(run_dir)
    if checkpoint:
        for path in (Path(checkpoint).expanduser(), run.root / checkpoint):
            if (path / CHECKPOINT_MODEL).is_dir():
                path = path / CHECKPOINT_MODEL
            if path.is_dir():
                return path
        from .models.presets import PRESETS

        if checkpoint in PRESETS:
            from .models.loading import resolve_causal_lm

            return resolve_causal_lm(checkpoint, "--checkpoint")  # converted on first use, as model: is
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: no such directory (here or in {run.root}) and not a preset "
            f"({', '.join(sorted(PRESETS))})"
        )
    for path in (run.final, run.final_adapter):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{run.final} does not exist: has {run_dir} finished training?")


FINAL_MODEL = "final"  # what an eval record's "evaluated" says of the run's own final model


def evaluated_what(run_dir: Path, model_dir: Path) -> str:
    """What ``model_dir`` is to the run: ``final`` (its final model or adapter), ``checkpoint-N``
    (one of its checkpoints), or ``other model`` (a base model, a preset, another run's model)."""
    run = RunDir(run_dir)
    try:
        model = Path(model_dir).resolve()
        if model in (run.final.resolve(), run.final_adapter.resolve()):
            return FINAL_MODEL
        for checkpoint in run.checkpoints():
            if model in (checkpoint.resolve(), (checkpoint / CHECKPOINT_MODEL).resolve()):
                return checkpoint.name
    except OSError:
        pass
    return "other model"


def eval_config(run_dir: Path, data: str | None = None, checkpoint: str | None = None) -> TrainConfig:
    """The run's config, re-pointed at its trained model, with the initial policy as the primary reference."""
    run = RunDir(run_dir)
    cfg = load_config(run.config)
    state = json.loads(run.run_state.read_text()) if run.run_state.is_file() else {}
    model_dir = trained_model(run.root, checkpoint)
    cfg = copy.deepcopy(cfg)
    spec = resolved_method(cfg)
    if not (spec.reference_free or cfg.reference_free):  # SimPO, ORPO: no reference to re-point
        refs = cfg.references or [ReferenceConfig()]
        # `policy` is the initial policy: its model, scored with the run's chat template (as training did)
        initial = ReferenceConfig(model=cfg.model, chat_template=cfg.data.chat_template)
        cfg.references = [initial if r.model == "policy" else r for r in refs]
    if is_adapter(model_dir):
        pass  # the base model with fresh adapters; evaluate_run loads the trained ones into them
    else:
        cfg.model = str(model_dir)
        cfg.lora.enabled = False  # a merged or full model
    source = data or cfg.data.eval
    if not source:
        raise ConfigError(f"{run_dir}: the run had no data.eval; pass --data FILE")
    cfg.data.train, cfg.data.eval = None, source  # evaluated as the eval split (prepare_run(training=False))
    if state.get("phi_star") is not None:
        cfg.mallows.phi_star = state["phi_star"]  # the training set's calibration, not the eval set's
    if uses_validation_weights(
        cfg, resolved_method(cfg)
    ):  # the weights training fixed from its validation rows
        if "mrpo_validation" not in state:
            raise ConfigError(
                f"{run.run_state}: no mrpo_validation weights, which mrpo.weights=validation needs"
            )
        cfg.mrpo.weights = state["mrpo_validation"]["weights"]
    cfg.output_dir = str(run.eval_scratch)
    cfg.overwrite_output_dir = True
    cfg.report_to = []
    cfg.save_merged = False
    cfg.generation_eval = False  # a training step: `preftune eval --prompts` answers prompts itself
    return cfg


def _load_adapter(model, adapter: Path) -> None:
    """A LoRA run's trained adapter, into the fresh adapters of ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors")
    set_peft_model_state_dict(model, load_file(str(weights)))


def evaluate_run(
    run_dir: str | Path, data: str | None = None, checkpoint: str | None = None, *, keep_trainer=False
):
    """Held-out preference metrics of a finished run (its data.eval, or ``data``), with ``eval_n``.
    With ``keep_trainer`` also the :class:`~preftune.trainer.Trainer` (its model is the trained policy)."""
    run = RunDir(run_dir)
    model_dir = trained_model(run.root, checkpoint)
    prepared = prepare_run(eval_config(run.root, data, checkpoint), training=False)  # data.eval alone
    if is_adapter(model_dir):
        _load_adapter(prepared.model, model_dir)
    trainer = Trainer(prepared)
    if prepared.references is not None:  # the run's own config says which reference is the initial policy
        cfg = load_config(run.config)
        trainer.initial_reference = initial_policy_index(cfg.model, cfg.references, cfg.data.chat_template)
    trainer.initial_scores = InitialScores(run.held_out_initial)  # else its step-0 scores (same data only)
    metrics = trainer.evaluate(split="eval")
    shutil.rmtree(run.eval_scratch, ignore_errors=True)
    return (metrics, trainer) if keep_trainer else metrics


def build_parser() -> argparse.ArgumentParser:
    from .generation import MATCH_MODES

    parser = argparse.ArgumentParser(
        prog="preftune eval",
        description="Held-out preference metrics of a trained run: how often the trained policy prefers "
        "the chosen answer, against the initial policy and against the method's reference. Each call "
        "saves its results as a new eval-DATA-TIME.json in the run directory (earlier ones are kept), "
        "which `preftune report` shows.",
    )
    parser.add_argument(
        "run",
        metavar="RUN_DIR|CONFIG.yaml",
        help="a run directory (with config.yaml), or the config that made it",
    )
    parser.add_argument("--data", help="held-out preference data (default: the run's data.eval)")
    parser.add_argument(
        "--checkpoint", help="a checkpoint-N folder or model directory to evaluate instead of the final model"
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='also generate greedy answers to {"prompt": ..., "answer": ...} lines and score them '
        "(prompt: text or chat messages); the generations are saved next to the scores",
    )
    parser.add_argument(
        "--match",
        choices=MATCH_MODES,
        default="contains",
        help="how an answer is checked: contains (default; the normalised answer appears in the output as "
        "whole words), exact (normalised output equals the answer), regex (the answer is a regular "
        'expression), numeric (the integer of "The answer is N" equals the answer)',
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest generated answer, in tokens (default 64)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=GENERATION_BATCH_SIZE,
        help=f"prompts generated at once (default {GENERATION_BATCH_SIZE})",
    )
    return parser


def _read_prompts(path: Path) -> list[dict]:
    """The ``--prompts`` file's {"prompt", "answer"} lines; a problem names the file, line and field
    as a bad data row does."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (set by --prompts); check the path")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ConfigError(f'{path}, line {number}: not a JSON object; expected {{"prompt", "answer"}}')
        for field in ("prompt", "answer"):
            if field not in item:
                found = ", ".join(repr(key) for key in item) or "none"
                raise ConfigError(
                    f"{path}, line {number}, field {field!r}: missing (each line needs 'prompt' and "
                    f"'answer'; fields found: {found})"
                )
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------------
# Answers: scored and saved the same way by `preftune eval --prompts` and by generation_eval


def score_answers(
    model,
    tokenizer,
    items: list[dict],
    *,
    mode: str,
    max_new_tokens: int,
    batch_size: int = GENERATION_BATCH_SIZE,
    chat_template: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to ``items`` ({"prompt", "answer"}) checked under ``mode``: the metrics
    eval_answer_match, eval_prompts_n (and under ``numeric``, eval_answer_phrase), and one detail row
    per item."""
    from .answers import answer_metrics
    from .generation import answer_match

    _, details = answer_match(
        model,
        tokenizer,
        items,
        mode=mode,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        progress=progress,
    )
    return answer_metrics(details, mode), details


@dataclass
class SavedEval:
    """One saved evaluation: its ``eval-KEY-TIME.json`` and the generations next to it (or None)."""

    path: Path
    generations: Path | None
    record: dict

    def files(self) -> list[tuple[str, Path]]:
        """(name, path) rows for :func:`results_table`."""
        found = [("scores", self.path)]
        if self.generations is not None:
            found.append(("generations", self.generations))
        return found


def data_key(data, checkpoint: str | None = None, prompts: str | None = None) -> str:
    """The KEY of ``eval-KEY-TIME.json`` (and of its generations file): the data file's name, then
    ``+PROMPTS`` (the prompts file's name) with ``--prompts``, then ``@checkpoint-N`` if one was named."""
    key = Path(str(data)).stem if data else "data"
    if prompts:
        key += f"+{Path(str(prompts)).stem}"
    return key + (f"@{Path(checkpoint).name}" if checkpoint else "")


def save_eval_result(
    run: RunDir,
    key: str,
    *,
    model: Path,
    data,
    metrics: dict,
    details: list[dict] | None = None,
    prompts: str | None = None,
    match: str | None = None,
    by: str = "preftune eval",
    max_new_tokens: int | None = None,
    checkpoint: str | None = None,
    before: dict | None = None,
) -> SavedEval:
    """A new ``eval-KEY-TIME.json`` (never overwriting an earlier one) with the metrics, and with
    ``details`` the generations file next to it; ``preftune report`` shows every such record.

    The record says which model it evaluated: ``model`` (its directory), ``checkpoint`` (what
    ``--checkpoint`` named, or null) and ``evaluated`` (:func:`evaluated_what`: ``final`` for the
    run's own final model), so that a report shows a run's result only from its final model.
    ``before``: the initial model's answers ({"model", "metrics", "details", "cached"})."""
    out = run.new_eval_result(key)
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": by,
        "model": str(model),
        "checkpoint": checkpoint,
        "evaluated": evaluated_what(run.root, Path(model)),
        "data": str(data),
        "n": metrics.get("eval_n"),
        "metrics": metrics,
    }
    gens = None
    if details is not None:
        gens = run.eval_generations(out)
        gens.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
        record.update(prompts=str(prompts), match=match, generations=gens.name)
    if before is not None:
        from .answers import initial_generations

        before_gens = initial_generations(out)
        before_gens.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in before["details"]))
        record["before"] = {
            "model": str(before["model"]),
            "metrics": before["metrics"],
            "generations": before_gens.name,
            "cached": before["cached"],
        }
    if max_new_tokens is not None:
        record["max_new_tokens"] = max_new_tokens
    out.write_text(json.dumps(record, indent=1))
    return SavedEval(out, gens, record)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run)
    if run_dir.is_file():  # a config file: evaluate the run it trains into
        run_dir = Path(load_config(run_dir).output_dir)
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {run.config.name})")
    items = _read_prompts(Path(args.prompts)) if args.prompts else None  # bad prompts fail before scoring
    model_dir = trained_model(run.root, args.checkpoint)
    metrics, trainer = evaluate_run(run_dir, args.data, args.checkpoint, keep_trainer=True)
    details = before = None
    if items is not None:
        from .answers import initial_answers
        from .metrics import log

        settings = dict(
            mode=args.match,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            chat_template=trainer.run.cfg.data.chat_template,  # the template the run trained with
        )
        answers, details = score_answers(trainer.run.model, trainer.run.tokenizer, items, **settings)
        metrics.update(answers)
        run_cfg = load_config(run.config)
        del trainer  # its model is no longer needed: the initial model may take its memory
        found, before_details, cached = initial_answers(
            run_cfg, items, cache_root=_cache_root(run_cfg), log=log, **settings
        )
        before = {"model": run_cfg.model, "metrics": found, "details": before_details, "cached": cached}
    data = args.data or load_config(run.config).data.eval
    saved = save_eval_result(
        run,
        data_key(data, args.checkpoint, args.prompts),
        model=model_dir,
        data=data,
        metrics=metrics,
        details=details,
        prompts=args.prompts,
        match=args.match,
        checkpoint=args.checkpoint,
        before=before,
    )
    what = saved.record["evaluated"]
    title = f"held-out results of {model_dir}" + (
        "" if what == FINAL_MODEL else f" ({what}, not the final model)"
    )
    title += f" on {data}"
    notes: tuple[str, ...] = ()
    files = saved.files()
    if details is not None:
        notes = (
            f"answers: {len(details)} prompts from {args.prompts}, --match {args.match}; before = the "
            f"initial model {run_cfg.model}"
            + (" (its answers reused from the cache)" if before["cached"] else ""),
        )
        files.append(("initial model's generations", run.root / saved.record["before"]["generations"]))
        empty = empty_answers_note(details, before["details"], items)
        if empty:
            notes += (empty,)
    before_values = {k: v for k, v in before["metrics"].items() if k != "eval_prompts_n"} if before else None
    print(results_table(title, metrics, files, run.root, notes, before=before_values))
    return 0


def empty_answers_note(details: list[dict], before: list[dict] | None, items: list[dict]) -> str | None:
    """A line when answers came back empty (the model wrote its end-of-sequence token first), which
    otherwise reads as a plain 0 → 0: a chat model given plain-text prompts often does that."""
    counts = [sum(not str(d.get("output", "")).strip() for d in rows) for rows in (details, before or [])]
    if not any(counts):
        return None
    text = f"{counts[0]} of {len(details)} answers are empty"
    if before is not None:
        text += f" ({counts[1]} of the initial model's)"
    text += ": the model ended its reply at once"
    if any(isinstance(item["prompt"], str) for item in items):
        text += (
            "; plain-text prompts to a chat model often do that: give them as chat messages, "
            '{"prompt": [{"role": "user", "content": "..."}], "answer": ...}'
        )
    return text


def _cache_root(cfg: TrainConfig) -> Path:
    from .models.presets import default_cache_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
