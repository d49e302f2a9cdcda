#!/usr/bin/env python
"""preftune vs TRL's DPOTrainer on identical work, in one run: step time and peak memory ratios.

    python bench/run.py                       # every configuration this machine can run
    python bench/run.py --configs 1,3 --steps 6 --rounds 3
    python bench/run.py --quick               # toy sizes, every configuration on the CPU (tests)
    python bench/run.py --trl-wheel trl-1.16.0-py3-none-any.whl   # TRL from a local wheel (GPU hosts)

Each (configuration, framework) runs in its own subprocess so that peak memory is clean, and the
frameworks' processes are interleaved (round r runs them in an order rotated by r) so that a busy
machine slows both alike. Step time is the median over the timed steps of all rounds (warm-up steps
excluded); memory is the largest peak over the rounds. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import CONFIGS, Workload, fmt_bytes, quick  # noqa: E402

LABELS = {
    "preftune": "preftune DPO",
    "preftune-mrpo": "preftune MRPO K=3",
    "trl": "TRL DPO",
    "sft-hf": "SFT floor (HF labels)",
    "sft-preftune": "SFT (preftune chunked)",
}

# (config prefix, A, B, {metric: (op, bound)}) -- targets from the issue
COMPARISONS = [
    ("1", "preftune", "trl", {"time": ("<=", 0.3), "mem": ("<=", 0.3)}),
    ("1", "preftune", "sft-hf", {"time": ("<=", 1.15)}),
    ("1", "preftune", "sft-preftune", {}),
    ("2a", "preftune", "trl", {"time": ("<=", 0.7), "mem": ("<=", 0.5)}),
    ("2a", "preftune", "sft-hf", {"time": ("<=", 1.15)}),
    ("2b", "preftune", "trl", {"time": ("<=", 0.7), "mem": ("<=", 0.5)}),
    ("2c", "preftune", "trl", {"time": ("<=", 0.7), "mem": ("<=", 0.5)}),
    ("3", "preftune-mrpo", "preftune", {"time": ("<=", 1.05)}),
    ("3", "preftune-mrpo", "trl", {}),
    ("4a", "preftune", "trl", {}),
    ("4a", "preftune", "sft-hf", {"time": ("<=", 1.15)}),
    ("4b", "preftune", "trl", {"time": ("<=", 1 / 1.3), "mfu": (">=", 0.40)}),
    ("4b", "preftune", "sft-hf", {"time": ("<=", 1.15)}),
]


def _child_env(trl_wheel: str | None) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    if trl_wheel:  # a pure-Python wheel is importable straight from its zip file
        env["PYTHONPATH"] = os.pathsep.join([str(Path(trl_wheel).resolve()), env.get("PYTHONPATH", "")])
    return env


def trl_available(env: dict) -> str | None:
    """TRL's version as the workers will see it, or None."""
    probe = "import trl, sys; sys.stdout.write(trl.__version__)"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def cuda_device() -> str | None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch,sys; sys.stdout.write(torch.cuda.get_device_name() if torch.cuda.is_available() else '')",
        ],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or None


def run_worker(w: Workload, framework: str, env: dict, log, in_process: bool = False) -> dict:
    if in_process:  # --quick: no clean memory numbers, but no 15 s of imports per process either
        import traceback

        from workers import run

        try:
            return json.loads(json.dumps(run(w, framework)))
        except Exception as e:  # noqa: BLE001 - reported in the table like a failed subprocess
            log(f"    {framework} failed:\n{traceback.format_exc()[-3000:]}")
            return {"error": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / "run.py"), "--worker", json.dumps(w.to_dict()), framework, str(out)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file():
            tail = (r.stderr or r.stdout)[-3000:]
            log(f"    {framework} failed (exit {r.returncode}):\n{tail}")
            return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {r.returncode}"}
        return json.loads(out.read_text())


def run_config(w: Workload, frameworks: list[str], env: dict, log, in_process: bool) -> dict:
    """Every framework's processes for one configuration, round-robin; aggregated per framework."""
    log(
        f"[bench] config {w.name}: {w.title} ({', '.join(frameworks)}; {w.rounds} round(s) × {w.steps} steps)"
    )
    per_fw: dict[str, list] = {}
    for r in range(w.rounds):
        order = frameworks[r % len(frameworks) :] + frameworks[: r % len(frameworks)]
        for fw in order:
            res = run_worker(w, fw, env, log, in_process)
            for fw_name, part in (res.get("split") or {fw: res}).items():
                per_fw.setdefault(fw_name, []).append(part)
                if "error" not in part:
                    log(
                        f"    round {r + 1} {fw_name:<14} median {part['median_s']:.3f} s/step, "
                        f"peak +{fmt_bytes(part['peak_mb'])} (abs {fmt_bytes(part['peak_abs_mb'])})"
                    )
    return {fw: aggregate(w, rounds) for fw, rounds in per_fw.items()}


