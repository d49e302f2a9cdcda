#!/usr/bin/env python
"""The device check: CUDA correctness and preftune vs TRL on one lent GPU, in one command, < 8 minutes.

    bash bench/device_check.sh               # on the lent machine (installs the carried wheels first)
    bash bench/device_check.sh --dry-run     # here, on the CPU: every code path at toy sizes (CI runs it)
    python bench/device_check.py --help      # the phases' options (device_check.sh passes them on)

Phases, each in its own process with its own time limit inside one overall budget (``--budget``); the
record is rewritten after every phase, so a phase that hangs or dies costs only itself:

1. ``environment``: versions (Python, torch, CUDA, transformers, accelerate, peft, triton, TRL,
   datasets, pyarrow), the GPU, whether ``trl`` and ``datasets`` import.
2. ``gpu_tests``: ``pytest -m gpu tests/gpu`` (the fused head against each model's logits, shared-prompt
   rows, device vs CPU DPO trajectories, one-process FSDP2, generation).
3. ``preftune``: bench/run.py's configuration 4b (random Llama ~1.2B built from its config, bf16
   autocast with fp32 master weights, prompt 512 + completions 1536, precomputed references),
   ``--pairs`` pairs a step: DPO with prompt sharing off and on, then MRPO with K=3 references
   alternating with its own DPO in one process, then one profiled step (``profile.txt``).
4. ``trl``: TRL's ``DPOTrainer`` on the same work (bench/workers.py ``run_trl``: same weights, token ids,
   optimiser, clipping; precomputed references).

Writes ``device_check.json`` (the record) and ``profile.txt`` and the pytest log to ``--out`` ($OUT on the
lent machine) and prints a summary table last. Tokens/s counts 2 x pairs x 2048 tokens a step for every
variant; MFU is bench/workloads.py ``flops_per_step`` (the work the step needs, counted alike for both
frameworks) over the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s). Peak memory is
``torch.cuda.max_memory_allocated`` from the end of setup, absolute and over the setup baseline.
"""

from __future__ import annotations

import argparse
import codecs
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "triton",
    "trl",
    "datasets",
    "pyarrow",
    "dill",
    "multiprocess",
    "fsspec",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pytest",
    "pytest-timeout",
)
# seconds each phase may take at most (the overall budget may cut them shorter); a dry run, on a CPU
# that may be shared, gets DRY_RUN_SLACK times as long: it checks code paths, not speed
PHASE_LIMITS = {"environment": 60, "gpu_tests": 150, "preftune": 160, "trl": 130}
DRY_RUN_SLACK = 4
TARGETS = {"tokens_ratio": 1.3, "mfu": 0.40, "memory_ratio": 0.7, "mrpo_over_dpo": 1.05}
LABELS = {
    "preftune-plain": "preftune DPO, 2 rows/pair",
    "preftune-shared": "preftune DPO, shared prompt",
    "preftune": "preftune DPO (alternating)",
    "preftune-mrpo": "preftune MRPO K=3 (alt.)",
    "trl": "TRL DPOTrainer",
}


# --------------------------------------------------------------------------------------------------
# The workload


