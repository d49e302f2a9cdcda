"""Reproduce MallowsPO's synthetic experiments with preftune's losses.

    python -m experiments.mallows_bandit            # full run (a few minutes on 2 CPU cores)
    python -m experiments.mallows_bandit --quick    # reduced run (seconds), what the test runs

Writes results.json and PNG plots into --out (default: experiments/mallows_bandit/results/) and, in
full mode with the default output, regenerates the generated block of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import bandit, estimator, mallows

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- BEGIN GENERATED (run.py) -->", "<!-- END GENERATED -->"

METRICS = ("kl", "utility", "p_top", "p_max", "heldout_acc")
POPULATION_BETA = 1.0
POPULATION_METHODS = ("dpo", "mallows_theta_true", "mallows_phi_true")

# The two optimisers, same for every method. SGD's step is lr / beta so that beta changes the shape
# of the loss, not DPO's initial speed (the DPO gradient is proportional to beta).
OPTIMIZERS = {
    "adam": {"optimizer": "adam", "lr": 0.05},
    "sgd": {"optimizer": "sgd", "lr": 6.0},
}


def mode_settings(quick: bool) -> dict:
    if quick:
        return {
            "seeds": [0, 1],
            "betas": [0.3, 1.0, 3.0],
            "trajectory_betas": [0.3, 1.0],
            "methods": ["dpo", "mallows_theta_true", "mallows_phi_true"],
            "bandit": bandit.BanditConfig(contexts_per_level=3, steps=100, eval_every=10),
            "lr_scale": 3.0,  # a third of the steps at three times the step size
            "estimator": estimator.EstimatorConfig(num_prompts=40, noise_levels=(0.0, 0.25)),
            "estimator_seeds": [0],
            "sampler_rankings": 20000,
        }
    return {
        "seeds": [0, 1, 2],
        "betas": [0.03, 0.1, 0.3, 1.0, 3.0],
        "trajectory_betas": [0.1, 1.0],
        "methods": list(bandit.METHODS),
        "bandit": bandit.BanditConfig(),
        "lr_scale": 1.0,
        "estimator": estimator.EstimatorConfig(),
        "estimator_seeds": [0, 1, 2, 3, 4],
        "sampler_rankings": 100000,
    }


# ----------------------------------------------------------------------------------------------
# Sampler self-check: empirical P(rank i beats rank i+s) against preftune's Mallows link g_phi(s).


def sampler_check(L, phis, n: int, num_rankings: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    worst_z = 0.0
    for phi in phis:
        pos = mallows.sample_positions(n, phi, num_rankings, rng)
        empirical, link = [], []
        for s in range(1, n):
            wins = (pos[:, : n - s] < pos[:, s:]).mean()
            g = float(
                L.mallows_link(
                    torch.tensor(float(s), dtype=torch.float64), torch.tensor(phi, dtype=torch.float64)
                )
            )
            # rankings are independent; the n - s pairs within a ranking are not, so use the
            # per-ranking count as the sample size (conservative)
            se = math.sqrt(max(g * (1 - g), 1e-12) / num_rankings)
            worst_z = max(worst_z, abs(wins - g) / se)
            empirical.append(float(wins))
            link.append(g)
        rows.append({"phi": phi, "empirical": empirical, "link": link})
    max_err = max(abs(e - g) for r in rows for e, g in zip(r["empirical"], r["link"]))
    return {"n": n, "num_rankings": num_rankings, "rows": rows, "max_abs_err": max_err, "max_z": worst_z}


# ----------------------------------------------------------------------------------------------
# Bandit sweep and the matched-KL comparison


def run_bandit(settings: dict, L, log) -> dict:
    base = settings["bandit"]
    methods, betas, seeds = settings["methods"], settings["betas"], settings["seeds"]
    num_levels = len(base.phi_levels)
    out = {
        "phi_levels": list(base.phi_levels),
        "methods": methods,
        "betas": betas,
        "seeds": seeds,
        "runs": {},
    }
    data = {seed: bandit.make_data(base, seed) for seed in seeds}
    disp = {seed: bandit.dispersion_inputs(data[seed], L) for seed in seeds}
    out["bayes_heldout_acc"] = np.mean(
        [bandit.bayes_heldout_accuracy(data[s], num_levels) for s in seeds], axis=0
    ).tolist()
    out["c_by_level"] = {
        name: np.mean(
            [
                [
                    float(disp[s][name][data[s].level[data[s].train["ctx"]] == lv].mean())
                    for lv in range(num_levels)
                ]
                for s in seeds
            ],
            axis=0,
        ).tolist()
        for name in ("c_true", "c_est")
    }
    out["phi_star_auto"] = [disp[s]["phi_star"] for s in seeds]
    for opt_name, opt in OPTIMIZERS.items():
        cfg = replace(base, optimizer=opt["optimizer"], lr=opt["lr"] * settings["lr_scale"])
        out["runs"][opt_name] = {"config": cfg.to_dict(), "methods": {}}
        for method in methods:
            per_beta = {}
            for beta in betas:
                finals, trajs = [], []
                for seed in seeds:
                    r = bandit.train(data[seed], disp[seed], method, beta, cfg, seed, L)
                    finals.append(r["final"])
                    trajs.append(r["trajectory"])
                per_beta[str(beta)] = {"final": finals}
                if beta in settings["trajectory_betas"]:
                    per_beta[str(beta)]["trajectory"] = _mean_trajectory(trajs)
            out["runs"][opt_name]["methods"][method] = per_beta
            log(f"  bandit {opt_name:4s} {method:20s} done")
        out["runs"][opt_name]["matched"] = matched_kl(
            out["runs"][opt_name]["methods"], betas, seeds, num_levels
        )
    return out


def _mean_trajectory(trajs: list[dict]) -> dict:
    res = {"step": trajs[0]["step"]}
    for key in ("p_top", "p_max", "kl", "utility"):
        res[key] = np.mean([t[key] for t in trajs], axis=0).tolist()  # [steps, levels]
    res["kl_total"] = np.mean([t["kl_total"] for t in trajs], axis=0).tolist()
    return res


def matched_kl(runs: dict, betas: list[float], seeds: list[int], num_levels: int) -> dict:
    """Compare methods at equal total KL (mean over contexts of KL(pi || pi_ref)).

    For each method and seed, beta traces a curve of (total KL, metric); each metric is linearly
    interpolated in log KL at target KLs. The targets lie in the range that every method reaches
    (averaged over seeds): at 25 %, 50 % (the headline) and 75 % of it in log scale. A seed whose
    own curve does not reach a target is clamped to its end point and counted in `clamped`.
    """
    ranges = []
    for per_beta in runs.values():
        kl_mean = [np.mean([f["kl_total"] for f in per_beta[str(b)]["final"]]) for b in betas]
        ranges.append((min(kl_mean), max(kl_mean)))
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    result = {"common_kl_range": [float(lo), float(hi)], "targets": []}
    if not lo < hi:
        return result
    for frac in (0.25, 0.5, 0.75):
        target = float(np.exp(np.log(lo) + frac * (np.log(hi) - np.log(lo))))
        entry = {"kl_total": target, "fraction": frac, "methods": {}}
        for method, per_beta in runs.items():
            vals = {m: [] for m in METRICS}
            clamped = 0
            monotone = True
            for si in range(len(seeds)):
                kl = np.array([per_beta[str(b)]["final"][si]["kl_total"] for b in betas])
                order = np.argsort(kl)
                monotone &= bool(np.all(np.diff(kl[np.argsort(betas)]) < 0))
                clamped += int(not kl.min() <= target <= kl.max())
                for m in METRICS:
                    y = np.array([per_beta[str(b)]["final"][si][m] for b in betas])[order]  # [betas, levels]
                    vals[m].append(
                        [
                            float(np.interp(np.log(target), np.log(kl[order]), y[:, lv]))
                            for lv in range(num_levels)
                        ]
                    )
            entry["methods"][method] = {
                **{
                    m: {"mean": np.mean(v, axis=0).tolist(), "std": np.std(v, axis=0).tolist(), "per_seed": v}
                    for m, v in vals.items()
                },
                "clamped": clamped,
                "kl_decreasing_in_beta": monotone,
            }
        result["targets"].append(entry)
    return result


# ----------------------------------------------------------------------------------------------
# Plots and the RESULTS.md table

METHOD_STYLE = {
    "dpo": ("DPO", "black", "o"),
    "mallows_theta_true": ("MallowsPO-θ (true c)", "tab:blue", "s"),
    "mallows_theta_est": ("MallowsPO-θ (estimated c)", "tab:cyan", "D"),
    "mallows_phi_true": ("MallowsPO-ϕ (true φ)", "tab:red", "^"),
    "mallows_phi_est": ("MallowsPO-ϕ (estimated φ)", "tab:orange", "v"),
}
METRIC_LABEL = {
    "kl": "KL(π‖π_ref) at this φ",
    "utility": "expected true utility",
    "p_top": "mass on the true top arm",
    "p_max": "mass on the most likely arm",
    "heldout_acc": "held-out pair accuracy",
}


def make_plots(results: dict, out: Path) -> list[str]:
    from preftune.extras import require

    matplotlib = require("matplotlib", "plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    def log_x(ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter(""))

    files = []
    b = results["bandit"]
    levels = b["phi_levels"]
    for opt_name, opt_runs in b["runs"].items():
        # Frontier: metric per dispersion level against the total KL, beta swept.
        rows = ("utility", "p_top", "p_max", "heldout_acc")
        fig, axes = plt.subplots(
            len(rows), len(levels), figsize=(4.2 * len(levels), 3.0 * len(rows)), squeeze=False
        )
        matched = opt_runs["matched"]["targets"]
        for method, per_beta in opt_runs["methods"].items():
            label, color, marker = METHOD_STYLE[method]
            kl = [np.mean([f["kl_total"] for f in per_beta[str(beta)]["final"]]) for beta in b["betas"]]
            order = np.argsort(kl)
            for r, metric in enumerate(rows):
                for lv in range(len(levels)):
                    y = [
                        np.mean([f[metric][lv] for f in per_beta[str(beta)]["final"]]) for beta in b["betas"]
                    ]
                    axes[r, lv].plot(
                        np.array(kl)[order],
                        np.array(y)[order],
                        marker=marker,
                        color=color,
                        label=label,
                        ms=4,
                        lw=1.3,
                    )
        for r, metric in enumerate(rows):
            for lv, phi in enumerate(levels):
                ax = axes[r, lv]
                log_x(ax)
                if matched:
                    ax.axvline(matched[1]["kl_total"], color="grey", ls=":", lw=1)
                if metric == "heldout_acc":
                    ax.axhline(b["bayes_heldout_acc"][lv], color="grey", ls="--", lw=0.8)
                if r == 0:
                    ax.set_title(f"φ = {phi}")
                if r == len(rows) - 1:
                    ax.set_xlabel("total KL(π‖π_ref), mean over contexts (β swept)")
                if lv == 0:
                    ax.set_ylabel(METRIC_LABEL[metric])
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(
            f"Preference bandit, {opt_name}: metrics against KL as β varies (dotted: headline matched KL; "
            "dashed: Bayes accuracy)",
            fontsize=11,
        )
        fig.tight_layout()
        path = out / f"bandit_frontier_{opt_name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path.name)

        # Training curves at the trajectory betas.
        first = next(iter(opt_runs["methods"].values()))
        betas = [
            str(x) for x in results["settings"]["trajectory_betas"] if "trajectory" in first.get(str(x), {})
        ]
        rows = [(beta, metric) for beta in betas for metric in ("p_top", "p_max")]
        fig, axes = plt.subplots(
            len(rows), len(levels), figsize=(4.2 * len(levels), 2.7 * len(rows)), squeeze=False
        )
        for method, per_beta in opt_runs["methods"].items():
            label, color, _ = METHOD_STYLE[method]
            for r, (beta, metric) in enumerate(rows):
                t = per_beta[beta]["trajectory"]
                y = np.array(t[metric])
                for lv in range(len(levels)):
                    axes[r, lv].plot(t["step"], y[:, lv], color=color, label=label, lw=1.4)
        for r, (beta, metric) in enumerate(rows):
            for lv, phi in enumerate(levels):
                ax = axes[r, lv]
                ax.set_ylim(0, 1)
                ax.axhline(1 / results["settings"]["num_arms"], color="grey", ls=":", lw=0.8)
                if r == 0:
                    ax.set_title(f"φ = {phi}")
                if r == len(rows) - 1:
                    ax.set_xlabel("step")
                if lv == 0:
                    ax.set_ylabel(
                        f"β = {beta}: "
                        + ("mass on top arm" if metric == "p_top" else "mass on likeliest arm")
                    )
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"Training curves, {opt_name} (mean over seeds; dotted: uniform)", fontsize=11)
        fig.tight_layout()
        path = out / f"bandit_training_{opt_name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path.name)

    est = results["estimator"]["per_noise"]
    fig, axes = plt.subplots(1, len(est), figsize=(4.2 * len(est), 3.8), squeeze=False)
    for ax, entry in zip(axes[0], est):
        sc = entry["scatter_seed0"]
        true_c = np.array(sc["true_c"])
        ax.scatter(true_c, sc["c_est_prompt"], s=12, label="prompts")
        grid = np.linspace(0, true_c.max(), 50)
        ax.plot(grid, grid / true_c.mean(), color="grey", ls="--", lw=1, label="−log φ / mean(−log φ)")
        ax.set_title(f"noise {entry['noise']}: Spearman {entry['spearman_prompts']['mean']:.2f} (prompts)")
        ax.set_xlabel("true −log φ(x)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("estimated c(x), φ* auto")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Dispersion estimator: entropy of a tiny reference tied to φ (seed 0)", fontsize=11)
    fig.tight_layout()
    path = out / "dispersion_estimator.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    files.append(path.name)
    return files


def _pm(d: dict, lv: int, fmt: str = "{:.2f}") -> str:
    return (fmt + " ± " + fmt).format(d["mean"][lv], d["std"][lv])


def results_tables(results: dict) -> str:
    b = results["bandit"]
    levels = b["phi_levels"]
    s = results["settings"]
    lines = [
        f"_Generated by `{s['command']}` in {results['runtime_s']:.0f} s "
        f"({results['platform']}); seeds {b['seeds']}, β ∈ {b['betas']}._",
        "",
        "### Sampler check (exact Mallows sampling vs preftune's `mallows_link`)",
        "",
        f"{results['sampler_check']['num_rankings']} rankings of n = {results['sampler_check']['n']} per φ; "
        f"P(rank i beats rank i+s), averaged over i. Largest |empirical − g_φ(s)| = "
        f"{results['sampler_check']['max_abs_err']:.4f} ({results['sampler_check']['max_z']:.1f} standard errors).",
        "",
        "| φ | s=1 | s=2 | s=3 | s=5 | s=9 |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["sampler_check"]["rows"]:
        cells = [
            f"{row['empirical'][k - 1]:.3f} / {row['link'][k - 1]:.3f}"
            for k in (1, 2, 3, 5, 9)
            if k - 1 < len(row["link"])
        ]
        lines.append(f"| {row['phi']} | " + " | ".join(cells) + " |")
    lines += ["", "(empirical / g_φ(s))", ""]

    lines += [
        "### Bandit: dispersion inputs",
        "",
        "| | " + " | ".join(f"φ = {p}" for p in levels) + " |",
        "|---|" + "---|" * len(levels),
        "| c true (−log φ, mean 1) | " + " | ".join(f"{v:.2f}" for v in b["c_by_level"]["c_true"]) + " |",
        "| c estimated (φ* auto) | " + " | ".join(f"{v:.2f}" for v in b["c_by_level"]["c_est"]) + " |",
        "| Bayes held-out accuracy | " + " | ".join(f"{v:.3f}" for v in b["bayes_heldout_acc"]) + " |",
        "",
    ]
    pop = results["population_optimum"]
    lines += [
        f"### Population optimum (infinite data, exact minimiser, β = {pop['beta']}, uniform reference)",
        "",
        "What each objective wants: the policy minimising the expected loss when every arm pair is compared "
        "with the exact Mallows probability. `log π(top)/π(bottom)` is the log-ratio between the best and the worst arm.",
        "",
        "| method | "
        + " | ".join(f"φ = {p}: mass on top / log π(top)/π(bottom) / KL" for p in levels)
        + " |",
        "|---|" + "---|" * len(levels),
    ]
    for method, v in pop["methods"].items():
        lines.append(
            f"| {METHOD_STYLE[method][0]} | "
            + " | ".join(
                f"{v['p_top'][lv]:.3f} / {v['logit_gap_top_bottom'][lv]:.2f} / {v['kl'][lv]:.3f}"
                for lv in range(len(levels))
            )
            + " |"
        )
    phi_rows = pop["methods"].get("mallows_phi_true")
    if phi_rows:
        lines += [
            "",
            "MallowsPO-ϕ expected loss at that optimum vs at the reference (Δ = 0 for every pair): "
            + ", ".join(
                f"φ = {p}: {phi_rows['loss_at_optimum'][lv]:.4f} vs {phi_rows['loss_at_reference'][lv]:.4f}"
                for lv, p in enumerate(levels)
            )
            + ".",
        ]
    lines.append("")

    hi = len(levels) - 1
    lines += [
        f"### Bandit at φ = {levels[hi]} (highest dispersion), at three matched total-KL budgets",
        "",
        "mass on the likeliest arm / mass on the true top arm / utility / KL spent at this φ (means over seeds).",
        "",
    ]
    for opt_name, opt_runs in b["runs"].items():
        targets = opt_runs["matched"]["targets"]
        if not targets:
            continue
        lines.append(f"| {opt_name} | " + " | ".join(f"total KL {t['kl_total']:.2f}" for t in targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        for method in targets[0]["methods"]:
            cells = []
            for t in targets:
                v = t["methods"][method]
                cells.append(
                    f"{v['p_max']['mean'][hi]:.2f} / {v['p_top']['mean'][hi]:.2f} / {v['utility']['mean'][hi]:.3f} / {v['kl']['mean'][hi]:.2f}"
                )
            lines.append(f"| {METHOD_STYLE[method][0]} | " + " | ".join(cells) + " |")
        lines.append("")

    for opt_name, opt_runs in b["runs"].items():
        cfg = opt_runs["config"]
        m = opt_runs["matched"]
        lines.append(
            f"### Bandit, {opt_name} (lr {cfg['lr']}{' / β' if opt_name == 'sgd' else ''}, {cfg['steps']} steps, "
            f"batch {cfg['batch_size']}): all methods at equal total KL"
        )
        lines.append("")
        if not m["targets"]:
            lines += [f"No common KL range (ranges do not overlap: {m['common_kl_range']}).", ""]
            continue
        t = m["targets"][1]
        lines.append(
            f"Matched at total KL = {t['kl_total']:.3f} nats (middle of the range every method reaches, "
            f"{m['common_kl_range'][0]:.3f}–{m['common_kl_range'][1]:.3f}); mean ± std over seeds."
        )
        lines.append("")
        lines.append(
            "| method | φ | KL at φ | utility | mass on top arm | mass on likeliest arm | held-out acc |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for method, v in t["methods"].items():
            for lv, phi in enumerate(levels):
                name = METHOD_STYLE[method][0] if lv == 0 else ""
                lines.append(
                    f"| {name} | {phi} | {_pm(v['kl'], lv)} | {_pm(v['utility'], lv, '{:.3f}')} | {_pm(v['p_top'], lv)} | "
                    f"{_pm(v['p_max'], lv)} | {_pm(v['heldout_acc'], lv, '{:.3f}')} |"
                )
        notes = [
            f"{METHOD_STYLE[k][0]}: {v['clamped']} seed(s) clamped"
            for k, v in t["methods"].items()
            if v["clamped"]
        ]
        if notes:
            lines += ["", "Interpolation notes: " + "; ".join(notes) + "."]
        lines.append("")

    lines += [
        "### Dispersion estimator",
        "",
        f"{results['estimator']['config']['num_prompts']} prompts with φ ~ U{tuple(results['estimator']['config']['phi_range'])}, "
        f"entropy tie h = φ^(1/{results['estimator']['config']['kappa']}) × exp(noise · N(0,1)); "
        f"seeds {results['estimator']['seeds']} (mean ± std).",
        "",
        "| noise | Spearman (pairs) | Spearman (prompts) | φ* auto | mean c (auto) | slope vs normalised −log φ | mean c with φ* = 0.29 |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in results["estimator"]["per_noise"]:
        lines.append(
            f"| {e['noise']} | {e['spearman_pairs']['mean']:.3f} ± {e['spearman_pairs']['std']:.3f} | "
            f"{e['spearman_prompts']['mean']:.3f} ± {e['spearman_prompts']['std']:.3f} | {e['phi_star_auto']['mean']:.2f} | "
            f"{e['mean_c_auto']['mean']:.3f} | {e['slope_vs_normalised_true_c']['mean']:.2f} | "
            f"{e['mean_c_paper_phi_star']['mean']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


def update_results_md(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"# MallowsPO synthetic experiments\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mallows_bandit", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="reduced run for tests (seconds)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="RESULTS.md to regenerate (default: this folder's RESULTS.md in full mode with the default --out, else none)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the bandit seeds")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redo plots and tables from an existing results.json in --out (no training)",
    )
    args = parser.parse_args(argv)

    from preftune import losses as L

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    results_md = args.results_md
    if results_md is None and not args.quick and args.out is None:
        results_md = RESULTS_MD
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    if args.replot:
        results = json.loads((out / "results.json").read_text())
        if results["mode"] == "quick" and args.results_md is None:
            results_md = None
        return _write_reports(results, out, results_md, not args.no_plots, log)

    settings = mode_settings(args.quick)
    if args.seeds:
        settings["seeds"] = args.seeds
    start = time.time()
    results: dict = {
        "mode": "quick" if args.quick else "full",
        "platform": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "settings": {
            "command": "python -m experiments.mallows_bandit"
            + (" --quick" if args.quick else "")
            + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else ""),
            "trajectory_betas": settings["trajectory_betas"],
            "num_arms": settings["bandit"].num_arms,
            "optimizers": OPTIMIZERS,
            "lr_scale": settings["lr_scale"],
        },
    }
    log("sampler check ...")
    results["sampler_check"] = sampler_check(
        L, list(settings["bandit"].phi_levels), settings["bandit"].num_arms, settings["sampler_rankings"]
    )
    log("dispersion estimator ...")
    results["estimator"] = estimator.run(settings["estimator"], settings["estimator_seeds"], L)
    log("population optimum ...")
    results["population_optimum"] = {
        "beta": POPULATION_BETA,
        "methods": bandit.population_optimum(
            L, settings["bandit"].phi_levels, settings["bandit"].num_arms, POPULATION_BETA, POPULATION_METHODS
        ),
    }
    log("bandit ...")
    results["bandit"] = run_bandit(settings, L, log)
    results["runtime_s"] = time.time() - start

    (out / "results.json").write_text(_dumps(results))
    _write_reports(results, out, results_md, not args.no_plots, log)
    log(f"done in {time.time() - start:.0f} s; outputs in {out}")
    return results


def _rounded(obj, digits: int = 6):
    """Floats to `digits` significant digits, so results.json stays small and diffs stay readable."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _dumps(results: dict) -> str:
    """Indented JSON with innermost lists of numbers kept on one line."""
    text = json.dumps(_rounded(results), indent=1)
    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def _write_reports(results: dict, out: Path, results_md: Path | None, plots: bool, log) -> dict:
    if plots:
        results["plots"] = make_plots(results, out)
    block = results_tables(results)
    (out / "tables.md").write_text(block + "\n")
    if results_md is not None:
        update_results_md(results_md, block)
    log(block)
    return results


if __name__ == "__main__":
    main()
