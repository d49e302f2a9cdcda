"""Sharded reference scoring: 2 processes vs 1 on a reference where compute dominates.

A random Llama (hidden 512, 8 layers, 8 heads, MLP 1376, the tiny test tokenizer's vocabulary)
scores N synthetic pairs (prompt ~40 words, completions ~60 words, max_length 192) with
``precompute_references``, into an empty cache, three ways in one run:

- ``1 proc × 1 thread``: what a 2-process job did before (the main process scored alone while the
  other waited; torchrun gives each process one thread);
- ``2 procs × 1 thread``: every process scores its own rows (gloo process group, as torchrun starts it);
- ``1 proc × 2 threads``: one process using both cores through intra-op threads, for reference.

It prints wall times of the scoring call (after model and data are ready, slowest rank), the speed-up
and whether the cache entries are identical (same key, values within 1e-6).

    python bench/sharded_scoring.py                 # 256 pairs
    python bench/sharded_scoring.py --pairs 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args) -> None:
    import torch

    from preftune.data.store import TokenStore
    from preftune.distributed import barrier, end_process_group, init_process_group, rank
    from preftune.references import PAIRED_SIDES, ModelView, precompute_references

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group(timeout_s=600, backend="gloo")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    view = ModelView(args.model, Path(args.model), AutoTokenizer.from_pretrained(args.model))
    view.tokenized["train"] = TokenStore(args.store)
    barrier("start")
    start = time.perf_counter()
    precompute_references([view], ["train"], PAIRED_SIDES, cache_root=Path(args.cache), progress=False)
    barrier("scored")
    seconds = time.perf_counter() - start
    if rank() == 0:
        print(json.dumps({"seconds": seconds}), flush=True)
    end_process_group()


def run(procs: int, threads: int, workdir: Path, name: str) -> float:
    from preftune.testing import free_port, rank_env

    port = free_port()
    cache = workdir / f"cache-{name}"
    cmd = [
        sys.executable,
        str(HERE),
        "--worker",
        "--model",
        str(workdir / "model"),
        "--store",
        str(workdir / "store"),
        "--cache",
        str(cache),
        "--threads",
        str(threads),
    ]
    children = []
    for r in range(procs):
        env = rank_env(r, procs, port, threads=threads)
        children.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [c.communicate(timeout=3600) for c in children]
    for c, (_, err) in zip(children, outs):
        if c.returncode:
            raise SystemExit(f"{name}: a worker failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])["seconds"]


def entries(root: Path):
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted((root / "references").glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-threads", action="store_true", help="skip the 1 proc × 2 threads row")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "store", "cache"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from preftune.data import load_examples
    from preftune.data.store import build_token_store
    from preftune.testing import save_tiny_model

    sys.path.insert(0, str(HERE.parent))
    from data_scale import make_rows

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-sharded-scoring-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model(
        workdir / "model", vocab_size=512, hidden_size=512, layers=8, heads=8, intermediate_size=1376
    )
    make_rows(workdir / "rows.jsonl", args.pairs)
    from transformers import AutoTokenizer

    build_token_store(
        load_examples(str(workdir / "rows.jsonl")),
        AutoTokenizer.from_pretrained(model),
        workdir / "store",
        max_length=192,
        progress=False,
    )
    load = os.getloadavg()[0]
    times = {
        "1 proc × 1 thread": run(1, 1, workdir, "p1t1"),
        "2 procs × 1 thread": run(2, 1, workdir, "p2t1"),
    }
    if not args.no_threads:
        times["1 proc × 2 threads"] = run(1, 2, workdir, "p1t2")
    base = entries(workdir / "cache-p1t1")
    same = {}
    for name, tag in (("2 procs × 1 thread", "p2t1"), ("1 proc × 2 threads", "p1t2")):
        if name not in times:
            continue
        other = entries(workdir / f"cache-{tag}")
        same[name] = other.keys() == base.keys() and all(
            torch.allclose(other[k][t], base[k][t], rtol=1e-6, atol=1e-6) for k in base for t in base[k]
        )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.pairs} pairs, Llama hidden 512 × 8 layers, max_length 192"
    )
    print("| setup | scoring s | speed-up vs 1 proc × 1 thread | same cache entry |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        print(
            f"| {name} | {seconds:.1f} | {times['1 proc × 1 thread'] / seconds:.2f}× | "
            f"{'(base)' if name not in same else ('yes' if same[name] else 'NO')} |"
        )


if __name__ == "__main__":
    main()
