"""When do MRPO, MallowsPO and RPO beat DPO? The side-by-side study, resumable, in one command.

    python experiments/method_comparison/run.py [--quick] [--out DIR] [--arms a,b] [--max-runs N]

Every run (arm x regime x seed, plus the sweeps of ε and λ) writes ``<out>/runs/<run id>/done.json`` when it
finishes and appends one line to ``<out>/results.jsonl``; a rerun skips finished runs, so an
interrupted study continues where it stopped. ``RESULTS.md`` and the plots are regenerated from
whatever results exist after every run (missing arms are marked). See README.md next to this file.

Splits (all fixed before anything trains, from the bundled arithmetic pairs):

* test: the first ``test_rows`` problems of the bundled test file; every arm is measured on exactly
  these rows, and nothing is ever selected on them;
* validation: the last ``val_rows`` pairs of the bundled training file (never trained on); the ε of
  the MRPO/MDPO arms (by preference accuracy) and the λ of DPO's SFT term (by greedy exact match) are
  chosen there (the sweep runs never load the test file);
* training: per (regime, seed), ``pairs`` pairs drawn with that seed from the rest of the training file.
  Every arm of a (regime, seed) trains on the same pairs, so differences are paired.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import analysis  # noqa: E402

POLICY = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    references: tuple[str, ...]  # "policy", "gemma", "domain"
    weights: str | None = None  # mrpo.weights
    sweep_eps: bool = False  # ε chosen on the validation split (preference accuracy)
    note: str = ""
    sweep_sft: bool = False  # λ of the SFT term chosen on the validation split (greedy exact match)


ARMS: tuple[Arm, ...] = (
    Arm("dpo", "dpo", ("policy",), note="DPO, the initial policy as reference"),
    Arm("dpo_gemma", "dpo", ("gemma",), note="DPO, Gemma-3-270M as the only reference"),
    Arm("dpo_domain", "dpo", ("domain",), note="DPO, the SFT'd domain reference only"),
    Arm("mdpo", "mdpo", ("policy", "gemma"), sweep_eps=True, note="multi-DPO baseline (ARWC)"),
    Arm("mrpo_adaptive", "mrpo", ("policy", "gemma"), "adaptive", True, "MRPO, ARWC (paper pairing)"),
    Arm("mrpo_released", "mrpo", ("policy", "gemma"), "adaptive_released", True, "MRPO, released pairing"),
    Arm("mrpo_val2", "mrpo", ("policy", "gemma"), "validation", True, "MRPO, validation weights, 2 refs"),
    Arm(
        "mrpo_val3",
        "mrpo",
        ("policy", "gemma", "domain"),
        "validation",
        True,
        "MRPO, validation weights, 3 refs",
    ),
    Arm("mallows_theta", "mallows_theta", ("policy",), note="MallowsPO-θ"),
    Arm("mallows_phi", "mallows_phi", ("policy",), note="MallowsPO-ϕ"),
    Arm("rpo", "rpo", ("policy",), note="RPO"),
    Arm("mrpo_rpo", "mrpo+rpo", ("policy", "gemma"), "adaptive", True, "MRPO (ARWC) + RPO"),
    # the demo's candidates beyond the methods (does an SFT term keep the answers terse and right?)
    Arm("sft", "sft", ("policy",), note="SFT on the chosen answers only, no preference term"),
    Arm("dpo_sft", "dpo", ("policy",), note="DPO + λ·SFT on the chosen answers", sweep_sft=True),
)
ARM_NAMES = tuple(a.name for a in ARMS)


@dataclass(frozen=True)
class Study:
    regimes: dict[str, int]  # name -> training pairs
    seeds: dict[str, tuple[int, ...]]  # regime -> seeds
    test_rows: int
    val_rows: int
    epochs: float
    batch_size: int
    learning_rate: float
    beta: float
    eps_grid: tuple[float, ...]
    sft_grid: tuple[float, ...]
    max_new_tokens: int
    gen_batch: int
    sft_steps: int
    sft_lr: float
    bootstrap: int
    quick: bool
    lora: dict = field(default_factory=lambda: {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0})


FULL = Study(
    regimes={"scarce": 64, "larger": 256},
    seeds={"scarce": (0, 1, 2), "larger": (0,)},
    test_rows=64,
    val_rows=64,
    epochs=1.0,
    batch_size=4,
    learning_rate=2e-4,
    beta=0.1,
    eps_grid=(0.1, 0.3, 1.0),
    sft_grid=(0.3, 1.0, 3.0, 10.0, 30.0),
    max_new_tokens=96,
    gen_batch=32,
    sft_steps=32,
    sft_lr=2e-4,
    bootstrap=2000,
    quick=False,
)
QUICK = Study(
    regimes={"scarce": 8, "larger": 12},
    seeds={"scarce": (0, 1), "larger": (0,)},
    test_rows=4,
    val_rows=4,
    epochs=1.0,
    batch_size=4,
    learning_rate=1e-3,
    beta=0.1,
    eps_grid=(0.1, 1.0),
    sft_grid=(0.5, 2.0),
    max_new_tokens=6,
    gen_batch=4,
    sft_steps=2,
    sft_lr=1e-3,
    bootstrap=200,
    quick=True,
    lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
)


# -- data -------------------------------------------------------------------------------------------


def _bundled(split: str) -> list[str]:
    from preftune.data.arithmetic import arithmetic_path

    return arithmetic_path(split).read_text().splitlines()


def write_splits(study: Study, data: Path) -> dict:
    """Test, validation and per-(regime, seed) training files; returns their row ids (bundled lines)."""
    data.mkdir(parents=True, exist_ok=True)
    train_lines, test_lines = _bundled("train"), _bundled("test")
    test = list(range(study.test_rows))
    val = list(range(len(train_lines) - study.val_rows, len(train_lines)))
    pool = list(range(len(train_lines) - study.val_rows))
    out = {"test": test, "validation": val, "train": {}}
    (data / "test.jsonl").write_text("".join(test_lines[i] + "\n" for i in test))
    (data / "validation.jsonl").write_text("".join(train_lines[i] + "\n" for i in val))
    for regime, n in study.regimes.items():
        for seed in study.seeds[regime]:
            rows = sorted(random.Random(1000 * seed + n).sample(pool, n))
            (data / f"train-{regime}-s{seed}.jsonl").write_text("".join(train_lines[i] + "\n" for i in rows))
            out["train"][f"{regime}-s{seed}"] = rows
    (data / "splits.json").write_text(json.dumps(out))
    return out


# -- models -------------------------------------------------------------------------------------------


def resolve_models(study: Study, out: Path, arms: tuple[Arm, ...] = ARMS) -> dict[str, str]:
    """Policy and Gemma as local directories (presets for the full run, tiny random models for --quick)."""
    if study.quick:
        from preftune.testing import save_tiny_model

        models = out / "tiny-models"
        policy, gemma = models / "policy", models / "gemma"
        if not (policy / "config.json").exists():
            save_tiny_model(policy, vocab_size=512, seed=0)
            save_tiny_model(gemma, vocab_size=384, seed=1, hidden_size=48)
        return {"policy": str(policy), "gemma": str(gemma)}
    from preftune.models import resolve_model

    models = {"policy": str(resolve_model(POLICY))}
    if any("gemma" in a.references for a in arms):  # resolved only when a chosen arm needs it
        models["gemma"] = str(resolve_model(GEMMA))
    return models


def sft_domain_reference(study: Study, policy: str, train_file: Path, target: Path, seed: int) -> str:
    """The domain reference: the policy after a short SFT (LoRA, merged) on the training chosen answers.

    A plain loop: mean token NLL of the chosen completion given the prompt, AdamW, ``sft_steps``
    steps of ``batch_size`` pairs cycling through the training split. Written once per training split.
    """
    with _locked(target.with_name(target.name + ".lock")):  # one process trains it, the others wait
        if not (target / "config.json").exists():
            _sft(study, policy, train_file, target, seed)
    return str(target)


def _sft(study: Study, policy: str, train_file: Path, target: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from preftune.data.collate import collate_sequences
    from preftune.data.loading import load_examples
    from preftune.data.tokenize import tokenize_dataset
    from preftune.models.loading import load_causal_lm
    from preftune.scoring import score_batch

    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(policy)
    lora = LoraConfig(r=study.lora["r"], lora_alpha=study.lora["alpha"], target_modules="all-linear")
    model = get_peft_model(model, lora)
    items, _ = tokenize_dataset(load_examples(str(train_file)), tokenizer, max_length=256, progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=study.sft_lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    model.train()
    for step in range(study.sft_steps):
        idx = [order[(step * study.batch_size + j) % len(order)] for j in range(study.batch_size)]
        batch = collate_sequences([items[i].prompt_ids for i in idx], [items[i].chosen_ids for i in idx], pad)
        scores = score_batch(model, **batch)
        loss = -(scores.logps / scores.n_tokens.clamp(min=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = model.merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


# -- one run ------------------------------------------------------------------------------------------


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_config(
    study: Study,
    arm: Arm,
    models: dict,
    train_file: Path,
    eval_file: Path,
    run_dir: Path,
    eps,
    seed,
    sft_weight: float | None = None,
):
    refs = [models[r] if r != "policy" else "policy" for r in arm.references]
    cfg = {
        "model": models["policy"],
        "method": arm.method,
        "references": refs,
        "beta": study.beta,
        "data": {"train": str(train_file), "eval": str(eval_file)},
        "max_length": 256,
        "batch_size": study.batch_size,
        "epochs": study.epochs,
        "learning_rate": study.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "lora": study.lora,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
        "seed": seed,
        "output_dir": str(run_dir / "train"),
        "overwrite_output_dir": True,
        "cache_dir": str(run_dir.parents[1] / "cache"),
        "progress": False,
        "report_to": [],
        # the runner's own thread count (--threads, or 1 for --quick): without it preftune picks
        # its automatic count, 2 per worker on a 2-core machine with 2 workers (oversubscribed)
        "threads": _torch_threads(),
    }
    if arm.method.startswith(("mrpo", "mdpo")):
        cfg["mrpo"] = {"clip_eps": eps}
        if arm.weights:
            cfg["mrpo"]["weights"] = arm.weights
    if sft_weight:
        cfg["sft_weight"] = sft_weight
    return cfg


def answer_rows(model, tokenizer, records: list[dict], study: Study) -> dict[str, list]:
    """Greedy answers to ``records`` (batched, KV cache; a row stops once it has stated "The answer
    is N."), per row: exact match, whether it reached an answer at all, and the text."""
    from preftune.generation import ANSWER_STATED, answer_match

    _, details = answer_match(
        model,
        tokenizer,
        records,
        mode="numeric",
        max_new_tokens=study.max_new_tokens,
        batch_size=study.gen_batch,
        stop_when=ANSWER_STATED,
    )
    return {
        "exact_match": [float(d["correct"]) for d in details],
        "reached_answer": [float(d["reached_answer_phrase"]) for d in details],
        "generations": [d["output"] for d in details],
    }


def pair_logps(model, view, split: str, batch_pairs: int = 16):
    """(chosen, rejected) log-probs [N] of every pair of ``split``, float64, without gradient.

    One row per pair with the prompt shared by both completions (the training path's shared-prompt
    batches) where the probe says it gives this model's exact numbers; plain rows otherwise."""
    import torch

    from preftune.data.collate import collate_shared_prompt_pairs
    from preftune.scoring import score_batch, score_dataset
    from preftune.scoring_probe import shared_prompt_support

    prompts, chosen = view.sequences(split, "chosen")
    _, rejected = view.sequences(split, "rejected")
    model.eval()
    with torch.no_grad():
        if shared_prompt_support(
            model, max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
        ):
            return tuple(
                score_dataset(
                    model, prompts, side, pad_token_id=view.pad_token_id, with_entropy=False
                ).logps.double()
                for side in (chosen, rejected)
            )
        out_c, out_r = [], []
        for s in range(0, len(prompts), batch_pairs):
            sl = slice(s, s + batch_pairs)
            batch = collate_shared_prompt_pairs(prompts[sl], chosen[sl], rejected[sl], view.pad_token_id)
            logps = score_batch(model, **batch).logps.double()
            n = len(prompts[sl])
            out_c.append(logps[:n])
            out_r.append(logps[n:])
    return torch.cat(out_c), torch.cat(out_r)


def initial_logps(trainer, cache: Path) -> tuple:
    """The initial policy's (chosen, rejected) log-probs on the eval split, computed once per study.

    The same for every arm (same model, same rows): the first run that needs them writes ``cache``."""
    import torch

    if cache.exists():
        saved = json.loads(cache.read_text())
        return torch.tensor(saved["chosen"], dtype=torch.float64), torch.tensor(
            saved["rejected"], dtype=torch.float64
        )
    with trainer.run.model.disable_adapter():
        chosen, rejected = pair_logps(trainer.run.model, trainer.run.data.views[0], "eval")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"chosen": chosen.tolist(), "rejected": rejected.tolist()}))
    tmp.replace(cache)
    return chosen, rejected


