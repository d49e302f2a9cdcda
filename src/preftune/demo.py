"""``preftune demo``: a real preference fine-tuning run whose effect you can see, offline, on a CPU.

SmolLM2-135M-Instruct (LoRA) learns from the bundled arithmetic pairs with DPO plus an SFT term on
the chosen answers (``sft_weight`` λ = 3). That default follows experiments/method_comparison: it is
the arm that raised greedy exact match on held-out problems with a confidence interval above zero
(λ chosen on a validation split); no preference method alone did. ``--method mrpo`` regularises
towards two references at once, the initial weights (primary) and Gemma-3-270M, whose tokenizer and
vocabulary (262k) differ; ``--sft-weight 0`` trains the preference loss alone. Before and after
training it measures, on held-out *new* problems:

* preference accuracy: how often the implicit reward r(y) = log π(y|x) − log π_ref(y|x) ranks the
  correct answer above the wrong one (π_ref = the initial policy; before training every reward is 0,
  so ties count one half and the accuracy is 0.5 by construction);
* likelihood accuracy: how often the policy itself gives the correct answer the higher log-prob;
* exact match: how often the greedy answer ("The answer is N.") is right.

It writes report.md and PNG plots into the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

POLICY = "smollm2-135m-instruct"
SECOND_REFERENCE = "gemma3-270m"
DEMO_METHODS = ("dpo", "mrpo", "mallows_theta", "mallows_phi", "rpo")
# λ of the SFT term λ·(−log π(y_w|x)/|y_w|): chosen among {0.3, 1, 3, 10, 30} on the method comparison's
# validation split by greedy exact match, 3 and 10 tying (experiments/method_comparison/results/RESULTS.md).
DEMO_SFT_WEIGHT = 3.0


@dataclass(frozen=True)
class DemoSize:
    train_pairs: int
    eval_pairs: int
    epochs: float
    batch_size: int
    max_new_tokens: int


# Sized for a 2-core CPU: ~10 minutes for the full run (references included), ~2 for --quick with
# the references cached. Every policy forward costs ~0.5 s per sequence there; see README.
FULL = DemoSize(train_pairs=96, eval_pairs=48, epochs=1.0, batch_size=4, max_new_tokens=96)
QUICK = DemoSize(train_pairs=16, eval_pairs=8, epochs=1.0, batch_size=4, max_new_tokens=64)


def demo_config(
    method: str,
    size: DemoSize,
    output_dir: Path,
    data_dir: Path,
    seed: int = 0,
    sft_weight: float = DEMO_SFT_WEIGHT,
    threads: int | None = None,
) -> dict:
    references = ["policy", SECOND_REFERENCE] if method in ("mrpo", "mdpo") else ["policy"]
    return {
        "model": POLICY,
        "method": method,
        "references": references,
        "beta": 0.1,
        "sft_weight": sft_weight,
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "test.jsonl")},
        "max_length": 256,
        "batch_size": size.batch_size,
        "epochs": size.epochs,
        "learning_rate": 2e-4,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0},
        "logging_steps": 1,
        "eval_steps": 0,  # evaluations before training and at the end: each is a pass over the held-out pairs
        "seed": seed,
        "threads": threads,  # null: automatic; an oversubscribed machine's line names --threads
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
    }


def write_subsets(data_dir: Path, size: DemoSize) -> list[dict]:
    """The first N training and M held-out pairs, copied into the run for reproducibility."""
    from .data.arithmetic import arithmetic_path

    data_dir.mkdir(parents=True, exist_ok=True)
    test_items = []
    for split, n in (("train", size.train_pairs), ("test", size.eval_pairs)):
        lines = arithmetic_path(split).read_text().splitlines()[:n]
        (data_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        if split == "test":
            test_items = [json.loads(line) for line in lines]
    return test_items


def likelihood_accuracy_before(trainer) -> float:
    """The initial policy's own preference on held-out pairs: it *is* the primary reference, whose
    log-probs are already cached, so this costs nothing."""
    refs = trainer.reference_logps("eval")
    return float((refs["chosen"][0] > refs["rejected"][0]).float().mean())


def run_name(method: str, sft_weight: float, quick: bool) -> str:
    """The default run directory's name: ``demo-dpo-sft3``, ``demo-mrpo`` (λ = 0), ``…-quick``."""
    return f"demo-{method}" + (f"-sft{sft_weight:g}" if sft_weight else "") + ("-quick" if quick else "")


