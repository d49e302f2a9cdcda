"""Selection on the validation split, bootstrap CIs, paired differences and RESULTS.md for the study.

Everything is computed from ``results.jsonl`` (one line per finished run), so RESULTS.md can be
regenerated at any time from whatever runs exist: ``python analysis.py RESULTS_DIR``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = (
    ("exact_match", "exact match"),
    ("reached_answer", "reached an answer"),
    ("preference_accuracy", "pref. acc. (vs initial)"),
    ("likelihood_accuracy", "likelihood acc."),
    ("divergence", "divergence (log-ratio)"),
)
DIFF_METRICS = ("exact_match", "preference_accuracy")


def load(path: Path) -> list[dict]:
    """The records of results.jsonl (a half-written last line, from an interrupted run, is ignored)."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass(frozen=True)
class Sweep:
    """One value chosen per arm on the validation split: swept over ``Study.<grid>`` for the arms
    with ``Arm.<flag>``, recorded as ``<key>``, chosen by the best mean ``metric``."""

    key: str
    metric: str
    grid: str
    flag: str
    symbol: str
    title: str
    what: str


EPS = Sweep(
    "eps",
    "preference_accuracy",
    "eps_grid",
    "sweep_eps",
    "ε",
    "ε chosen on the validation split",
    "validation preference accuracy against the initial policy",
)
SFT = Sweep(
    "sft_weight",
    "exact_match",  # the demo's question: does training make the model answer better?
    "sft_grid",
    "sweep_sft",
    "λ",
    "λ of the SFT term chosen on the validation split",
    "validation greedy exact match",
)


def selected_eps(path: Path, arm: str, grid) -> float | None:
    """The ε of ``arm`` with the best validation preference accuracy (ties: the smaller ε); None until
    every ε of the grid has a finished sweep run. Reads only sweep records (validation split)."""
    return _selected(load(path), arm, grid, EPS)


def selected_sft(path: Path, arm: str, grid) -> float | None:
    """The λ of the SFT term with the best validation greedy exact match (ties: the smaller λ, the
    closer to the preference loss alone); None until every λ of the grid has a finished sweep run."""
    return _selected(load(path), arm, grid, SFT)


def current(records: list[dict], arms, study) -> list[dict]:
    """The records without the main runs of a swept arm measured at a value its sweep no longer
    selects (a grid that grew can select another): those runs stay on disk and in results.jsonl, and
    count in the time spent, but leave the tables, the claims and the plots."""
    chosen = {
        (arm.name, sweep.key): _selected(records, arm.name, getattr(study, sweep.grid), sweep)
        for arm in arms
        for sweep in (EPS, SFT)
        if getattr(arm, sweep.flag)
    }
    return [
        r
        for r in records
        if r["kind"] != "main"
        or all(r.get(key) == value for (name, key), value in chosen.items() if name == r["arm"])
    ]


def sweep_scores(records: list[dict], arm: str, key: str, metric: str) -> dict[float, float]:
    """Validation ``metric`` of each finished sweep run of ``arm``, by the swept value ``key``."""
    sweep = [r for r in records if r["kind"] == "sweep" and r["arm"] == arm and r.get(key) is not None]
    assert all(r["split"] == "validation" for r in sweep)
    return {r[key]: float(np.mean(r["per_row"][metric])) for r in sweep}


def _selected(records: list[dict], arm: str, grid, sweep: Sweep) -> float | None:
    score = sweep_scores(records, arm, sweep.key, sweep.metric)
    if any(v not in score for v in grid):
        return None
    return max(sorted(grid), key=lambda v: score[v])


