"""``generation_eval: true``: greedy answers of the trained model after ``preftune train``, and
:func:`train_and_evaluate`, the training entry point that adds them (``preftune train`` and
``preftune.train`` call it), with :func:`train_summary`, what ``preftune train`` prints at the end.

The prompts are those of the data.eval rows that carry an ``answer``, answered by the saved final
model on the main process, scored and saved by the same functions as ``preftune eval --prompts``
(:func:`~preftune.held_out.score_answers`, :func:`~preftune.held_out.save_eval_result`). It lives
here, not in the trainer, because it needs those (the trainer imports none of them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig, load_config, resolved_method
from .held_out import (
    SavedEval,
    data_key,
    is_adapter,
    results_table,
    save_eval_result,
    score_answers,
    trained_model,
)
from .metrics import method_diagnostics
from .rundir import RunDir
from .trainer import RunResult, train


def train_summary(result, generated: GenerationEval | None = None) -> str:
    """What ``preftune train`` prints at the end (``result`` is the trainer's :class:`RunResult`;
    ``generated`` what :func:`generation_eval` did, whose metrics are already in ``result``)."""
    run = RunDir(result.output_dir)
    evals = {k: v for k, v in result.last_metrics.items() if k.startswith("eval_")}
    files = [("run directory", run.root)]
    for name, path in (("final model", run.final), ("final adapter", run.final_adapter)):
        if path.exists():
            files.append((name, path))
    checkpoints = run.checkpoints()
    if checkpoints:
        files.append(("last checkpoint", checkpoints[-1]))
    files.append(("metrics", run.metrics))
    notes: tuple[str, ...] = ()
    if generated is not None:
        files += generated.saved.files()
        notes = (generated.note,)
    notes += tuple(method_diagnostics(run.metrics))  # mrpo/* means, and the clip warning
    title = f"trained {result.steps} steps. Held-out results after training"
    table = results_table(title, evals, files, run.root, notes)
    return table + f"\nnext: preftune report {run.root}   (plots and report.md)"


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or the only process (no RANK in the environment)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class GenerationEval:
    """What :func:`generation_eval` did: the answer metrics, the saved record, a line for the summary."""

    metrics: dict[str, float]
    saved: SavedEval
    note: str


def load_trained(cfg: TrainConfig, model_dir: Path):
    """(model, tokenizer) of a finished run's saved model, with plain transformers / peft on this
    process alone: no Trainer, so no accelerate state and no collective that would wait for the
    other ranks of a torchrun job (they have returned from training by now)."""
    import torch

    from .models.loading import config_dtype, load_causal_lm, resolve_causal_lm
    from .progress import library_bars

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = config_dtype(cfg.model_dtype) or torch.float32
    with library_bars(cfg.progress):
        if not is_adapter(model_dir):
            return load_causal_lm(str(model_dir), dtype=dtype, device=device)
        from peft import PeftModel

        base, tokenizer = load_causal_lm(
            str(resolve_causal_lm(cfg.model, "model")), dtype=dtype, device=device
        )
        return PeftModel.from_pretrained(base, str(model_dir)), tokenizer


GENERATION_EVAL_BY = "preftune train (generation_eval)"
ANSWER_METRICS = ("eval_answer_match", "eval_answer_phrase", "eval_prompts_n")


def generation_eval(cfg: TrainConfig, result: RunResult) -> GenerationEval | None:
    """``generation_eval: true``, once training returned: greedy answers of the saved final model to
    the data.eval rows that carry an ``answer``, scored with ``generation_match``.

    Runs on the main process only (None elsewhere, and when the key is off). Saves an
    ``eval-KEY-TIME.json`` + generations as ``preftune eval --prompts`` does, appends the answer
    metrics to metrics.jsonl at the last step (next to the final held-out row), and adds them to
    ``result.last_metrics``. A rerun of a finished run (``resume=true``) reuses the record this key
    wrote for the same model, data, match and max_new_tokens instead of answering again. If
    answering fails, the error says that the trained model is saved and how to answer without
    retraining.
    """
    if not cfg.generation_eval or not is_main_process():
        return None
    from .checkpointing import TrainingError
    from .data.check import generation_items
    from .metrics import MetricsLog, log

    run = RunDir(result.output_dir)
    model_dir = trained_model(run.root)
    note = f"generation_match {cfg.generation_match}, max_new_tokens {cfg.max_new_tokens}"
    earlier = _earlier_generation_eval(run, cfg, model_dir)
    if earlier is not None:
        answers = {k: earlier.record["metrics"][k] for k in ANSWER_METRICS}
        log(f"generation_eval: {model_dir} already answered these prompts ({earlier.path.name}); reused")
        result.last_metrics.update(answers)
        return GenerationEval(answers, earlier, f"answers: reused {earlier.path.name}, {note}")
    unpaired = resolved_method(cfg).unpaired
    items = generation_items(cfg, unpaired=unpaired, log=log)  # the rows check_data found before training
    log(f"generation_eval: answering {len(items)} held-out prompts with {model_dir}")
    try:
        model, tokenizer = load_trained(cfg, model_dir)
        answers, details = score_answers(
            model,
            tokenizer,
            items,
            mode=cfg.generation_match,
            max_new_tokens=cfg.max_new_tokens,
            chat_template=cfg.data.chat_template,
            progress=cfg.progress,
        )
    except Exception as e:  # training is done and saved: say so, and how to answer without retraining
        raise TrainingError(
            f"generation_eval failed after training: {type(e).__name__}: {e}. The trained model is "
            f"saved in {model_dir}; rerun the same command with resume=true to answer again without "
            "retraining"
        ) from e
    del model
    held_out = {k: v for k, v in result.last_metrics.items() if k.startswith("eval_")}
    saved = save_eval_result(
        run,
        data_key(cfg.data.eval),
        model=model_dir,
        data=cfg.data.eval,
        metrics={**held_out, **answers},
        details=details,
        prompts=f"{cfg.data.eval} (rows with an answer)",
        match=cfg.generation_match,
        by=GENERATION_EVAL_BY,
        max_new_tokens=cfg.max_new_tokens,
    )
    metrics_log = MetricsLog(run.root, cfg.report_to, enabled=True)
    try:
        metrics_log.write(result.steps, answers)
    finally:
        metrics_log.close()
    result.last_metrics.update(answers)
    return GenerationEval(
        answers, saved, f"answers: {len(details)} prompts of {cfg.data.eval} rows with an answer, {note}"
    )


def _earlier_generation_eval(run: RunDir, cfg: TrainConfig, model_dir: Path) -> SavedEval | None:
    """The newest record generation_eval wrote for this model (saved no later than the record), data,
    match and max_new_tokens, with its generations file; None if there is none."""
    saved_at = max((p.stat().st_mtime for p in model_dir.rglob("*") if p.is_file()), default=0.0)
    for path in reversed(run.eval_results()):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        gens = run.eval_generations(path)
        same = (
            record.get("by") == GENERATION_EVAL_BY
            and record.get("model") == str(model_dir)
            and record.get("data") == str(cfg.data.eval)
            and record.get("match") == cfg.generation_match
            and record.get("max_new_tokens") == cfg.max_new_tokens
            and all(k in record.get("metrics", {}) for k in ANSWER_METRICS)
        )
        if same and gens.is_file() and path.stat().st_mtime >= saved_at:
            return SavedEval(path, gens, record)
    return None


def train_and_evaluate(
    config: TrainConfig | str | os.PathLike | dict, overrides: list[str] | None = None
) -> tuple[RunResult, GenerationEval | None]:
    """:func:`preftune.trainer.train`, then :func:`generation_eval` (with the key on, main process).
    ``preftune train`` and ``preftune.train`` call this."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    result = train(cfg)
    return result, generation_eval(cfg, result)