def aggregate(w: Workload, rounds: list[dict]) -> dict:
    good = [r for r in rounds if "error" not in r]
    if not good:
        return {"error": rounds[0].get("error", "failed") if rounds else "not run"}
    timed = [t for r in good for t in r["step_times"][w.warmup :]]
    med = statistics.median(timed)
    first = good[0]
    return {
        "median_s": med,
        "timed_steps": timed,
        "tokens_per_s": 2 * w.batch * w.seq / med,
        "mfu": first["flops_per_step"] / med / first["peak_flops"] if first.get("peak_flops") else None,
        "peak_mb": max(r["peak_mb"] for r in good),
        "peak_abs_mb": max(r["peak_abs_mb"] for r in good),
        "base_mb": statistics.median(r["base_mb"] for r in good),
        "memory_method": first["memory_method"],
        "setup_s": statistics.median(r["setup_s"] for r in good),
        "checks": first.get("checks", {}),
        "settings": first["settings"],
        "device_name": first.get("device_name"),
        "params": first["params"],
        "rounds": rounds,
    }


def _verdict(value: float | None, op: str, bound: float) -> str:
    if value is None:
        return "n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return "met" if ok else "MISSED"


def compare(name: str, results: dict) -> list[dict]:
    rows = []
    for prefix, a, b, targets in COMPARISONS:
        if prefix != name or a not in results or b not in results:
            continue
        ra, rb = results[a], results[b]
        row = {"config": name, "a": a, "b": b, "label": f"{LABELS[a]} / {LABELS[b]}"}
        if "error" in ra or "error" in rb:
            row["skipped"] = ra.get("error") or rb.get("error")
            rows.append(row)
            continue
        row.update(
            a_s=ra["median_s"],
            b_s=rb["median_s"],
            time_ratio=ra["median_s"] / rb["median_s"],
            a_mb=ra["peak_mb"],
            b_mb=rb["peak_mb"],
            mem_ratio=ra["peak_mb"] / rb["peak_mb"] if rb["peak_mb"] > 0 else None,
            a_abs_mb=ra["peak_abs_mb"],
            b_abs_mb=rb["peak_abs_mb"],
            abs_mem_ratio=ra["peak_abs_mb"] / rb["peak_abs_mb"],
            a_tok_s=ra["tokens_per_s"],
            b_tok_s=rb["tokens_per_s"],
            a_mfu=ra["mfu"],
            b_mfu=rb["mfu"],
        )
        verdicts = {}
        for metric, (op, bound) in targets.items():
            value = {"time": row["time_ratio"], "mem": row["mem_ratio"], "mfu": row["a_mfu"]}[metric]
            verdicts[metric] = f"{metric} {op} {bound:.2f}: {_verdict(value, op, bound)}"
        row["targets"] = verdicts
        rows.append(row)
    return rows


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def table(rows: list[dict]) -> str:
    head = (
        f"{'cfg':<4} {'A / B':<46} {'A s/step':>9} {'B s/step':>9} {'time A/B':>8} "
        f"{'A mem':>9} {'B mem':>9} {'mem A/B':>7} {'abs A/B':>7} {'A tok/s':>8} {'A MFU':>6} {'B MFU':>6}  targets"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['config']:<4} {r['label']:<46} skipped: {r['skipped']}")
            continue
        mem_ratio = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}"
        lines.append(
            f"{r['config']:<4} {r['label']:<46} {r['a_s']:>9.3f} {r['b_s']:>9.3f} {r['time_ratio']:>8.2f} "
            f"{fmt_bytes(r['a_mb']):>9} {fmt_bytes(r['b_mb']):>9} {mem_ratio:>7} {r['abs_mem_ratio']:>7.2f} "
            f"{r['a_tok_s']:>8.0f} {_pct(r['a_mfu']):>6} {_pct(r['b_mfu']):>6}  "
            + "; ".join(r["targets"].values())
        )
    return "\n".join(lines)


def cross_check(name: str, results: dict) -> list[str]:
    a, b = results.get("preftune", {}), results.get("trl", {})
    ca, cb = a.get("checks"), b.get("checks")
    if not ca or not cb:
        return []
    out = []
    for key in ("loss_step0", "logps_chosen_step0", "logps_rejected_step0", "loss_last"):
        va, vb = ca.get(key), cb.get(key)
        if va is None or vb is None:
            continue
        rel = abs(va - vb) / max(abs(vb), 1e-12)
        out.append(f"  {name:<4} {key:<22} preftune {va:>14.6f}   TRL {vb:>14.6f}   rel. diff {rel:.1e}")
    return out


