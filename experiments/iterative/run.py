"""Does on-policy preference optimization beat offline pairs and rejection-sampling SFT here? The
iterative study, resumable, in one command.

    python experiments/iterative/run.py [--quick] [--out DIR] [--arms a,b] [--max-runs N] [--workers N]

Every run (arm x seed, plus the validation sweep of λ and the temperature) is one ``preftune
iterate`` run in ``<out>/runs/<run id>/`` (itself resumable stage by stage: an interrupted run
continues at the stage it reached); a finished run writes ``done.json`` and appends one line to
``<out>/results.jsonl``, and a rerun skips it. ``RESULTS.md`` and ``curves.png`` are regenerated from
whatever results exist after every run. See README.md next to this file.

Splits (fixed before anything trains; the same rows as experiments/method_comparison):

* test: the first ``test_rows`` problems of the bundled test file (every arm is measured on exactly
  these; nothing is selected on them);
* validation: the last ``val_rows`` problems of the bundled training file; λ of the NLL term and
  the sampling temperature are chosen there (the sweep runs never load the test file);
* prompts: the rest of the training file, in file order; round N takes the next
  ``prompts_per_round`` of them (all arms and seeds see the same prompts; the seed changes the
  samples, the adapters' initialisation and the data order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from experiments.method_comparison import run as method_comparison  # noqa: E402  (locks, machine, CIs)

POLICY = "smollm2-135m-instruct"
COMPARISON = ROOT / "experiments" / "method_comparison" / "results"


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    reference: str = "initial"  # rounds.reference
    nll: bool = False  # sft_weight = the λ chosen on validation
    note: str = ""


ARMS: tuple[Arm, ...] = (
    Arm("rs_sft", "sft", note="rejection-sampling SFT: the best (correct) sample of each problem, NLL only"),
    Arm("dpo", "dpo", note="iterative DPO, the initial model as reference"),
    Arm("dpo_nll", "dpo", nll=True, note="iterative DPO + λ·NLL on the chosen sample (Iterative RPO)"),
    Arm("mrpo_both", "mrpo", "both", note="iterative MRPO, references {initial, previous round}"),
    Arm("rpo", "rpo", note="iterative RPO (relative preference optimization)"),
    Arm("mallows_theta", "mallows_theta", note="iterative MallowsPO-θ"),
)
ARM_NAMES = tuple(a.name for a in ARMS)
SWEEP_ARM = "dpo_nll"
# `preftune demo` shows offline DPO + 3·NLL; the iterative arm that would replace it is its on-policy
# twin (Iterative RPO's loss, the arm the sweep tuned). Whether it does is decided on validation: this
# arm runs all rounds once more on the validation problems, after the main runs.
DEMO_CHECK_ARM = "dpo_nll"


@dataclass(frozen=True)
class Study:
    rounds: int
    sweep_rounds: int  # rounds of each validation sweep run (the choice is made after the last)
    seeds: tuple[int, ...]
    prompts_per_round: int
    k: int
    test_rows: int
    val_rows: int
    batch_size: int
    learning_rate: float
    beta: float
    nll_grid: tuple[float, ...]
    temperature_grid: tuple[float, ...]
    max_new_tokens: int
    bootstrap: int
    quick: bool
    lora: dict = field(default_factory=lambda: {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0})


FULL = Study(
    rounds=3,
    sweep_rounds=1,
    seeds=(0, 1),
    prompts_per_round=96,
    k=4,
    test_rows=64,
    val_rows=64,
    batch_size=4,
    learning_rate=2e-4,
    beta=0.1,
    nll_grid=(1.0, 3.0),
    temperature_grid=(0.3, 0.6),
    max_new_tokens=96,
    bootstrap=2000,
    quick=False,
)
QUICK = Study(
    rounds=2,
    sweep_rounds=1,
    seeds=(0,),
    prompts_per_round=4,
    k=2,
    test_rows=3,
    val_rows=3,
    batch_size=2,
    learning_rate=1e-3,
    beta=0.1,
    nll_grid=(1.0,),
    temperature_grid=(1.0, 1.5),
    max_new_tokens=5,
    bootstrap=200,
    quick=True,
    lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
)


# -- data and model -------------------------------------------------------------------------------------


def write_splits(study: Study, data: Path) -> dict:
    """test.jsonl, validation.jsonl and prompts.jsonl (bundled rows); returns their row ids."""
    from preftune.data.arithmetic import arithmetic_path

    data.mkdir(parents=True, exist_ok=True)
    train = arithmetic_path("train").read_text().splitlines()
    test = arithmetic_path("test").read_text().splitlines()
    if study.quick:  # answers a tiny random model sometimes "gets": any of a, e (regex judge)
        train = [json.dumps({**json.loads(x), "answer": "[ae]"}) for x in train]
        test = [json.dumps({**json.loads(x), "answer": "[ae]"}) for x in test]
    ids = {
        "test": list(range(study.test_rows)),
        "validation": list(range(len(train) - study.val_rows, len(train))),
        "prompts": list(range(len(train) - study.val_rows)),
    }
    (data / "test.jsonl").write_text("".join(test[i] + "\n" for i in ids["test"]))
    (data / "validation.jsonl").write_text("".join(train[i] + "\n" for i in ids["validation"]))
    (data / "prompts.jsonl").write_text("".join(train[i] + "\n" for i in ids["prompts"]))
    (data / "splits.json").write_text(json.dumps(ids))
    return ids


def resolve_policy(study: Study, out: Path) -> str:
    if study.quick:
        from preftune.testing import save_tiny_model

        path = out / "tiny-models" / "policy"
        if not (path / "config.json").exists():
            save_tiny_model(path, vocab_size=512, seed=0)
        return str(path)
    from preftune.models import resolve_model

    return str(resolve_model(POLICY))


# -- one run --------------------------------------------------------------------------------------------


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_config(
    study: Study,
    arm: Arm,
    policy: str,
    out: Path,
    run_dir: Path,
    seed: int,
    nll,
    temperature,
    split,
    rounds: int | None = None,
):
    judge = {"kind": "verifier", "match": "regex" if study.quick else "numeric"}
    cfg = {
        "model": policy,
        "method": arm.method,
        "beta": study.beta,
        "max_length": 256,
        "batch_size": study.batch_size,
        "epochs": 1.0,
        "learning_rate": study.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "lora": study.lora,
        "logging_steps": 1,
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": seed,
        "output_dir": str(run_dir / "iterate"),
        "resume": True,  # an interrupted run continues at the stage it reached
        "cache_dir": str(out / "cache"),
        "progress": False,
        "report_to": [],
        # the runner's own thread count (--threads, or 1 for --quick): without it preftune picks
        # its automatic count, 2 per worker on a 2-core machine with 2 workers (oversubscribed)
        "threads": _torch_threads(),
        "rounds": {
            "count": rounds or (study.sweep_rounds if split == "validation" else study.rounds),
            "prompts": str(out / "data" / "prompts.jsonl"),
            "prompts_per_round": study.prompts_per_round,
            "samples_per_prompt": study.k,
            "temperature": temperature,
            "max_new_tokens": study.max_new_tokens,
            "seed": seed,
            "batch_size": 8 if not study.quick else 2,
            "judge": judge,
            "pairs": "best_worst",
            "reference": arm.reference,
            "eval_prompts": str(out / "data" / f"{split}.jsonl"),
        },
    }
    if arm.nll:
        cfg["sft_weight"] = nll
    if arm.method == "mrpo":
        cfg["mrpo"] = {"clip_eps": 0.1}
    return cfg


def _seed_round0(out: Path, split: str, target: Path) -> None:
    """Round 0 (the untrained model's held-out answers) is the same for every run of a split: the
    first run computes it, the others copy it."""
    shared = out / "initial" / split
    if (shared / "round.json").exists() and not (target / "round-0" / "round.json").exists():
        (target / "round-0").mkdir(parents=True, exist_ok=True)
        for name in ("eval.jsonl", "round.json"):
            shutil.copy2(shared / name, target / "round-0" / name)


def _share_round0(out: Path, split: str, source: Path) -> None:
    shared = out / "initial" / split
    if not (shared / "round.json").exists() and (source / "round-0" / "round.json").exists():
        tmp = shared.with_name(shared.name + f".tmp{os.getpid()}")
        shutil.copytree(source / "round-0", tmp)
        tmp.rename(shared)


def per_round_scores(iterate_dir: Path, rounds: int) -> dict[str, list[float]]:
    """Exact match (the verifier's score) per held-out problem, per round (0 = untrained)."""
    out = {}
    for r in range(rounds + 1):
        rows = [json.loads(x) for x in (iterate_dir / f"round-{r}" / "eval.jsonl").read_text().splitlines()]
        out[str(r)] = [float(x["score"]) for x in rows]
    return out


def one_run(study: Study, out: Path, run: dict, policy: str, splits: dict) -> dict:
    from preftune.iterate.loop import iterate

    arm, seed, split = run["arm"], run["seed"], run["split"]
    run_dir = out / "runs" / run["id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config(
        study, arm, policy, out, run_dir, seed, run["nll"], run["temperature"], split, run.get("rounds")
    )
    _seed_round0(out, split, run_dir / "iterate")
    print(f"run {run['id']} (pid {os.getpid()})", flush=True)
    started = time.perf_counter()
    result = iterate(cfg)
    _share_round0(out, split, run_dir / "iterate")
    import torch

    record = {
        "kind": run["kind"],
        "run": run["id"],
        "arm": arm.name,
        "method": arm.method,
        "reference": arm.reference,
        "seed": seed,
        "sft_weight": run["nll"] if arm.nll else None,
        "temperature": run["temperature"],
        "split": split,
        "split_rows": splits[split],
        "exact_match": per_round_scores(result.output_dir, cfg["rounds"]["count"]),
        "rounds": result.rounds,
        "seconds": round(time.perf_counter() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**method_comparison.machine(), "torch_threads": torch.get_num_threads()},
        "quick": study.quick,
    }
    with method_comparison._locked(out / ".results.lock"), open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    (run_dir / "done.json").write_text(json.dumps(record))
    for model_dir in list(result.output_dir.glob("round-*/train")) + [result.output_dir / "final"]:
        shutil.rmtree(model_dir, ignore_errors=True)  # models and checkpoints: ~0.5 GB a round at full size
    return record


# -- selection and the plan -------------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    return (
        [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        if Path(path).exists()
        else []
    )


def selected(records: list[dict], study: Study) -> tuple[float, float] | None:
    """(λ, temperature) with the best final-round validation exact match of the sweep arm (ties: the
    smaller λ, then the lower temperature); None until every sweep run has finished."""
    sweep = {(r["sft_weight"], r["temperature"]): r for r in records if r["kind"] == "sweep"}
    grid = [(lam, t) for lam in study.nll_grid for t in study.temperature_grid]
    if any(g not in sweep for g in grid):
        return None
    final = str(study.sweep_rounds)

    def score(g):
        em = sweep[g]["exact_match"][final]
        return sum(em) / len(em)

    return max(grid, key=lambda g: (score(g), -g[0], -g[1]))


def plan(study: Study, arms: tuple[Arm, ...], records: list[dict]) -> list[dict]:
    """The sweep (validation, the first seed), then every arm x seed once the sweep has chosen."""
    sweep_arm = next(a for a in ARMS if a.name == SWEEP_ARM)
    seed0 = study.seeds[0]
    runs = [
        {
            "kind": "sweep",
            "arm": sweep_arm,
            "seed": seed0,
            "nll": lam,
            "temperature": t,
            "split": "validation",
            "id": f"sweep-{SWEEP_ARM}-s{seed0}-nll{lam:g}-t{t:g}",
        }
        for lam in study.nll_grid
        for t in study.temperature_grid
    ]
    chosen = selected(records, study)
    if chosen is None:
        return runs
    lam, t = chosen
    for seed in study.seeds:
        for arm in arms:
            runs.append(
                {
                    "kind": "main",
                    "arm": arm,
                    "seed": seed,
                    "nll": lam,
                    "temperature": t,
                    "split": "test",
                    "id": f"main-{arm.name}-s{seed}",
                }
            )
    if any(a.name == DEMO_CHECK_ARM for a in arms):
        # fixed before any main run finished: the demo's question is asked on validation only
        runs.append(
            {
                "kind": "demo_check",
                "arm": next(a for a in ARMS if a.name == DEMO_CHECK_ARM),
                "seed": seed0,
                "nll": lam,
                "temperature": t,
                "split": "validation",
                "rounds": study.rounds,
                "id": f"demo-check-{DEMO_CHECK_ARM}-s{seed0}",
            }
        )
    return runs


def run_study(
    quick: bool = False,
    out: str | Path | None = None,
    arms: list[str] | None = None,
    max_runs: int | None = None,
    threads: int | None = None,
    study: Study | None = None,
    poll_s: float = 15.0,
) -> Path:
    study = study or (QUICK if quick else FULL)
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif study.quick:
        torch.set_num_threads(1)
    out = Path(out or HERE / ("results-quick" if study.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(arms or ()) - set(ARM_NAMES)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; valid: {', '.join(ARM_NAMES)}")
    chosen_arms = tuple(a for a in ARMS if arms is None or a.name in arms)
    with method_comparison._locked(out / ".setup.lock"):
        splits = write_splits(study, out / "data")
        policy = resolve_policy(study, out)
        (out / "study.json").write_text(
            json.dumps({"study": study.__dict__, "arms": [a.__dict__ for a in ARMS]}, default=str)
        )
    done_now = 0
    while True:
        busy = progressed = False
        runs = plan(study, chosen_arms, load(out / "results.jsonl"))
        for run in runs:
            run_dir = out / "runs" / run["id"]
            if (run_dir / "done.json").exists():
                continue
            if max_runs is not None and done_now >= max_runs:
                write_results(out, study)
                return out
            with method_comparison._locked(out / "runs" / f"{run['id']}.claim", blocking=False) as mine:
                if not mine:
                    busy = True
                    continue
                if (run_dir / "done.json").exists():
                    continue
                one_run(study, out, run, policy, splits)
            done_now += 1
            progressed = True
            write_results(out, study)
            break  # the plan may have grown (the sweep chose): look again
        else:
            if not busy:
                break
            if not progressed:
                time.sleep(poll_s)
            continue
    write_results(out, study)
    return out


# -- results ----------------------------------------------------------------------------------------------


def _matrix(records: list[dict], round_key: str, seeds) -> np.ndarray:  # noqa: F821
    import numpy as np

    by_seed = {r["seed"]: r["exact_match"][round_key] for r in records}
    return np.array([by_seed[s] for s in seeds], dtype=float)


def _ci(matrix, n_boot: int) -> str:
    lo, hi = method_comparison.analysis.bootstrap_ci(matrix, n_boot)
    return f"{matrix.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def _verdict(lo: float, hi: float) -> str:
    return "holds (CI above 0)" if lo > 0 else "does not hold (CI below 0)" if hi < 0 else "inconclusive"


def reference_rows(test_rows: int) -> dict[str, dict]:
    """The untrained model and the offline DPO + SFT arm of experiments/method_comparison (scarce
    regime), per test problem and seed, when its results are present and on the same test rows."""
    out: dict[str, dict] = {}
    initial = COMPARISON / "initial" / "test-generation.json"
    if initial.exists():
        d = json.loads(initial.read_text())
        if d["rows"][:test_rows] == list(range(test_rows)):
            out["untrained (method comparison)"] = {0: d["exact_match"][:test_rows]}
    rows = [
        r
        for r in load(COMPARISON / "results.jsonl")
        if r.get("arm") == "dpo_sft" and r.get("kind") == "main" and r.get("regime") == "scarce"
    ]
    if rows and all(r["split_rows"][:test_rows] == list(range(test_rows)) for r in rows):
        out["offline DPO + 3·SFT, 64 pairs (method comparison)"] = {
            r["seed"]: r["per_row"]["exact_match"][:test_rows] for r in rows
        }
    return out


def demo_arm_validation(rows: list[int]) -> list[float] | None:
    """The validation exact match per problem of `preftune demo`'s arm (offline DPO + 3·NLL, the
    method comparison's λ sweep, seed 0), when it was measured on the same validation problems."""
    from preftune.demo import DEMO_SFT_WEIGHT

    for r in load(COMPARISON / "results.jsonl"):
        if (
            r.get("kind") == "sweep"
            and r.get("arm") == "dpo_sft"
            and r.get("sft_weight") == DEMO_SFT_WEIGHT
            and r.get("split") == "validation"
            and r["per_row"]["rows"] == rows
        ):
            return [float(x) for x in r["per_row"]["exact_match"]]
    return None


def demo_check_lines(records: list[dict], study: Study) -> list[str]:
    """The demo's question on validation: does the on-policy twin of its arm beat it?"""
    import numpy as np

    check = next((r for r in records if r["kind"] == "demo_check"), None)
    if check is None:
        return []
    final = str(study.rounds)
    mine = check["exact_match"][final]
    per_round = ", ".join(
        f"{sum(v) / len(v):.3f}" for _, v in sorted(check["exact_match"].items(), key=lambda kv: int(kv[0]))
    )
    lines = [
        "",
        "## Demo check (validation only)",
        "",
        f"`{check['arm']}`, seed {check['seed']}, λ = {check['sft_weight']:g}, temperature {check['temperature']:g}, "
        f"{study.rounds} rounds on the {len(mine)} validation problems: rounds 0–{study.rounds}: {per_round}.",
    ]
    from preftune.demo import DEMO_SFT_WEIGHT

    demo = demo_arm_validation(check["split_rows"])
    if demo is None or study.quick:
        return lines + ["", "The demo arm's validation answers are not available here: no comparison."]
    d = np.array(mine, dtype=float) - np.array(demo, dtype=float)
    lo, hi = method_comparison.analysis.bootstrap_ci(d[None, :], study.bootstrap)
    beats = sum(mine) > sum(demo)
    lines += [
        f"`preftune demo`'s arm (offline DPO + {DEMO_SFT_WEIGHT:g}·NLL, 64 pairs, seed 0): {sum(demo) / len(demo):.3f}. "
        f"Paired difference {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] ({_verdict(lo, hi)}).",
        "",
        "The iterative arm scores higher on validation: the demo should gain a way to show it."
        if beats
        else "The iterative arm does not score higher on validation: the demo keeps its arm.",
    ]
    return lines


def write_results(out: Path, study: Study) -> Path:
    import numpy as np

    with method_comparison._locked(out / ".results.lock"):
        records = load(out / "results.jsonl")
    main = [r for r in records if r["kind"] == "main"]
    sweep = [r for r in records if r["kind"] == "sweep"]
    final = str(study.rounds)
    swept = str(study.sweep_rounds)
    lines = [
        "# Iterative (on-policy) preference optimization on the bundled arithmetic problems",
        "",
        f"SmolLM2-135M-Instruct{' (tiny random model: --quick)' if study.quick else ''}, LoRA r={study.lora['r']}, "
        f"{study.rounds} rounds of {study.prompts_per_round} fresh prompts x k={study.k} samples, "
        f"{'a regex' if study.quick else 'the numeric'} verifier, "
        f"best-vs-worst pairs, β={study.beta}, lr {study.learning_rate:g}, batch {study.batch_size}, one epoch per round; "
        f"seeds {', '.join(map(str, study.seeds))}; greedy exact match on {study.test_rows} held-out test problems "
        "(the method comparison's), 95% bootstrap CIs over problems and seeds. Generated by run.py.",
        "",
        "## Selection on the validation split",
        "",
        f"Arm `{SWEEP_ARM}`, seed {study.seeds[0]}, validation exact match after round {study.sweep_rounds} "
        "(each setting runs that many rounds, within the wall-time budget):",
        "",
        "| λ (NLL) | temperature | validation exact match |",
        "|---|---|---|",
    ]
    for r in sorted(sweep, key=lambda r: (r["sft_weight"], r["temperature"])):
        em = r["exact_match"][swept]
        lines.append(f"| {r['sft_weight']:g} | {r['temperature']:g} | {sum(em) / len(em):.3f} |")
    chosen = selected(records, study)
    lines += [
        "",
        f"Chosen: λ = {chosen[0]:g}, temperature = {chosen[1]:g}." if chosen else "Sweep not finished.",
        "",
    ]
    arms_done = {}
    for a in ARMS:
        mine = [r for r in main if r["arm"] == a.name]
        if {r["seed"] for r in mine} >= set(study.seeds):
            arms_done[a.name] = [r for r in mine if r["seed"] in study.seeds]
    header = ["arm", *[f"round {r}" for r in range(study.rounds + 1)]]
    lines += [
        "## Greedy exact match per round (test)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, recs in arms_done.items():
        cells = [_ci(_matrix(recs, str(r), study.seeds), study.bootstrap) for r in range(study.rounds + 1)]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    missing = [a.name for a in ARMS if a.name not in arms_done]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    refs = reference_rows(study.test_rows)
    if refs and not study.quick:
        lines += ["", "Reference rows (experiments/method_comparison, same test problems):", ""]
        for label, by_seed in refs.items():
            m = np.array(list(by_seed.values()), dtype=float)
            lines.append(f"* {label}: {_ci(m, study.bootstrap)} (seeds {', '.join(map(str, by_seed))})")
    # paired differences at the final round
    lines += ["", f"## Paired differences after round {study.rounds} (same problems and seeds)", ""]
    lines += ["| comparison | difference [95% CI] | reading |", "|---|---|---|"]
    comparisons = [(a, "rs_sft") for a in arms_done if a != "rs_sft"]
    comparisons += [(a, "dpo") for a in ("mrpo_both", "rpo", "mallows_theta", "dpo_nll") if a in arms_done]
    for a, b in comparisons:
        if b not in arms_done:
            continue
        d = _matrix(arms_done[a], final, study.seeds) - _matrix(arms_done[b], final, study.seeds)
        lo, hi = method_comparison.analysis.bootstrap_ci(d, study.bootstrap)
        lines.append(f"| `{a}` − `{b}` | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {_verdict(lo, hi)} |")
    offline = refs.get("offline DPO + 3·SFT, 64 pairs (method comparison)")
    if offline and not study.quick:
        shared = [s for s in study.seeds if s in offline]
        for a in arms_done:
            if not shared:
                break
            mine = _matrix(arms_done[a], final, shared)
            d = mine - np.array([offline[s] for s in shared], dtype=float)
            lo, hi = method_comparison.analysis.bootstrap_ci(d, study.bootstrap)
            lines.append(
                f"| `{a}` − offline DPO+3·SFT (seeds {shared}) | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {_verdict(lo, hi)} |"
            )
    lines += demo_check_lines(records, study)
    # cost
    hours = method_comparison.analysis.wall_hours(records) if records else 0.0
    total = sum(r["seconds"] for r in records) / 3600
    machines = sorted({f"{r['machine']['host']} ({r['machine']['cpus']} CPUs)" for r in records})
    lines += [
        "",
        "## Cost",
        "",
        f"{len(records)} runs, {hours:.2f} h of wall time (union of the runs' intervals), {total:.2f} h summed; "
        f"machine(s): {', '.join(machines) or '—'}.",
        "",
        "## Reading",
        "",
        "Filled in by hand once the runs have landed (the table above is regenerated after every run).",
        "",
        "![exact match per round](curves.png)",
        "",
    ]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    _plot(out, study, arms_done)
    return path


def _plot(out: Path, study: Study, arms_done: dict) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(study.rounds + 1))
    for name, recs in arms_done.items():
        means, los, his = [], [], []
        for r in xs:
            m = _matrix(recs, str(r), study.seeds)
            lo, hi = method_comparison.analysis.bootstrap_ci(m, study.bootstrap)
            means.append(m.mean())
            los.append(lo)
            his.append(hi)
        ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, los, his, alpha=0.12)
    ax.set_xlabel("round (0 = untrained)")
    ax.set_ylabel("greedy exact match (test)")
    ax.set_xticks(xs)
    ax.grid(True, alpha=0.3)
    if arms_done:
        ax.legend(fontsize=8)
    fig.savefig(out / "curves.png")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model, a handful of prompts")
    parser.add_argument("--out", help="results directory (default: results/ or results-quick/ here)")
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ARM_NAMES)}")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs (per process)")
    parser.add_argument("--workers", type=int, default=1, help="processes side by side (CPUs/N threads each)")
    parser.add_argument("--threads", type=int, help="torch threads of this process")
    parser.add_argument(
        "--results-only", action="store_true", help="rewrite RESULTS.md from --out; train nothing"
    )
    args = parser.parse_args(argv)
    study = QUICK if args.quick else FULL
    if args.results_only:
        print(write_results(Path(args.out or HERE / "results"), study))
        return 0
    if args.workers > 1:
        rest = [
            a
            for i, a in enumerate(argv)
            if not a.startswith("--workers") and not (i and argv[i - 1] == "--workers")
        ]
        return method_comparison._launch_workers(rest, args.workers, script=__file__)
    arms = [a for a in args.arms.split(",") if a] if args.arms else None
    out = run_study(args.quick, args.out, arms, args.max_runs, threads=args.threads)
    print(f"results: {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