def measure(
    trainer, study: Study, eval_records: list[dict], split_ids: list[int], generate: bool, initial: Path
) -> dict:
    """Per-row held-out metrics of the trained policy against the initial policy (adapters disabled).

    ``rows`` are the bundled data's row ids (``split_ids``[line - 1] of the evaluated file);
    ``initial`` caches the initial policy's log-probs of this split for every run.
    """
    import torch

    view, model = trainer.run.data.views[0], trainer.run.model
    lines = [it.row for it in view.tokenized["eval"]]  # 1-based line numbers of the JSONL file
    init_c, init_r = initial_logps(trainer, initial)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, view, "eval")
    rc, rr = chosen - init_c, rejected - init_r
    per_row = {
        "rows": [split_ids[i - 1] for i in lines],
        "preference_accuracy": ((rc > rr).double() + 0.5 * (rc == rr).double()).tolist(),
        "likelihood_accuracy": (chosen > rejected).double().tolist(),
        "divergence": rc.tolist(),
    }
    if generate:
        per_row.update(answer_rows(model, trainer.run.tokenizer, [eval_records[i - 1] for i in lines], study))
    return per_row


def initial_answers(study: Study, out: Path, policy: str, records: list[dict], split_ids: list[int]) -> Path:
    """The untrained policy's greedy answers to the test problems, once per study: the "before" row.

    Written to ``initial/test-generation.json`` (per row: exact match, reached an answer, the text)."""
    path = out / "initial" / "test-generation.json"
    with _locked(out / "initial" / ".generation.lock"):
        if path.exists():
            return path
        from preftune.models.loading import load_causal_lm

        model, tokenizer = load_causal_lm(policy)
        per_row = {"rows": list(split_ids), **answer_rows(model, tokenizer, records, study)}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(per_row))
        tmp.replace(path)
    return path


