"""``preftune eval`` and ``preftune precompute``: recipes on top of the trainer's setup.

Preference metrics compare the trained policy with the *initial* policy (the primary reference) and
with the method's own reference (the MRPO virtual reference), on held-out pairs. With ``--prompts``,
greedy-decoded answers are checked too (:mod:`preftune.generation`, ``--match`` chooses how). Each
call saves its results to a new ``eval-KEY-TIME.json`` in the run directory (KEY names the data; the
generations go next to it), which ``preftune report`` shows; nothing earlier is overwritten.

Both ``preftune train`` and ``preftune eval`` end with the same table (:func:`results_table`): each
held-out metric, its n, what it means, and where the files are.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

from .config import ConfigError, ReferenceConfig, TrainConfig, load_config
from .report import METRIC_MEANINGS
from .rundir import RunDir
from .trainer import Trainer

# Shown first, in this order; anything else follows.
MAIN_METRICS = (
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_primary/rewards/accuracies",
    "eval_logps/accuracies",
    "eval_rewards/margins",
    "eval_primary/rewards/margins",
    "eval_answer_match",
    "eval_answer_phrase",
)


def precompute(config, overrides=None) -> None:
    """Score the references, entropies and embeddings a run needs, into the cache, without training."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if cfg.reference_mode != "precompute":
        raise ConfigError("precompute needs reference_mode=precompute")
    Trainer(cfg)
    print("references, entropies and embeddings are cached; `preftune train` will reuse them")


# --------------------------------------------------------------------------------------------------
# Printing


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _ordered(metrics: dict) -> list[str]:
    keys = [k for k in MAIN_METRICS if k in metrics]
    return keys + sorted(k for k in metrics if k not in keys and k != "eval_n")


def results_table(
    title: str, metrics: dict, files: list[tuple[str, Path]], run_dir: Path, notes: tuple[str, ...] = ()
) -> str:
    """The closing printout of ``train`` and ``eval``: metrics with n and meaning, files, disk used."""
    lines = [title]
    if metrics:
        n = metrics.get("eval_n")
        lines[0] += f" (n = {int(n)} held-out pairs)" if n is not None else ""
        keys = _ordered(metrics)
        width = max(len(k) for k in keys)
        for k in keys:
            v = metrics[k]
            value = f"{v:.4f}" if isinstance(v, float) else str(v)
            lines.append(f"  {k:<{width}}  {value:>8}  {METRIC_MEANINGS.get(k, '')}".rstrip())
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


def train_summary(result) -> str:
    """What ``preftune train`` prints at the end (``result`` is the trainer's :class:`RunResult`)."""
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
    title = f"trained {result.steps} steps. Held-out results after training"
    table = results_table(title, evals, files, run.root)
    return table + f"\nnext: preftune report {run.root}   (plots and report.md)"


# --------------------------------------------------------------------------------------------------
# Evaluating a run


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def trained_model(run_dir: Path, checkpoint: str | None = None) -> Path:
    """The directory holding the trained weights: ``--checkpoint``, else ``final/``, else (LoRA runs
    saved without ``save_merged``) ``final-adapter/``. A ``checkpoint-N`` folder means its model."""
    run = RunDir(run_dir)
    if checkpoint:
        path = Path(checkpoint)
        if (path / "model").is_dir():
            path = path / "model"
        if not path.is_dir():
            raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
        return path
    for path in (run.final, run.final_adapter):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{run.final} does not exist: has {run_dir} finished training?")


def eval_config(run_dir: Path, data: str | None = None, checkpoint: str | None = None) -> TrainConfig:
    """The run's config, re-pointed at its trained model, with the initial policy as the primary reference."""
    run = RunDir(run_dir)
    cfg = load_config(run.config)
    state = json.loads(run.run_state.read_text()) if run.run_state.is_file() else {}
    model_dir = trained_model(run.root, checkpoint)
    cfg = copy.deepcopy(cfg)
    refs = cfg.references or [ReferenceConfig()]
    cfg.references = [ReferenceConfig(model=cfg.model) if r.model == "policy" else r for r in refs]
    if _is_adapter(model_dir):
        pass  # the base model with fresh adapters; EvalTrainer loads the trained ones into them
    else:
        cfg.model = str(model_dir)
        cfg.lora.enabled = False  # a merged or full model
    source = data or cfg.data.eval
    if not source:
        raise ConfigError(f"{run_dir}: the run had no data.eval; pass --data FILE")
    cfg.data.train, cfg.data.train_split, cfg.data.eval = source, cfg.data.eval_split, None
    if state.get("phi_star") is not None:
        cfg.mallows.phi_star = state["phi_star"]  # the training set's calibration, not the eval set's
    cfg.output_dir = str(run.eval_scratch)
    cfg.overwrite_output_dir = True
    cfg.report_to = []
    cfg.save_merged = False
    return cfg


class EvalTrainer(Trainer):
    """The trainer's setup on held-out data (loaded into its ``train`` slot, so named ``eval`` in
    messages), with a LoRA run's trained adapter loaded."""

    split_labels = {"train": "eval data"}

    def __init__(self, cfg: TrainConfig, adapter: Path | None = None):
        super().__init__(cfg)
        if adapter is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = adapter / "adapter_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors")
            set_peft_model_state_dict(self.model, load_file(str(weights)))


def evaluate_run(
    run_dir: str | Path, data: str | None = None, checkpoint: str | None = None, *, keep_trainer=False
):
    """Held-out preference metrics of a finished run (its data.eval, or ``data``), with ``eval_n``.
    With ``keep_trainer`` also the :class:`EvalTrainer` (its model is the trained policy)."""
    run = RunDir(run_dir)
    model_dir = trained_model(run.root, checkpoint)
    trainer = EvalTrainer(
        eval_config(run.root, data, checkpoint), model_dir if _is_adapter(model_dir) else None
    )
    metrics = trainer.evaluate(split="train")
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
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated at once (default 16)")
    return parser


def _read_prompts(path: Path) -> list[dict]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or "prompt" not in item or "answer" not in item:
            raise ConfigError(f"{path}:{number}: needs the fields 'prompt' and 'answer'")
        items.append(item)
    return items


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
    details = None
    if items is not None:
        from .generation import answer_match

        metrics["eval_answer_match"], details = answer_match(
            trainer.model,
            trainer.tokenizer,
            items,
            mode=args.match,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        metrics["eval_answer_phrase"] = sum(d["reached_answer_phrase"] for d in details) / max(
            1, len(details)
        )
        metrics["eval_prompts_n"] = len(details)
    data = args.data or load_config(run.config).data.eval
    key = Path(str(data)).stem if data else "data"
    if args.checkpoint:
        key += f"@{Path(args.checkpoint).name}"
    out = run.new_eval_result(key)
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(model_dir),
        "data": str(data),
        "n": metrics.get("eval_n"),
        "metrics": metrics,
    }
    files = [("scores", out)]
    if details is not None:
        gens = run.eval_generations(out)
        gens.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
        record.update(prompts=str(args.prompts), match=args.match, generations=gens.name)
        files.append(("generations", gens))
    out.write_text(json.dumps(record, indent=1))
    title = f"held-out results of {model_dir} on {data}"
    notes = ()
    if details is not None:
        notes = (f"answers: {len(details)} prompts from {args.prompts}, --match {args.match}",)
    print(results_table(title, metrics, files, run.root, notes))
    return 0