def workload(args):
    from workloads import CONFIGS, quick

    w = replace(
        CONFIGS["4b"],
        name="device-check",
        title="random Llama ~1.2B (16 layers, hidden 2048, 32 heads / 8 KV, MLP 8192, vocab 128,256) from its "
        "config, bf16 autocast, fp32 master weights",
        batch=args.pairs,
        steps=args.steps,
        warmup=args.warmup,
        rounds=1,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.dry_run:
        w = replace(quick(w), steps=2, warmup=1)
    return w


# --------------------------------------------------------------------------------------------------
# Workers (each phase's own process)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _free_device() -> float | None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**20
    return None


def worker_preftune(w, result_path: Path, profile_path: Path) -> None:
    """Every preftune variant in this process, the result file rewritten after each (a timeout keeps
    what finished). On a GPU, max_memory_allocated is reset per variant, so one process measures each."""
    import traceback

    from workers import run_preftune

    results: dict = {}
    variants = [
        ("preftune-plain", lambda: run_preftune(w, "dpo", share_prompt=False, profile_to=str(profile_path))),
        ("preftune-shared", lambda: run_preftune(w, "dpo", share_prompt=True)),
        ("alternate", lambda: run_preftune(replace(w, references=3), "alternate")),
    ]
    for name, fn in variants:
        left = _free_device()
        t0 = time.perf_counter()
        print(f"[device-check] preftune variant {name} ...", flush=True)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the next variant still runs
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            _write(result_path, results)
            continue
        for key, res in (out.get("split") or {name: out}).items():
            res["seconds"] = time.perf_counter() - t0
            res["allocated_before_mb"] = left
            results[key] = res
        _write(result_path, results)
        print(f"[device-check] preftune variant {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def worker_trl(w, result_path: Path) -> None:
    from workers import run_trl

    t0 = time.perf_counter()
    result = run_trl(w)
    result["seconds"] = time.perf_counter() - t0
    _write(result_path, {"trl": result})


# --------------------------------------------------------------------------------------------------
# Phases (run from the parent)


class Stopped(BaseException):
    """SIGTERM (device_check.sh's outer timeout): not an Exception, so no phase swallows it."""


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def requirement_mismatches(names=("trl", "datasets")) -> list[str]:
    """What the carried packages ask for that the image does not have (installed --no-deps, so pip never
    checked): "pyarrow>=24.0.0 (datasets; have 23.0.1)". Extras' requirements are left out."""
    from packaging.requirements import Requirement

    out = []
    for name in names:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                out.append(f"{req} ({name}; missing)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{req} ({name}; have {have})")
    return out


def run_process(argv: list[str], limit: float, env: dict | None = None, log_path: Path | None = None) -> dict:
    """Run argv in a session of its own for at most ``limit`` seconds; output to our stdout (and to
    ``log_path``). On timeout the whole process group is killed."""
    t0 = time.monotonic()
    print("+", " ".join(argv), f"(limit {limit:.0f} s)", flush=True)
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    timed_out = False
    fd = proc.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        # os.read on what select() says is there: a child that prints half a line (a progress bar)
        # and then hangs cannot hold us past the limit, as readline() would
        while True:
            left = limit - (time.monotonic() - t0)
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                if proc.poll() is not None:
                    break  # it ended; a grandchild may still hold the pipe open
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            if log:
                log.write(text)
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30 if timed_out else max(1.0, limit - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing it started may outlive it
        except (ProcessLookupError, PermissionError):
            pass
        if log:
            log.close()
    seconds = time.monotonic() - t0
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    return {"status": status, "seconds": round(seconds, 1), "exit": proc.returncode, "limit_s": round(limit)}


def phase_environment(args, limit: float) -> tuple[dict, dict]:
    import torch

    env: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "requirement_mismatches": requirement_mismatches(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gb=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    probe = "import datasets, trl, sys; sys.stdout.write(trl.__version__ + ' ' + datasets.__version__)"
    try:
        r = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=max(5.0, limit - 5)
        )
        env["trl_importable"] = r.returncode == 0
        if r.returncode != 0:
            env["trl_import_error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:500]
    except subprocess.TimeoutExpired:
        env["trl_importable"] = False
        env["trl_import_error"] = "import timed out"
    status = {"status": "ok"}
    if not args.dry_run and not torch.cuda.is_available():
        status = {"status": "failed", "error": "no CUDA GPU visible (use --dry-run on a CPU machine)"}
    return env, status


def phase_gpu_tests(args, limit: float) -> tuple[dict, dict]:
    xml = args.out / "gpu_tests.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rfE", "-p", "no:cacheprovider"]
    argv += [f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["--timeout", str(int(max(30, limit / 2)))]  # one hung test leaves the others' results
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.dry_run:
        env.update(PREFTUNE_GPU_TESTS_ON_CPU="1", PREFTUNE_GPU_TESTS_ONE_EACH="1")
    status = run_process(argv, limit, env, args.out / "gpu_tests.log")
    summary: dict = {}
    if xml.is_file():
        try:
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            summary["passed"] = (
                summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
            )
            summary["not_passed"] = [
                f"{case.get('classname')}::{case.get('name')}: {child.tag}"
                for case in suite.iter("testcase")
                for child in case
                if child.tag in ("failure", "error", "skipped")
            ]
        except ET.ParseError as e:
            summary = {"error": f"junit xml unreadable: {e}"}
    if status["status"] == "ok" and summary.get("passed", 0) == 0:
        status = {**status, "status": "failed", "error": "no test passed"}
    return summary, status


def _worker_argv(args, kind: str, result: Path) -> list[str]:
    passed = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    passed += ["--out", str(args.out)]
    passed += ["--dry-run"] if args.dry_run else []
    passed += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    return [sys.executable, str(HERE / "device_check.py"), "--worker", kind, "--result", str(result), *passed]


def phase_bench(args, limit: float, kind: str) -> tuple[dict, dict]:
    result = args.out / f".{kind}-result.json"
    result.unlink(missing_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.update(
        TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1"
    )
    status = run_process(_worker_argv(args, kind, result), limit, env)
    results = json.loads(result.read_text()) if result.is_file() else {}
    result.unlink(missing_ok=True)
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    if status["status"] == "ok" and (errors or not results):
        status = {**status, "status": "failed", "error": errors or "no result written"}
    return results, status


# --------------------------------------------------------------------------------------------------
# Summary


def comparisons(results: dict) -> dict:
    out: dict = {}
    trl = results.get("trl", {})
    for name in ("preftune-plain", "preftune-shared"):
        r = results.get(name, {})
        if "median_s" not in r:
            continue
        row = {"mfu": r.get("mfu")}
        if "median_s" in trl:
            row["tokens_ratio"] = r["tokens_per_s"] / trl["tokens_per_s"]
            row["memory_ratio"] = r["peak_abs_mb"] / trl["peak_abs_mb"] if trl.get("peak_abs_mb") else None
            row["train_memory_ratio"] = r["peak_mb"] / trl["peak_mb"] if trl.get("peak_mb") else None
        row["targets"] = {
            "tokens/s >= 1.3x TRL": _met(row.get("tokens_ratio"), ">=", TARGETS["tokens_ratio"]),
            "MFU >= 40%": _met(row["mfu"], ">=", TARGETS["mfu"]),
            "peak memory <= 0.7x TRL": _met(row.get("memory_ratio"), "<=", TARGETS["memory_ratio"]),
        }
        out[name] = row
    dpo, mrpo = results.get("preftune", {}), results.get("preftune-mrpo", {})
    if "median_s" in dpo and "median_s" in mrpo:
        ratio = mrpo["median_s"] / dpo["median_s"]
        out["mrpo-k3-over-dpo"] = {
            "time_ratio": ratio,
            "target": _met(ratio, "<=", TARGETS["mrpo_over_dpo"]) + " (<= 1.05, bench/run.py config 3's)",
        }
    return out


def _met(value, op: str, bound: float) -> str:
    if value is None:
        return "n/a"
    return "met" if (value >= bound if op == ">=" else value <= bound) else "MISSED"


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def summary_table(record: dict) -> str:
    env = record.get("environment", {})
    v = env.get("versions", {})
    lines = [
        "",
        f"device check {'(DRY RUN, CPU, toy sizes) ' if record['dry_run'] else ''}— {record['started']} — "
        f"{env.get('gpu') or 'no GPU'}; Python {env.get('python')}, torch {v.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), transformers {v.get('transformers')}, accelerate "
        f"{v.get('accelerate')}, TRL {v.get('trl')}, datasets {v.get('datasets')}",
        "",
        f"{'phase':<14}{'status':<10}{'seconds':>8}  notes",
    ]
    for name, p in record["phases"].items():
        note = p.get("error", "")
        if name == "environment" and env.get("requirement_mismatches"):
            note = f"{note} unmet by the image: {', '.join(env['requirement_mismatches'])}".strip()
        if name == "environment" and env.get("trl_importable") is False:
            note = f"{note} trl/datasets do not import: {env.get('trl_import_error')}".strip()
        if name == "gpu_tests" and "tests" in record.get("gpu_tests", {}):
            t = record["gpu_tests"]
            note = (
                f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
            )
        lines.append(f"{name:<14}{p['status']:<10}{p.get('seconds', 0):>8.1f}  {str(note)[:150]}")
    failed_tests = [n for n in record.get("gpu_tests", {}).get("not_passed", []) if not n.endswith("skipped")]
    lines += [f"  {n}" for n in failed_tests[:20]]
    w = record.get("workload", {})
    results = record.get("bench", {})
    if results:
        lines += [
            "",
            f"benchmark: {w.get('title')}; {w.get('batch')} pairs/step, seq {w.get('prompt_len', 0) + w.get('completion_len', 0)}"
            f" ({w.get('prompt_len')} + {w.get('completion_len')}), {w.get('precision')}, "
            f"{w.get('warmup')} warm-up + {w.get('steps')} timed steps",
            f"{'variant':<30}{'s/step':>8}{'tokens/s':>10}{'MFU':>7}{'peak GB':>9}{'train GB':>9}",
        ]
        for name in ("preftune-plain", "preftune-shared", "preftune", "preftune-mrpo", "trl"):
            r = results.get(name)
            if r is None:
                continue
            if "median_s" not in r:
                lines.append(f"{LABELS[name]:<30}  {str(r.get('error', 'no result'))[:100]}")
                continue
            lines.append(
                f"{LABELS[name]:<30}{r['median_s']:>8.3f}{r['tokens_per_s']:>10.0f}{_fmt(r.get('mfu'), '.1%'):>7}"
                f"{_fmt(r.get('peak_abs_mb'), '.2f', 1 / 1024):>9}{_fmt(r.get('peak_mb'), '.2f', 1 / 1024):>9}"
            )
        comp = record.get("comparisons", {})
        if comp:
            lines.append("")
        for name, c in comp.items():
            if name == "mrpo-k3-over-dpo":
                lines.append(f"MRPO K=3 / its own DPO, step time: {c['time_ratio']:.3f} — {c['target']}")
                continue
            lines.append(
                f"{LABELS[name]}: tokens/s vs TRL {_fmt(c.get('tokens_ratio'), '.2f')}x, "
                f"peak vs TRL {_fmt(c.get('memory_ratio'), '.2f')}x (train {_fmt(c.get('train_memory_ratio'), '.2f')}x), "
                f"MFU {_fmt(c.get('mfu'), '.1%')} — "
                + "; ".join(f"{k}: {v}" for k, v in c["targets"].items())
            )
        top = results.get("preftune-plain", {}).get("profile", {}).get("top", [])
        if top:
            lines += ["", "where one preftune step's time goes (torch.profiler, self time; profile.txt):"]
            lines += [
                f"  {t['share']:6.1%} {t['self_ms']:9.2f} ms  {t['calls']:>5}x  {t['name'][:70]}"
                for t in top[:10]
            ]
    lines.append(f"\nrecord: {record['out']}/device_check.json; total {record.get('seconds', 0):.0f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, 2 steps: the code paths only")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "device-check-out"))
    ap.add_argument("--budget", type=float, default=420, help="seconds for all phases together")
    ap.add_argument(
        "--phases",
        default="environment,gpu_tests,preftune,trl",
        help="a subset, e.g. environment,trl (a rerun)",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=4,
        help="preference pairs per step (default 4: 8 sequences of 2048; H200: 8 fits)",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both frameworks")
    ap.add_argument("--worker", choices=("preftune", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    def stop(signum, frame):  # device_check.sh's timeout: the phase's process group goes in run_process
        raise Stopped(f"stopped by signal {signum}")

    if not args.worker:
        signal.signal(signal.SIGTERM, stop)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.worker:
        w = workload(args)
        if args.worker == "preftune":
            worker_preftune(w, args.result, args.out / "profile.txt")
        else:
            worker_trl(w, args.result)
        return 0

    t0 = time.monotonic()
    slack = DRY_RUN_SLACK if args.dry_run else 1
    deadline = t0 + args.budget * slack
    record: dict = {
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "command": " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
        "out": str(args.out),
        "workload": workload(args).to_dict(),
        "targets": TARGETS,
        "phases": {},
        "bench": {},
    }
    path = args.out / "device_check.json"
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    for name in wanted:
        if name not in PHASE_LIMITS:
            ap.error(f"unknown phase {name!r}; have {list(PHASE_LIMITS)}")
    for name in wanted:
        limit = min(PHASE_LIMITS[name] * slack, deadline - time.monotonic())
        if limit < 10:
            record["phases"][name] = {"status": "skipped", "error": "the overall budget is spent"}
            continue
        print(f"\n[device-check] phase {name} (at most {limit:.0f} s)", flush=True)
        started = time.monotonic()
        record["phases"][name] = {"status": "running", "limit_s": round(limit)}
        _write(path, record)
        try:
            if name == "environment":
                record["environment"], status = phase_environment(args, limit)
            elif name == "gpu_tests":
                record["gpu_tests"], status = phase_gpu_tests(args, limit)
            else:
                results, status = phase_bench(args, limit, name)
                record["bench"].update(results)
                record["comparisons"] = comparisons(record["bench"])
        except Stopped as e:  # record what there is, print the table, end
            partial = args.out / f".{name}-result.json"
            if partial.is_file():  # the bench workers rewrite theirs after each variant
                record["bench"].update(json.loads(partial.read_text()))
                record["comparisons"] = comparisons(record["bench"])
                partial.unlink()
            record["phases"][name] = {
                "status": "killed",
                "error": str(e),
                "seconds": time.monotonic() - started,
            }
            break
        except Exception as e:  # noqa: BLE001 - a broken phase is recorded, the next one runs
            status = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        status.setdefault("seconds", round(time.monotonic() - started, 1))
        record["phases"][name] = status
        record["seconds"] = time.monotonic() - t0
        _write(path, record)
        if name == "environment" and status["status"] != "ok":
            break  # no GPU where one was expected: nothing else is worth the minutes
    record["seconds"] = time.monotonic() - t0
    _write(path, record)
    print(summary_table(record), flush=True)
    return 0 if all(p["status"] == "ok" for p in record["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