def training_summary(metrics_path: Path, arm: Arm) -> dict:
    """Mean CTRO clip fraction and reference weights over the training steps (MRPO/MDPO arms)."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    prefix = arm.method.split("+")[0]
    out: dict = {"final_loss": rows[-1]["loss"] if rows else None, "steps": len(rows)}
    if prefix in ("mrpo", "mdpo") and rows:
        keys = sorted(k for k in rows[0] if k.startswith(f"{prefix}/"))
        for k in keys:
            out[k.split("/", 1)[1]] = sum(r.get(k, 0.0) for r in rows) / len(rows)
    return out


def train_and_measure(
    study, arm, models, train_file, eval_file, eval_records, split_ids, run_dir, eps, seed, generate, sft=None
):
    from preftune.config import load_config
    from preftune.trainer import Trainer

    cfg = load_config(run_config(study, arm, models, train_file, eval_file, run_dir, eps, seed, sft))
    trainer = Trainer(cfg)
    # The held-out split is tokenized (and its reference scores cached) like any eval split, but the
    # trainer's own aggregate evaluation before and after training is skipped: measure() scores the
    # same rows per row, once, and the initial policy's side once per study.
    trainer.run.data.splits.remove("eval")
    result = trainer.fit()
    initial = run_dir.parents[1] / "initial" / f"{eval_file.stem}.json"
    per_row = measure(trainer, study, eval_records, split_ids, generate, initial)
    summary = training_summary(result.metrics_path, arm)
    if trainer.run.validation is not None:
        summary["validation_weights"] = trainer.run.validation["weights"]
        summary["validation_accuracies"] = trainer.run.validation["accuracies"]
    return per_row, summary


# -- the study ----------------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _finished(run_dir: Path) -> dict | None:
    marker = run_dir / "done.json"
    return json.loads(marker.read_text()) if marker.exists() else None


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True):
    """An exclusive ``flock`` on ``path``; yields False (without waiting) if another process holds it
    and ``blocking`` is False. The kernel releases it when its process dies: no stale claims."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record(out: Path, run_dir: Path, record: dict) -> None:
    with _locked(out / ".results.lock"), open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    (run_dir / "done.json").write_text(json.dumps(record))


