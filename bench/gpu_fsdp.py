#!/usr/bin/env python
"""FSDP2 on every GPU of one machine: preftune's DPO step vs TRL's DPOTrainer, tokens/s and MFU.

    python bench/gpu_fsdp.py                     # config 4b's model: random Llama ~1.2B, bf16, seq 2048
    python bench/gpu_fsdp.py --pairs-per-gpu 4 --gradient-checkpointing
    python bench/gpu_fsdp.py --dry-run           # toy sizes on the CPU, 2 processes: checks the code paths

Both sides shard the same model (run.py's configuration 4b: 16 layers, hidden 2048, 32 heads / 8 KV,
MLP 8192, vocabulary 128,256; random weights built from the config, fp32 master weights, bf16
compute, fp32 gradient reduction) per decoder layer with FSDP2 over all GPUs, on the same synthetic
pairs (prompt 512 + completions 1536), with precomputed reference log-probs, fused AdamW, clipping
at 1.0:

- preftune: ``torchrun --nproc_per_node G bench/gpu_fsdp.py --worker preftune``; the trainer's engine
  (``preftune.distributed.shard_policy`` with the scorer as root, ``PolicyScorer``, ``micro_batch``
  loss, ``clip_grad_norm_``);
- TRL: ``accelerate launch --use_fsdp --fsdp_version 2 ... bench/gpu_fsdp.py --worker trl``;
  ``DPOTrainer.train()`` exactly as bench/run.py runs it (bench/workers.py ``run_trl``).

Reported per framework: median step time, tokens/s per GPU and for the machine, MFU (model FLOPs of
bench/workloads.py ``flops_per_step`` over the GPU's dense bf16 peak), peak GPU memory. On the CPU
(``--dry-run``) accelerate's FSDP plugin does not run (it falls back to independent processes), so
the TRL side runs as one plain process there: the dry run checks code paths, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from workers import MemoryMeter, run_trl, summarize  # noqa: E402
from workloads import CONFIGS, quick, synthetic_pairs  # noqa: E402


def workload(args):
    w = replace(
        CONFIGS["4b"],
        name="gpu-fsdp",
        batch=args.pairs_per_gpu,
        steps=args.steps,
        warmup=args.warmup,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    return quick(w) if args.dry_run else w


def worker_preftune(args) -> dict:
    from workloads import build_model

    from preftune import distributed
    from preftune.data.collate import collate_sequences
    from preftune.losses import dpo
    from preftune.models.loading import enable_activation_checkpointing
    from preftune.step import PolicyScorer

    distributed.init_process_group()
    w = workload(args)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    w = replace(w, device=device.type)
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(w)
    if w.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    root = distributed.shard_policy(
        PolicyScorer(model), mp_policy=distributed.mixed_precision_policy(w.precision, device)
    )
    params = [p for p in root.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w.learning_rate, fused=True)
    rows = synthetic_pairs(w, w.vocab)
    g = torch.Generator().manual_seed(3)
    refs = -torch.rand(len(rows), 2, generator=g) * 100  # precomputed reference log-probs stand-in
    meter = MemoryMeter(device)
    meter.start()
    times = []
    for step in range(w.warmup + w.steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        index = [
            (step * w.batch * distributed.world_size() + distributed.rank() * w.batch + i) % len(rows)
            for i in range(w.batch)
        ]
        batch = [rows[i] for i in index]
        prompts = [p for p, _, _ in batch] * 2
        completions = [c for _, c, _ in batch] + [r for _, _, r in batch]
        logps = root(**collate_sequences(prompts, completions, 0, device)).logps
        ref = refs[index].to(device)
        loss = dpo(logps[: w.batch], logps[w.batch :], ref[:, 0], ref[:, 1], beta=w.beta).loss
        loss.backward()
        distributed.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    result = {**summarize(w, times, model, device), **meter.stop(), "world": distributed.world_size()}
    distributed.barrier("bench done")
    return result


def worker_trl(args) -> dict:
    w = workload(args)
    cuda = torch.cuda.is_available() and not args.dry_run
    result = run_trl(replace(w, device="cuda" if cuda else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {**result, "world": world}


def launch(argv: list[str], out: Path, timeout: float, env=None) -> dict:
    print("+", " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise SystemExit(f"timed out after {timeout:g} s: {' '.join(argv)}") from None
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(argv)}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-per-gpu", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--frameworks", default="preftune,trl")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, 2 processes")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default="bench/gpu_fsdp.json")
    ap.add_argument("--worker", choices=("preftune", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = worker_preftune(args) if args.worker == "preftune" else worker_trl(args)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.out).write_text(json.dumps(result))
        return

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the code paths on the CPU")
    gpus = 2 if args.dry_run else (args.gpus or torch.cuda.device_count())
    passed = [
        *(
            "--pairs-per-gpu",
            str(args.pairs_per_gpu),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        *(["--dry-run"] if args.dry_run else []),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for framework in args.frameworks.split(","):
            out = Path(tmp) / f"{framework}.json"
            tail = [str(HERE), "--worker", framework, "--out", str(out), *passed]
            if framework == "preftune":
                argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), *tail]
            elif args.dry_run:  # accelerate's FSDP plugin does not run on the CPU
                argv = [sys.executable, *tail]
            else:
                argv = [
                    sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
                    "--mixed_precision", "bf16", "--use_fsdp", "--fsdp_version", "2",
                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                    "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
                    "--fsdp_activation_checkpointing", str(args.gradient_checkpointing).lower(),
                    *tail,
                ]  # fmt: skip
            results[framework] = launch(argv, out, args.timeout, {"OMP_NUM_THREADS": "1"})
    w = workload(args)
    print(
        f"\n{w.title if not args.dry_run else 'dry run (toy sizes, CPU)'}; {args.pairs_per_gpu} pairs per GPU, "
        f"FSDP2 over {gpus} {'GPUs' if not args.dry_run else 'CPU processes'}"
    )
    print(f"{'':12}{'step s':>10}{'tokens/s/GPU':>14}{'tokens/s':>12}{'MFU':>8}{'peak MB':>10}")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        peak = r.get("peak_mb") or r.get("peak_rss_mb") or 0
        print(
            f"{name:12}{r['median_s']:10.3f}{r['tokens_per_s']:14.0f}{r['tokens_per_s'] * r['world']:12.0f}"
            f"{mfu:>8}{peak:10.0f}"
        )
    if len(results) == 2:
        p, t = results["preftune"], results["trl"]
        print(f"preftune/TRL step time: {p['median_s'] / t['median_s']:.3f}")
    record = {
        "workload": w.to_dict(),
        "gpus": gpus,
        "results": results,
        "date": time.strftime("%Y-%m-%d"),
        "median_check": {k: statistics.median(v["step_times"][w.warmup :]) for k, v in results.items()},
    }
    Path(args.json).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