def machine_info(trl_version: str | None, gpu: str | None) -> dict:
    import torch
    import transformers
    from workers import allocator_env

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "load_average_start": os.getloadavg(),
        "allocator_env": allocator_env(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1,2a,2b,3,4a,4b", help="comma-separated: 1,2a,2b,3,4a,4b")
    p.add_argument("--steps", type=int, help="timed steps per process (default: per configuration)")
    p.add_argument("--warmup", type=int, help="warm-up steps per process, excluded from timing")
    p.add_argument("--rounds", type=int, help="processes per framework, interleaved")
    p.add_argument("--quick", action="store_true", help="toy sizes; GPU configurations run on the CPU")
    p.add_argument("--json", default="bench/results.json", help="where to write the JSON results")
    p.add_argument("--trl-wheel", help="a TRL wheel to import from (hosts without TRL installed)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both frameworks use it")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the workers in this process (implied by --quick; memory numbers are then not isolated)",
    )
    p.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "FRAMEWORK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        from workers import run

        spec, framework, out = args.worker
        result = run(Workload.from_dict(json.loads(spec)), framework)
        Path(out).write_text(json.dumps(result))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    in_process = args.in_process or args.quick
    env = _child_env(args.trl_wheel)
    if in_process:
        os.environ.update({k: v for k, v in env.items() if k not in ("PYTHONPATH",)})
        if args.trl_wheel:
            sys.path.insert(0, str(Path(args.trl_wheel).resolve()))
    trl_version = trl_available(env)
    gpu = cuda_device()
    info = machine_info(trl_version, gpu)
    info["command"] = "python " + " ".join(
        [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])
    )
    notes = []
    if in_process:
        notes.append("workers ran in one process (--quick / --in-process): memory figures are not isolated.")
    if trl_version is None:
        notes.append("TRL is not importable here: TRL rows are skipped (install it, or pass --trl-wheel).")

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; have {list(CONFIGS)}")

    report = {"machine": info, "notes": notes, "configs": {}}
    all_rows = []
    for name in names:
        w = CONFIGS[name]
        if args.quick:
            w = quick(w)
        elif w.needs_gpu and gpu is None:
            notes.append(f"config {name} needs a GPU: not measured here ({w.title}).")
            report["configs"][name] = {"workload": w.to_dict(), "skipped": "no GPU"}
            continue
        overrides = {
            k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("rounds", args.rounds)) if v
        }
        if args.gradient_checkpointing:
            overrides["gradient_checkpointing"] = True
        w = replace(w, **overrides)
        frameworks = [f for f in w.frameworks if f != "trl" or trl_version is not None]
        reuse_trl = None
        if name == "3":  # TRL's DPO step here is config 1's: reuse it when config 1 ran
            reuse_trl = report["configs"].get("1", {}).get("results", {}).get("trl", {}).get("rounds")
            if not reuse_trl and trl_version is not None:
                frameworks.append("trl")
        if w.model != "tiny" and not args.quick:
            try:
                from preftune.models import resolve_model

                resolve_model(w.model)
            except Exception as e:  # noqa: BLE001 - report any reason the preset cannot be built
                notes.append(f"config {name}: preset {w.model} unavailable ({e}); skipped.")
                report["configs"][name] = {"workload": w.to_dict(), "skipped": str(e)}
                continue
        results = run_config(w, frameworks, env, log, in_process)
        oom = [fw for fw, res in results.items() if "OutOfMemory" in str(res.get("error", ""))]
        if oom and not w.gradient_checkpointing and w.device == "cuda":
            notes.append(
                f"config {name}: {', '.join(oom)} ran out of memory without gradient checkpointing; "
                "the configuration was rerun with gradient checkpointing on both sides."
            )
            w = replace(w, gradient_checkpointing=True)
            results = run_config(w, frameworks, env, log, in_process)
        if reuse_trl:
            results["trl"] = aggregate(w, reuse_trl)
            notes.append("config 3: the TRL DPO row is config 1's measurement (same model, data and batch).")
        rows = compare(name, results)
        all_rows += rows
        report["configs"][name] = {"workload": w.to_dict(), "results": results, "comparisons": rows}

    info["load_average_end"] = os.getloadavg()
    print()
    print(
        f"preftune benchmark — {info['date']} — {info['cpu']} ({info['cores']} cores)"
        + (f", GPU {gpu}" if gpu else ", no GPU")
        + f"; torch {info['torch']}, transformers {info['transformers']}, TRL {trl_version or 'absent'}"
    )
    print(f"command: {info['command']}")
    print(f"allocator environment: {info['allocator_env'] or 'glibc defaults'}")
    print(f"load average start {info['load_average_start']}, end {info['load_average_end']}")
    print(
        "memory: peak over the setup baseline (model, data and references loaded), CPU = RSS high-water "
        "mark, GPU = max_memory_allocated; 'abs A/B' = ratio of absolute peaks"
    )
    print()
    print(table(all_rows))
    checks = [
        line
        for name in report["configs"]
        for line in cross_check(name, report["configs"][name].get("results", {}))
    ]
    if checks:
        print()
        print(
            "correctness cross-check (same weights, same batches; losses and mean log-probs of step 0, loss of the last step):"
        )
        print("\n".join(checks))
    settings = {
        f"{name}/{fw}": res["settings"]
        for name, c in report["configs"].items()
        for fw, res in c.get("results", {}).items()
        if "settings" in res
    }
    if settings:
        print()
        print("settings:")
        seen = set()
        for key, text in settings.items():
            if text not in seen:
                print(f"  {key}: {text}")
                seen.add(text)
    if notes:
        print()
        print("notes:")
        for n in notes:
            print(f"  - {n}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
