"""Evaluation of a trained checkpoint: held-out preference metrics and greedy generation checks.

Preference metrics compare the trained policy with the *initial* policy (the primary reference) and
with the method's own reference (the MRPO virtual reference), on held-out pairs. Generation checks
greedy-decode prompts that carry an ``answer`` and count exact matches ("The answer is N.").
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from .config import ConfigError, ReferenceConfig, TrainConfig, load_config


def precompute(config, overrides=None) -> None:
    """Score the references, entropies and embeddings a run needs, into the cache, without training."""
    from .trainer import Trainer

    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if cfg.reference_mode != "precompute":
        raise ConfigError("precompute needs reference_mode=precompute")
    Trainer(cfg)
    print("references, entropies and embeddings are cached; `preftune train` will reuse them")


def eval_config(run_dir: Path, data: str | None = None, checkpoint: str | None = None) -> TrainConfig:
    """The run's config, re-pointed at its trained model, with the initial policy as the primary reference."""
    cfg = load_config(run_dir / "config.yaml")
    state_path = run_dir / "run_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    model_dir = Path(checkpoint) if checkpoint else run_dir / "final"
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
    cfg.output_dir = str(run_dir / "eval-tmp")
    cfg.overwrite_output_dir = True
    cfg.report_to = []
    return cfg


def evaluate_run(
    run_dir: str | Path, data: str | None = None, checkpoint: str | None = None
) -> dict[str, float]:
    from .trainer import Trainer

    run_dir = Path(run_dir)
    trainer = Trainer(eval_config(run_dir, data, checkpoint))
    metrics = trainer.evaluate(split="train")
    import shutil

    shutil.rmtree(run_dir / "eval-tmp", ignore_errors=True)
    return metrics


def prompt_text(prompt, tokenizer, chat_template: str | None = None) -> str:
    """The prompt as the model sees it in training: chat messages rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    from .data import UnpairedExample, render_unpaired

    placeholder = [{"role": "assistant", "content": "."}]
    text, _ = render_unpaired(
        UnpairedExample(prompt, placeholder, True, 0), tokenizer, chat_template=chat_template
    )
    return text


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy completions for prompts (text, or chat messages rendered with the model's template)."""
    from tqdm.auto import tqdm

    from .data import add_special_tokens_for

    texts = [prompt_text(p, tokenizer, chat_template) for p in prompts]
    special = (
        add_special_tokens_for(
            tokenizer, conversational=not isinstance(prompts[0], str), chat_template=chat_template
        )
        if prompts
        else False
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outputs = []
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model, tokenizer, items: list[dict], **kwargs) -> tuple[float, list[dict]]:
    """Fraction of items whose greedy answer equals ``item["answer"]``, and the per-item details."""
    from .data.arithmetic import extract_answer

    outputs = generate(model, tokenizer, [it["prompt"] for it in items], **kwargs)
    details = []
    for it, text in zip(items, outputs):
        got = extract_answer(text)
        details.append(
            {"answer": it["answer"], "predicted": got, "correct": got == it["answer"], "output": text}
        )
    score = sum(d["correct"] for d in details) / max(1, len(details))
    return score, details


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
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    metrics = evaluate_run(run_dir, args.data, args.checkpoint)
    if args.prompts:
        from .models import load_causal_lm

        model, tok = load_causal_lm(args.checkpoint or str(run_dir / "final"))
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        metrics["eval_exact_match"], _ = exact_match(model, tok, items, max_new_tokens=args.max_new_tokens)
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1))
    return 0