def run_demo(
    method: str = "dpo",
    *,
    quick: bool = False,
    output_dir: str | None = None,
    seed: int = 0,
    sft_weight: float = DEMO_SFT_WEIGHT,
    threads: int | None = None,
) -> Path:
    from .config import load_config
    from .generation import exact_match
    from .metrics import log
    from .models import resolve_model
    from .report import write_report
    from .rundir import RunDir
    from .trainer import Trainer

    if method not in DEMO_METHODS:
        raise ValueError(f"demo method must be one of {', '.join(DEMO_METHODS)}")
    size = QUICK if quick else FULL
    out = Path(output_dir or Path("runs") / run_name(method, sft_weight, quick))
    run = RunDir(out)
    started = time.perf_counter()
    what = method + (f" + SFT term (λ = {sft_weight:g})" if sft_weight else "")
    log(f"demo: {what} on {POLICY} (LoRA), {size.train_pairs} training pairs, {size.eval_pairs} held-out")
    resolve_model(POLICY)  # converts the GGUF once, with progress, before anything else
    if method in ("mrpo", "mdpo"):
        resolve_model(SECOND_REFERENCE)
    test_items = write_subsets(run.data, size)
    cfg = load_config(demo_config(method, size, out, run.data, seed, sft_weight, threads))
    trainer = Trainer(cfg)  # loads data and precomputes the references (cached for the next run)

    log("measuring the initial policy on the held-out problems")
    before_match, before_details = exact_match(
        trainer.run.model,
        trainer.run.tokenizer,
        test_items,
        max_new_tokens=size.max_new_tokens,
        progress=cfg.progress,
    )
    result = trainer.fit()
    # the trainer evaluated the held-out pairs before training (step 0) and after (the last step)
    first, last = _eval_rows(run.metrics)
    before = {
        "preference_accuracy": first.get("eval_initial/rewards/accuracies"),  # 0.5: every reward is ~0
        "reward_margin": first.get("eval_initial/rewards/margins"),
        "likelihood_accuracy": likelihood_accuracy_before(trainer),
        "exact_match": before_match,
        "answer_phrase": _answer_phrase(before_details),
        "n": len(test_items),
    }

    log("measuring the trained policy (the same model object, adapters trained)")
    after_match, after_details = exact_match(
        trainer.run.model,
        trainer.run.tokenizer,
        test_items,
        max_new_tokens=size.max_new_tokens,
        progress=cfg.progress,
    )
    last = {**last, **result.last_metrics}
    after = {
        "preference_accuracy": last.get("eval_initial/rewards/accuracies"),
        "reward_margin": last.get("eval_initial/rewards/margins"),
        "likelihood_accuracy": last.get("eval_logps/accuracies"),
        "exact_match": after_match,
        "answer_phrase": _answer_phrase(after_details),
        "n": len(test_items),
    }
    if method in ("mrpo", "mdpo"):
        before["preference_accuracy_virtual_reference"] = first.get("eval_rewards/accuracies")
        after["preference_accuracy_virtual_reference"] = last.get("eval_rewards/accuracies")
    evaluation = {
        "before": before,
        "after": after,
        "method": method,
        "sft_weight": sft_weight,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    run.before_after.write_text(json.dumps(evaluation, indent=1))
    samples = [{"before": b, "after": a} for b, a in zip(before_details[:5], after_details[:5])]
    run.generations.write_text(json.dumps({"before": before_details, "after": after_details}, indent=1))
    report = write_report(
        out, extra_sections={"What this demo measured": _explain(method, sft_weight, size, samples)}
    )
    print(_table(before, after))
    print(f"\nreport: {report}\nrun directory: {out}  ({evaluation['seconds']:.0f} s)")
    return out


def _eval_rows(metrics_path: Path) -> tuple[dict, dict]:
    """The first and last held-out evaluation rows of metrics.jsonl (step 0 and the end)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    return (evals[0], evals[-1]) if evals else ({}, {})


def _answer_phrase(details: list[dict]) -> float:
    """Fraction of greedy answers that reach "The answer is N" at all (right or wrong)."""
    return sum(d["predicted"] is not None for d in details) / max(1, len(details))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _table(before: dict, after: dict) -> str:
    rows = [
        ("preference accuracy (implicit reward vs initial policy)", "preference_accuracy"),
        ("preference accuracy vs the MRPO virtual reference", "preference_accuracy_virtual_reference"),
        ("likelihood accuracy (log π(correct) > log π(wrong))", "likelihood_accuracy"),
        ("exact match of greedy answers", "exact_match"),
        ('answers that reach "The answer is N" at all', "answer_phrase"),
    ]
    rows = [r for r in rows if r[1] in before or r[1] in after]
    width = max(len(r[0]) for r in rows)
    n = after.get("n") or before.get("n")
    lines = [f"{f'held-out metric ({n} new problems)':<{width}}  before   after", "-" * (width + 17)]
    lines += [f"{name:<{width}}  {_fmt(before.get(key)):>6}  {_fmt(after.get(key)):>6}" for name, key in rows]
    return "\n".join(lines)


def _explain(method: str, sft_weight: float, size: DemoSize, samples: list[dict]) -> str:
    refs = (
        f"the initial policy (primary) and {SECOND_REFERENCE}" if method == "mrpo" else "the initial policy"
    )
    sft = (
        f", plus an SFT term on the chosen answers (`sft_weight` {sft_weight:g})"
        if sft_weight
        else ", the preference loss alone (`sft_weight` 0)"
    )
    text = (
        f"Policy {POLICY} with LoRA, method `{method}`{sft}, references: {refs}. "
        f"{size.train_pairs} training pairs, {size.eval_pairs} held-out problems never seen in training "
        "(the bundled arithmetic data; see docs/data.md). Preference accuracy before training is 0.5 by "
        "construction (the policy equals its reference, every implicit reward is 0). Likelihood accuracy "
        "and exact match are measured the same way before and after.\n\n"
        "First held-out generations (before → after):\n\n"
    )
    for s in samples:
        text += (
            f"- answer {s['before']['answer']}: before {s['before']['predicted']} "
            f"({'✓' if s['before']['correct'] else '✗'}), after {s['after']['predicted']} "
            f"({'✓' if s['after']['correct'] else '✗'})\n"
        )
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="preftune demo",
        description="A real preference fine-tuning run whose effect you can see, offline, on a CPU: "
        f"{POLICY} (LoRA) learns from the bundled arithmetic pairs (DPO + an SFT term by default); "
        "held-out preference accuracy, likelihood accuracy and greedy answers are measured before and "
        "after, and report.md with plots is written into the run directory.",
    )
    parser.add_argument(
        "--method",
        default="dpo",
        choices=DEMO_METHODS,
        help=f"preference method (default dpo; mrpo uses two references, the initial policy and {SECOND_REFERENCE})",
    )
    parser.add_argument(
        "--sft-weight",
        type=float,
        default=DEMO_SFT_WEIGHT,
        metavar="λ",
        help=f"weight of the SFT term on the chosen answers (default {DEMO_SFT_WEIGHT:g}, chosen on the method "
        "comparison's validation split; 0: the preference loss alone)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 pairs, 4 steps (~2 minutes)")
    parser.add_argument(
        "--output-dir",
        help="run directory (default runs/demo-<method>[-sft<λ>][-quick], e.g. runs/demo-dpo-sft3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and adapter initialisation")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="intra-op CPU threads (the `threads` config key; default: automatic). On a busy machine "
        "fewer are faster (e.g. --threads 1); the run says so when it sees the machine oversubscribed",
    )
    args = parser.parse_args(argv)
    if args.sft_weight < 0:
        parser.error("--sft-weight must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    run_demo(
        args.method,
        quick=args.quick,
        output_dir=args.output_dir,
        seed=args.seed,
        sft_weight=args.sft_weight,
        threads=args.threads,
    )
    return 0