def _write_results(out: Path, study: Study) -> None:
    with _locked(out / ".results.lock"):
        analysis.write_results(out, ARMS, study)


def plan(study: Study, arms: tuple[Arm, ...], regimes: list[str] | None = None) -> list[dict]:
    """Every run in order: the sweeps of ε and of the SFT term's λ (validation only, on the first
    regime's first seed) first, then the main runs of ``regimes`` (default all), regime by regime."""
    runs = []
    sweep_regime = next(iter(study.regimes))
    first = {"kind": "sweep", "regime": sweep_regime, "seed": study.seeds[sweep_regime][0]}
    for arm in arms:
        if arm.sweep_eps:
            runs += [{**first, "arm": arm, "eps": eps, "sft": None} for eps in study.eps_grid]
        if arm.sweep_sft:
            runs += [{**first, "arm": arm, "eps": None, "sft": lam} for lam in study.sft_grid]
    for regime in regimes or study.regimes:
        for seed in study.seeds[regime]:
            for arm in arms:
                runs.append(
                    {"kind": "main", "arm": arm, "regime": regime, "seed": seed, "eps": None, "sft": None}
                )
    return runs


def run_study(
    quick: bool = False,
    out: str | Path | None = None,
    arms: list[str] | None = None,
    max_runs: int | None = None,
    study: Study | None = None,
    regimes: list[str] | None = None,
    threads: int | None = None,
    poll_s: float = 15.0,
) -> Path:
    """Run every unfinished run of the study (``study`` overrides FULL/QUICK, for tests).

    Several processes may run it on the same ``out`` at once (``--workers``): each claims a run with a
    lock before starting it, and a main run whose sweep another process is still running waits."""
    study = study or (QUICK if quick else FULL)
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif study.quick:  # tiny models gain nothing from threads, and lose a lot to them on a shared CPU
        torch.set_num_threads(1)
    try:
        return _run_study(study, out, arms, max_runs, regimes, poll_s)
    finally:
        torch.set_num_threads(before)


