"""``preftune eval`` and ``preftune precompute``: recipes on top of the trainer's setup.

Preference metrics compare the trained policy with the *initial* policy (the primary reference) and
with the method's own reference (the MRPO virtual reference), on held-out pairs. With ``--prompts``,
greedy-decoded answers are checked too (:mod:`preftune.generation`). Results go to the run
directory's ``eval.json`` (:mod:`preftune.rundir`), which ``preftune report`` shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

from .config import ConfigError, ReferenceConfig, TrainConfig, load_config
from .rundir import RunDir
from .trainer import Trainer


def precompute(config, overrides=None) -> None:
    """Score the references, entropies and embeddings a run needs, into the cache, without training."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if cfg.reference_mode != "precompute":
        raise ConfigError("precompute needs reference_mode=precompute")
    Trainer(cfg)
    print("references, entropies and embeddings are cached; `preftune train` will reuse them")


def eval_config(run_dir: Path, data: str | None = None, checkpoint: str | None = None) -> TrainConfig:
    """The run's config, re-pointed at its trained model, with the initial policy as the primary reference."""
    run = RunDir(run_dir)
    cfg = load_config(run.config)
    state = json.loads(run.run_state.read_text()) if run.run_state.is_file() else {}
    model_dir = Path(checkpoint) if checkpoint else run.final
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} does not exist: has {run_dir} finished training?")
    cfg = copy.deepcopy(cfg)
    refs = cfg.references or [ReferenceConfig()]
    cfg.references = [ReferenceConfig(model=cfg.model) if r.model == "policy" else r for r in refs]
    cfg.model = str(model_dir)
    cfg.lora.enabled = False  # final/ holds the merged model
    source = data or cfg.data.eval
    if not source:
        raise ConfigError(f"{run_dir}: the run had no data.eval; pass --data FILE")
    cfg.data.train, cfg.data.train_split, cfg.data.eval = source, cfg.data.eval_split, None
    if state.get("phi_star") is not None:
        cfg.mallows.phi_star = state["phi_star"]  # the training set's calibration, not the eval set's
    cfg.output_dir = str(run.eval_scratch)
    cfg.overwrite_output_dir = True
    cfg.report_to = []
    return cfg


def evaluate_run(
    run_dir: str | Path, data: str | None = None, checkpoint: str | None = None
) -> dict[str, float]:
    """Held-out preference metrics of a finished run (its data.eval, or ``data``)."""
    run = RunDir(run_dir)
    trainer = Trainer(eval_config(run.root, data, checkpoint))
    metrics = trainer.evaluate(split="train")
    shutil.rmtree(run.eval_scratch, ignore_errors=True)
    return metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preftune eval", description="Held-out preference metrics of a run")
    parser.add_argument(
        "run", help="a run directory (with config.yaml and final/), or the config that made it"
    )
    parser.add_argument("--data", help="held-out preference data (default: the run's data.eval)")
    parser.add_argument("--checkpoint", help="a model directory to evaluate instead of RUN/final")
    parser.add_argument("--prompts", help="JSONL of {prompt, answer}: also measure greedy exact match")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    if run_dir.is_file():  # a config file: evaluate the run it trains into
        run_dir = Path(load_config(run_dir).output_dir)
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {run.config.name})")
    metrics = evaluate_run(run_dir, args.data, args.checkpoint)
    if args.prompts:
        from .generation import exact_match
        from .models import load_causal_lm

        model, tok = load_causal_lm(args.checkpoint or str(run.final))
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        metrics["eval_exact_match"], _ = exact_match(model, tok, items, max_new_tokens=args.max_new_tokens)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}")
    run.eval_metrics.write_text(json.dumps(metrics, indent=1))
    return 0
