#!/usr/bin/env python
"""Per-process peak memory of full fine-tuning: 2-process FSDP2 vs one process, in one run.

    python bench/fsdp_memory.py                      # SmolLM2-135M-Instruct (preset), 3 steps
    python bench/fsdp_memory.py --model random       # a random Llama of SmolLM2-135M's shape
    python bench/fsdp_memory.py --quick              # toy model, seconds (tests)

Both sides run the same DPO steps of preftune's engine (``PolicyScorer``, fused AdamW, gradient
clipping) on the same global batch, with the same per-process micro-batch (one pair of
prompt 64 + completions 192 tokens) and activation checkpointing, so that what differs is what
FSDP shards: parameters, gradients and AdamW's two moments. One process accumulates the two
micro-batches that the two FSDP processes run side by side.

Memory is the process's peak RSS (``VmHWM``) minus its RSS once the libraries are imported and the
process group is up (the same on both sides), measured by each process itself; the FSDP
figure is the larger of its two processes. Both sides run with ``MALLOC_MMAP_THRESHOLD_=131072`` so
that RSS follows live memory (glibc otherwise keeps freed blocks: bench/NOTES.md). The sharded
side's peak includes loading the whole model before sharding it (every process loads it, then keeps
1/W). The exact local bytes of parameters, gradients and optimizer state are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class StageSampler:
    """Samples RSS every few milliseconds in a thread and remembers the stage the peak fell in."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.stage, self.peak_mb, self.peak_stage = "start", 0.0, "start"
        self.per_stage: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def sample(self) -> None:
        rss, stage = _status_kb("VmRSS") / 1024, self.stage
        self.per_stage[stage] = max(self.per_stage.get(stage, 0.0), rss)
        if rss > self.peak_mb:
            self.peak_mb, self.peak_stage = rss, stage

    def at(self, stage: str) -> None:
        self.sample()  # the end of the previous stage
        self.stage = stage

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def worker(args) -> dict:
    import torch
    import transformers  # noqa: F401  (part of the baseline, as in a real run)

    from preftune import distributed
    from preftune.data.collate import collate_sequences
    from preftune.losses import dpo
    from preftune.models.loading import enable_activation_checkpointing, load_causal_lm
    from preftune.step import PolicyScorer

    distributed.init_process_group(backend="gloo")
    base_mb = _status_kb("VmRSS") / 1024  # libraries loaded, process group up: the same on both sides
    world, rank = distributed.world_size(), distributed.rank()
    sampler = StageSampler()
    sampler.at("load model")
    torch.manual_seed(0)
    if args.model == "smollm2":
        model, _ = load_causal_lm("smollm2-135m-instruct")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = (
            dict(hidden_size=64, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4)
            if args.model == "toy"
            else dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9)
        )
        config = LlamaConfig(
            vocab_size=49152 if args.model == "random" else 2048,
            num_key_value_heads=3 if args.model == "random" else 4,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            **shape,
        )
        model = LlamaForCausalLM(config)
    enable_activation_checkpointing(model)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    root = PolicyScorer(model)
    if world > 1:
        sampler.at("shard")
        distributed.shard_policy(root)
    params = [p for p in root.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    micro_batches = args.global_pairs // world

    def ids(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        pairs = [
            (ids(args.prompt), ids(args.completion), ids(args.completion)) for _ in range(args.global_pairs)
        ]
        mine = pairs[rank * micro_batches : (rank + 1) * micro_batches]
        for m, (p, c, r) in enumerate(mine):
            with distributed.no_sync(root, enabled=m < len(mine) - 1):
                sampler.at("forward")
                logps = root(**collate_sequences([p, p], [c, r], 0)).logps
                ref = logps.detach() - 0.1
                loss = dpo(logps[:1], logps[1:], ref[:1], ref[1:], beta=0.1).loss
                sampler.at("backward")
                (loss / len(mine)).backward()
        sampler.at("clip + optimizer step")
        distributed.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sampler.at("between steps")
        optimizer.zero_grad(set_to_none=False)  # keep the gradients: they count at the peak anyway
        times.append(time.perf_counter() - started)

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    sampler.stop()
    state = {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim()),
    }
    return {
        "rank": rank,
        "world": world,
        "model_parameters": n_params,
        "baseline_mb": round(base_mb, 1),
        "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
        "peak_over_baseline_mb": round(_status_kb("VmHWM") / 1024 - base_mb, 1),
        "local_state_mb": {k: round(v / 2**20, 1) for k, v in state.items()},
        "peak_stage": sampler.peak_stage,  # where the sampled RSS peaked (sampled every 5 ms)
        "peak_rss_by_stage_mb": {k: round(v - base_mb, 1) for k, v in sampler.per_stage.items()},
        "step_seconds": [round(t, 2) for t in times],
    }


def run(args, world: int, out_dir: Path) -> list[dict]:
    from preftune.testing import free_port, rank_env

    port = free_port()
    procs = []
    for r in range(world):
        threads = max(1, (os.cpu_count() or 2) // world)
        env = rank_env(r, world, port, threads=threads, MALLOC_MMAP_THRESHOLD_="131072")
        out = out_dir / f"world{world}-rank{r}.json"
        cmd = [sys.executable, str(HERE), "--worker", str(out), *sys.argv[1:]]
        procs.append((subprocess.Popen(cmd, env=env), out))
    try:
        for p, _ in procs:
            if p.wait(timeout=args.timeout) != 0:
                raise SystemExit(f"world {world}: a worker failed (exit {p.returncode})")
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads(out.read_text()) for _, out in procs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "random", "toy"), default="smollm2")
    ap.add_argument("--quick", action="store_true", help="toy model, short sequences")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-pairs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="write the record here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.prompt, args.completion = "toy", 2, 8, 16
    if args.worker:
        from preftune.distributed import end_process_group

        result = worker(args)
        Path(args.worker).write_text(json.dumps(result))
        end_process_group()
        return result
    import tempfile

    if args.model == "smollm2":  # a first use converts the preset: not inside a measured process
        from preftune.models import resolve_model

        resolve_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args, 1, Path(tmp))
        two = run(args, 2, Path(tmp))
    worst = max(two, key=lambda r: r["peak_over_baseline_mb"])
    record = {
        "model": args.model,
        "parameters": one[0]["model_parameters"],
        "global_pairs": args.global_pairs,
        "seq": args.prompt + args.completion,
        "one_process": one[0],
        "fsdp_two_processes": two,
        "ratio_peak_over_baseline": round(
            worst["peak_over_baseline_mb"] / one[0]["peak_over_baseline_mb"], 3
        ),
        "ratio_peak_rss": round(max(r["peak_rss_mb"] for r in two) / one[0]["peak_rss_mb"], 3),
        "machine": f"{os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    s1, s2 = one[0]["local_state_mb"], worst["local_state_mb"]
    print(f"model {args.model} ({record['parameters'] / 1e6:.1f}M parameters), full fine-tuning, fp32, CPU")
    print(f"{'':28}{'1 process':>12}{'FSDP x2 (max)':>15}")
    for key in ("parameters", "gradients", "optimizer"):
        print(f"{'local ' + key + ' MB':28}{s1[key]:12.1f}{s2[key]:15.1f}")
    print(f"{'peak RSS MB':28}{one[0]['peak_rss_mb']:12.1f}{worst['peak_rss_mb']:15.1f}")
    print(
        f"{'peak over baseline MB':28}{one[0]['peak_over_baseline_mb']:12.1f}"
        f"{worst['peak_over_baseline_mb']:15.1f}"
    )
    print(
        f"ratio FSDP/one process: {record['ratio_peak_over_baseline']:.3f} over the baseline, "
        f"{record['ratio_peak_rss']:.3f} of the whole RSS (target <= 0.65)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