def _setup(study: Study, out: Path, chosen: tuple[Arm, ...]) -> tuple[dict, dict]:
    """Splits, study.json and the model directories (one process at a time)."""
    with _locked(out / ".setup.lock"):
        splits = write_splits(study, out / "data")
        (out / "study.json").write_text(
            json.dumps(
                {"study": {**study.__dict__, "regimes": study.regimes}, "arms": [a.__dict__ for a in ARMS]},
                default=str,
            )
        )
        return splits, resolve_models(study, out, chosen)


def _run_study(
    study: Study,
    out: str | Path | None,
    arms: list[str] | None,
    max_runs: int | None,
    regimes: list[str] | None,
    poll_s: float,
) -> Path:
    quick = study.quick
    out = Path(out or HERE / ("results-quick" if quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = tuple(a for a in ARMS if arms is None or a.name in arms)
    unknown = set(arms or ()) - set(ARM_NAMES)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; valid: {', '.join(ARM_NAMES)}")
    splits, models = _setup(study, out, chosen)
    test_records = [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    val_records = [json.loads(x) for x in (out / "data" / "validation.jsonl").read_text().splitlines()]
    if not regimes or set(regimes) & set(study.regimes):  # the "before" row of every table
        initial_answers(study, out, models["policy"], test_records, splits["test"])
    done_now = 0
    while True:
        busy = waiting = progressed = False  # busy: claimed by another process; waiting: on a sweep
        for run in plan(study, chosen, regimes):
            arm, regime, seed = run["arm"], run["regime"], run["seed"]
            eps, sft = run["eps"], run["sft"]
            if run["kind"] == "main" and arm.sweep_eps:
                eps = analysis.selected_eps(out / "results.jsonl", arm.name, study.eps_grid)
            if run["kind"] == "main" and arm.sweep_sft:
                sft = analysis.selected_sft(out / "results.jsonl", arm.name, study.sft_grid)
            if (arm.sweep_eps and eps is None) or (arm.sweep_sft and sft is None):
                waiting = True  # its sweep is not finished (another process may be running it)
                continue
            run = {**run, "eps": eps, "sft": sft}
            run_id = (
                f"{run['kind']}-{arm.name}-{regime}-s{seed}"
                + (f"-eps{eps:g}" if eps is not None else "")
                + (f"-sft{sft:g}" if sft is not None else "")
            )
            run_dir = out / "runs" / run_id
            if _finished(run_dir):
                continue
            if max_runs is not None and done_now >= max_runs:
                _write_results(out, study)
                return out
            with _locked(out / "runs" / f"{run_id}.claim", blocking=False) as mine:
                if not mine:
                    busy = True
                    continue
                if _finished(run_dir):  # another process finished it while this one looked
                    continue
                _one_run(study, out, run, arm, run_id, run_dir, models, splits, test_records, val_records)
            done_now += 1
            progressed = True
            _write_results(out, study)
        if not busy:
            if waiting:
                print("some main runs wait for a sweep that did not finish; rerun to continue", flush=True)
            break
        if not progressed:  # the rest is claimed by other processes: look again shortly
            time.sleep(poll_s)
    _write_results(out, study)
    return out


def _one_run(study, out, run, arm, run_id, run_dir, models, splits, test_records, val_records) -> None:
    regime, seed, eps, sft = run["regime"], run["seed"], run["eps"], run["sft"]
    run_dir.mkdir(parents=True, exist_ok=True)
    train_file = out / "data" / f"train-{regime}-s{seed}.jsonl"
    run_models = dict(models)
    if "domain" in arm.references:
        run_models["domain"] = sft_domain_reference(
            study, models["policy"], train_file, out / "sft" / f"{regime}-s{seed}", seed
        )
    sweep = run["kind"] == "sweep"
    eval_file = out / "data" / ("validation.jsonl" if sweep else "test.jsonl")
    print(f"run {run_id} (pid {os.getpid()})", flush=True)
    started = time.perf_counter()
    per_row, summary = train_and_measure(
        study,
        arm,
        run_models,
        train_file,
        eval_file,
        val_records if sweep else test_records,
        splits["validation"] if sweep else splits["test"],
        run_dir,
        eps,
        seed,
        generate=not sweep or arm.sweep_sft,  # λ is chosen on the validation answers
        sft=sft,
    )
    import torch

    record = {
        "kind": run["kind"],
        "run": run_id,
        "arm": arm.name,
        "regime": regime,
        "pairs": study.regimes[regime],
        "seed": seed,
        "eps": eps,
        "sft_weight": sft,
        "split": "validation" if sweep else "test",
        "split_rows": splits["validation"] if sweep else splits["test"],
        "train_rows": splits["train"][f"{regime}-s{seed}"],
        "per_row": per_row,
        "train": summary,
        "seconds": round(time.perf_counter() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "quick": study.quick,
    }
    _record(out, run_dir, record)
    for path in (run_dir / "train").iterdir():  # models and checkpoints: ~0.5 GB a run at full size
        if path.is_dir():
            shutil.rmtree(path)


def _launch_workers(argv: list[str], workers: int, script: str | Path = __file__) -> int:
    """``workers`` copies of this command (``script``: this study's or another's runner, which takes
    ``--workers`` and ``--threads``), each with an equal share of the CPUs; the first failure's code."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, str(Path(script).resolve()), *argv, "--workers", "1", "--threads", str(threads)]
    procs = [subprocess.Popen(cmd) for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    return next((c for c in codes if c), 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, a handful of rows")
    parser.add_argument("--out", help="results directory (default: results/ or results-quick/ here)")
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ARM_NAMES)}")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs (per process)")
    parser.add_argument("--regimes", help="comma-separated subset of the data regimes (default: all)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes running the study side by side, each with CPUs/N torch threads (default 1)",
    )
    parser.add_argument("--threads", type=int, help="torch threads of this process (default: torch's)")
    parser.add_argument(
        "--results-only",
        action="store_true",
        help="rewrite RESULTS.md from --out's results.jsonl; train nothing",
    )
    args = parser.parse_args(argv)
    if args.results_only:
        if not args.out:
            parser.error("--results-only needs --out DIR")
        study = QUICK if args.quick else FULL
        print(analysis.write_results(Path(args.out), ARMS, study))
        return 0
    arms = [a for a in args.arms.split(",") if a] if args.arms else None
    regimes = [r for r in args.regimes.split(",") if r] if args.regimes else None
    if regimes and set(regimes) - set(FULL.regimes):
        parser.error(f"--regimes: valid regimes are {', '.join(FULL.regimes)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1:
        rest = [
            a
            for i, a in enumerate(argv)
            if not a.startswith("--workers") and not (i and argv[i - 1] == "--workers")
        ]
        code = _launch_workers(rest, args.workers)
        if code == 0:
            print(
                f"results: {Path(args.out or HERE / ('results-quick' if args.quick else 'results')) / 'RESULTS.md'}"
            )
        return code
    out = run_study(args.quick, args.out, arms, args.max_runs, regimes=regimes, threads=args.threads)
    print(f"results: {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