def bootstrap_ci(
    matrix: np.ndarray, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the mean of ``matrix`` [seeds, problems], resampling seeds and problems."""
    s, p = matrix.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, s, (n, s))
    cols = rng.integers(0, p, (n, p))
    means = matrix[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _matrix(records: list[dict], metric: str) -> tuple[np.ndarray, list[int], list[int]]:
    """[seeds, problems] of one arm and regime, columns in row-id order (the same rows for every arm)."""
    records = sorted(records, key=lambda r: r["seed"])
    rows = records[0]["per_row"]["rows"]
    for r in records:
        if r["per_row"]["rows"] != rows:
            raise ValueError(f"{r['run']} was measured on other rows than {records[0]['run']}")
    return np.array([r["per_row"][metric] for r in records], dtype=float), [r["seed"] for r in records], rows


def summarise(records: list[dict], n_boot: int, initial: dict | None = None) -> dict:
    """Per (regime, arm): point estimates and CIs; paired differences against DPO on shared seeds,
    and (``initial``: the untrained policy's per-row answers) against the untrained policy."""
    groups = _groups(records)
    out: dict = {}
    for (regime, arm), recs in groups.items():
        entry = {
            "seeds": sorted(r["seed"] for r in recs),
            "eps": recs[0]["eps"],
            "sft_weight": recs[0].get("sft_weight"),
            "metrics": {},
            "diff": {},
        }
        for metric, _ in METRICS:
            if metric not in recs[0]["per_row"]:
                continue
            m, _, rows = _matrix(recs, metric)
            entry["metrics"][metric] = (float(m.mean()), *bootstrap_ci(m, n_boot))
            entry["rows"] = rows
        train = [r["train"] for r in recs]
        for key in ("clip_fraction", "alpha_0", "alpha_1", "alpha_2"):
            vals = [t[key] for t in train if key in t]
            if vals:
                entry[key] = float(np.mean(vals))
        entry["seconds"] = float(np.sum([r["seconds"] for r in recs]))
        out[regime, arm] = entry
    for (regime, arm), entry in out.items():
        entry["vs_initial"] = {}
        recs = groups[regime, arm]
        if initial is None or "exact_match" not in recs[0]["per_row"]:
            continue
        if recs[0]["per_row"]["rows"] != initial["rows"]:
            raise ValueError(f"{recs[0]['run']} was measured on other rows than the untrained policy")
        for metric in ("exact_match", "reached_answer"):
            m, _, _ = _matrix(recs, metric)
            d = m - np.asarray(initial[metric], dtype=float)[None]  # paired per problem, every seed
            entry["vs_initial"][metric] = (float(d.mean()), *bootstrap_ci(d, n_boot))
    for (regime, arm), entry in out.items():
        if arm == "dpo":
            continue
        for metric in DIFF_METRICS:
            d = paired_difference(groups, regime, arm, "dpo", metric, n_boot)
            if d is not None:
                entry["diff"][metric] = d
    return out


def paired_difference(
    groups: dict[tuple[str, str], list[dict]], regime: str, arm: str, base: str, metric: str, n_boot: int
) -> tuple[float, float, float] | None:
    """Mean and CI of ``arm`` − ``base`` in ``metric``, paired per seed and problem on their shared
    seeds; None if either was not run or has no such metric."""
    mine, theirs = groups.get((regime, arm)), groups.get((regime, base))
    if not mine or not theirs or metric not in mine[0]["per_row"] or metric not in theirs[0]["per_row"]:
        return None
    shared = sorted({r["seed"] for r in mine} & {r["seed"] for r in theirs})
    if not shared:
        return None
    a, _, _ = _matrix([r for r in mine if r["seed"] in shared], metric)
    b, _, _ = _matrix([r for r in theirs if r["seed"] in shared], metric)
    d = a - b
    return float(d.mean()), *bootstrap_ci(d, n_boot)


def _groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The main runs by (regime, arm)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["kind"] == "main":
            groups.setdefault((r["regime"], r["arm"]), []).append(r)
    return groups


def _knob(entry: dict) -> str:
    """The swept value of a table row: ε for MRPO/MDPO arms, λ of the SFT term for DPO+SFT."""
    if entry.get("eps") is not None:
        return f"{entry['eps']:g}"
    return "—" if entry.get("sft_weight") is None else f"λ={entry['sft_weight']:g}"


def _sweep_table(sweep: Sweep, arms, records: list[dict], study) -> list[str]:
    """Validation ``sweep.metric`` per swept value and the chosen one (ties: the smaller value)."""
    names = [a.name for a in arms if getattr(a, sweep.flag)]
    if not names:
        return []
    grid = getattr(study, sweep.grid)
    lines = [
        f"## {sweep.title}",
        "",
        "| arm | " + " | ".join(f"{sweep.symbol}={v:g}" for v in grid) + " | chosen |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    for name in names:
        score = sweep_scores(records, name, sweep.key, sweep.metric)
        chosen = _selected(records, name, grid, sweep)
        cells = [f"{score[v]:.3f}" if v in score else "missing" for v in grid]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if chosen is None else f'{chosen:g}'} |")
    return lines + ["", f"({sweep.what}; the test split is never read here)", ""]


def _ci(v) -> str:
    return "—" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _diff(v) -> str:
    return "—" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def verdict(diff) -> str:
    if diff is None:
        return "not run yet"
    _, lo, hi = diff
    if lo == hi == 0:
        return "no difference (the same result on every problem)"
    return (
        "holds (CI above 0)"
        if lo > 0
        else "does not hold (CI below 0)"
        if hi < 0
        else "inconclusive (CI spans 0)"
    )


def write_plots(
    summary: dict, regimes: list[str], arms: list[str], out: Path, untrained: float | None = None
) -> list[str]:
    """The accuracy-vs-divergence scatter and per-regime bars; ``untrained``: the untrained policy's
    exact match, drawn as a dashed line (at divergence 0 by definition)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for regime, marker in zip(regimes, "os^"):
        for arm in arms:
            e = summary.get((regime, arm))
            if not e or "divergence" not in e["metrics"]:
                continue
            y = e["metrics"].get("exact_match", e["metrics"]["preference_accuracy"])[0]
            ax.scatter(e["metrics"]["divergence"][0], y, marker=marker)
            ax.annotate(f"{arm} ({regime})", (e["metrics"]["divergence"][0], y), fontsize=7)
    if untrained is not None:
        ax.axhline(untrained, ls="--", color="grey", lw=1)
        ax.scatter(0.0, untrained, marker="*", s=120, color="black", zorder=3)
        ax.annotate("untrained", (0.0, untrained), fontsize=8, xytext=(4, -12), textcoords="offset points")
    ax.set_xlabel("divergence from the initial policy (mean log-ratio, held-out chosen)")
    ax.set_ylabel("greedy exact match (held-out)")
    ax.set_title("accuracy vs divergence per arm")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_divergence.png", dpi=110)
    plt.close(fig)
    files.append("accuracy_vs_divergence.png")
    for regime in regimes:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric in zip(axes, ("exact_match", "preference_accuracy")):
            names, mids, errs = [], [], [[], []]
            for arm in arms:
                v = summary.get((regime, arm), {}).get("metrics", {}).get(metric)
                if v is None:
                    continue
                names.append(arm)
                mids.append(v[0])
                errs[0].append(v[0] - v[1])
                errs[1].append(v[2] - v[0])
            ax.bar(range(len(names)), mids, yerr=errs, capsize=3)
            if metric == "exact_match" and untrained is not None:
                ax.axhline(untrained, ls="--", color="grey", lw=1, label="untrained")
                ax.legend(fontsize=7, loc="upper left")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{regime}: {metric} (95% CI)")
        fig.tight_layout()
        fig.savefig(out / f"bars_{regime}.png", dpi=110)
        plt.close(fig)
        files.append(f"bars_{regime}.png")
    return files


def _in_both_regimes(claim: str, arm: str, metric: str = "exact_match", base: str = "dpo") -> tuple:
    """A claim as rows (claim, regime, arm, metric, baseline), read in the scarce and larger regimes."""
    return ((claim, "scarce", arm, metric, base), (f"{claim}, more data", "larger", arm, metric, base))


# read from the paired difference arm − baseline
CLAIMS = (
    *_in_both_regimes("MRPO (adaptive) beats DPO (paper)", "mrpo_adaptive"),
    *_in_both_regimes("RPO beats DPO (paper)", "rpo"),
    *_in_both_regimes("MallowsPO-θ beats DPO (paper)", "mallows_theta"),
    *_in_both_regimes("MallowsPO-ϕ beats DPO (paper)", "mallows_phi"),
    *_in_both_regimes("validation-weighted MRPO (2 refs) beats DPO (follow-up)", "mrpo_val2"),
    *_in_both_regimes("validation-weighted MRPO (3 refs) beats DPO (follow-up)", "mrpo_val3"),
    *_in_both_regimes(
        "DPO with the domain reference beats DPO (follow-up: the right reference)", "dpo_domain"
    ),
    *_in_both_regimes("an SFT term (λ from validation) beats DPO alone", "dpo_sft"),
    *_in_both_regimes("DPO+SFT beats SFT alone in exact match", "dpo_sft", base="sft"),
    *_in_both_regimes(
        "DPO+SFT beats SFT alone in preference accuracy", "dpo_sft", "preference_accuracy", "sft"
    ),
)


def _epoch(stamp: str) -> float:
    import calendar

    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))


def wall_hours(records: list[dict], pauses: list[tuple[float, float]] = ()) -> float:
    """Hours during which at least one run was running: the union of the runs' [start, end]
    intervals (parallel workers overlap; the gaps between sessions do not count), minus the
    ``pauses`` (epoch-second intervals when the study was stopped for other work)."""
    spans = sorted(
        (_epoch(r["finished"]) - r["seconds"], _epoch(r["finished"])) for r in records if "finished" in r
    )
    union: list[list[float]] = []
    for a, b in spans:
        if union and a <= union[-1][1]:
            union[-1][1] = max(union[-1][1], b)
        else:
            union.append([a, b])
    busy = sum(b - a for a, b in union)
    for pa, pb in pauses:  # a pause counts only where it overlaps running time
        busy -= sum(max(0.0, min(b, pb) - max(a, pa)) for a, b in union)
    return busy / 3600


def load_pauses(path: Path) -> list[tuple[float, float]]:
    """``pauses.jsonl``: one {"start": ISO, "end": ISO, "why": ...} line per time the study was stopped."""
    if not Path(path).exists():
        return []
    return [
        (_epoch(r["start"]), _epoch(r["end"]))
        for r in (json.loads(x) for x in Path(path).read_text().splitlines() if x.strip())
    ]


def initial_row(out: Path, n_boot: int) -> str | None:
    """The table row of the untrained policy on the same test problems (``initial/``), if measured."""
    gen, logps = out / "initial" / "test-generation.json", out / "initial" / "test.json"
    if not gen.exists():
        return None
    per_row = json.loads(gen.read_text())
    cells = {}
    for metric in ("exact_match", "reached_answer"):
        m = np.asarray([per_row[metric]], dtype=float)
        cells[metric] = (float(m.mean()), *bootstrap_ci(m, n_boot))
    if logps.exists():
        saved = json.loads(logps.read_text())
        m = (np.asarray(saved["chosen"]) > np.asarray(saved["rejected"])).astype(float)[None]
        cells["likelihood_accuracy"] = (float(m.mean()), *bootstrap_ci(m, n_boot))
    values = {"preference_accuracy": "0.5 (ties)", "divergence": "0"}
    row = [
        "*initial policy, untrained*",
        "—",
        "—",
        *[values.get(m) or _ci(cells.get(m)) for m, _ in METRICS],
        "—",
        "—",
        "—",
        "—",
        "—",
    ]
    return "| " + " | ".join(row) + " |"


def write_results(out: Path, arms, study) -> Path:
    """RESULTS.md (table, selection, claims, plots) from whatever results exist; missing arms marked."""
    out = Path(out)
    every = load(out / "results.jsonl")  # the time spent counts every run
    records = current(every, arms, study)
    initial_path = out / "initial" / "test-generation.json"
    initial = json.loads(initial_path.read_text()) if initial_path.exists() else None
    summary = summarise(records, study.bootstrap, initial)
    regimes = list(study.regimes)
    names = [a.name for a in arms]
    lines = [
        "# Method comparison: results",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {len(every)} finished runs "
        f"in `results.jsonl`{' (QUICK smoke run: tiny random models, numbers mean nothing)' if study.quick else ''}.",
        "",
    ]
    machines = sorted({(r["machine"]["host"], r["machine"]["cpus"]) for r in every})
    pauses = load_pauses(out / "pauses.jsonl")
    total = sum(r["seconds"] for r in every)
    lines += [
        f"Machine(s): {', '.join(f'{h} ({c} CPUs)' for h, c in machines) or '—'}; summed run time "
        f"{total / 3600:.2f} h; wall time {wall_hours(every, pauses):.2f} h (time during which a run was "
        f"running, parallel workers overlapping; {len(pauses)} pause(s) for other work excluded: pauses.jsonl). Command: `python experiments/method_comparison/run.py"
        f"{' --quick' if study.quick else ''}`.",
        "",
        "Held-out metrics on the same test problems for every arm (mean over seeds and problems, 95% "
        "bootstrap CI over problems and seeds); Δ = paired difference against DPO (same seeds, same "
        "problems). Preference accuracy uses the *initial policy* as the yardstick for every arm.",
        "",
    ]
    before = initial_row(out, study.bootstrap)  # the same untrained row heads every regime's table
    for regime in regimes:
        lines += [
            f"## {regime} ({study.regimes[regime]} training pairs, seeds {list(study.seeds[regime])})",
            "",
            "| arm | seeds | ε or λ | "
            + " | ".join(label for _, label in METRICS)
            + " | Δ exact match vs untrained | Δ exact match vs DPO | Δ pref. acc. vs DPO | clip fraction"
            " | mean weights |",
            "|" + "---|" * (len(METRICS) + 8),
        ]
        if before:
            lines.append(before)
        for name in names:
            e = summary.get((regime, name))
            if e is None:
                lines.append(f"| {name} | **missing (not run yet)** |" + " |" * (len(METRICS) + 6))
                continue
            weights = [e[k] for k in ("alpha_0", "alpha_1", "alpha_2") if k in e]
            cells = [
                name,
                ",".join(map(str, e["seeds"])),
                _knob(e),
                *[_ci(e["metrics"].get(m)) for m, _ in METRICS],
                _diff(e.get("vs_initial", {}).get("exact_match")),
                _diff(e["diff"].get("exact_match")),
                _diff(e["diff"].get("preference_accuracy")),
                f"{e['clip_fraction']:.3f}" if "clip_fraction" in e else "—",
                ", ".join(f"{w:.3f}" for w in weights) or "—",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for sweep in (EPS, SFT):
        lines += _sweep_table(sweep, arms, records, study)
    lines += [
        "## Claims (paired Δ against the named baseline: same seeds, same problems)",
        "",
        "| claim | metric | Δ [95% CI] | reading |",
        "|---|---|---|---|",
    ]
    groups = _groups(records)
    for text, regime, arm, metric, base in CLAIMS:
        d = paired_difference(groups, regime, arm, base, metric, study.bootstrap)
        label = dict(METRICS)[metric]
        lines.append(f"| {text} | {label} | {_diff(d)} | {verdict(d)} |")
    lines += [
        "",
        "Against the untrained policy (greedy exact match, paired per problem; the demo's question: does "
        "training make the model answer better?):",
        "",
        "| regime | arm | Δ [95% CI] | reading |",
        "|---|---|---|---|",
    ]
    for regime in regimes:
        for name in names:
            d = summary.get((regime, name), {}).get("vs_initial", {}).get("exact_match")
            if d is not None:
                lines.append(f"| {regime} | {name} | {_diff(d)} | {verdict(d)} |")
    rel = summary.get(("scarce", "mrpo_released"), {}).get("metrics", {}).get("exact_match")
    ada = summary.get(("scarce", "mrpo_adaptive"), {}).get("metrics", {}).get("exact_match")
    lines += [
        "",
        f"Released vs paper pairing (scarce, exact match): adaptive {_ci(ada)}, adaptive_released {_ci(rel)}.",
        "",
    ]
    reading = out / "READING.md"  # the hand-written reading of these numbers, kept across regenerations
    if reading.exists():
        lines += [reading.read_text().rstrip(), ""]
    untrained = float(np.mean(initial["exact_match"])) if initial else None
    plots = write_plots(summary, regimes, names, out, untrained)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    (out / "summary.json").write_text(
        json.dumps({f"{r}/{a}": e for (r, a), e in summary.items()}, indent=1, default=float)
    )
    return path
