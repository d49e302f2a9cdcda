"""Data preparation at scale: per-process RSS and rows/s of ``prepare_data`` on synthetic pairs.

Each measurement runs in a fresh process (so RSS starts clean): it loads the two tokenizers, takes
its baseline RSS, runs ``preftune.data.prepare.prepare_data`` (load, validate, tokenize for the
policy and one reference of another tokenizer) and reports the RSS growth at the peak and after
(what a training process keeps), and rows/s. Rows: prompt ~40 words, completions ~60 words,
max_length 192; tokenizers: the tiny test BPE of ``preftune.testing`` (vocabulary 512) and a second
BPE (vocabulary 8192) as the reference's.

Modes: ``cold`` tokenizes into an empty cache (the first process of a node), ``warm`` maps the
stores a cold run left (every other process of the node, and later runs), ``lists`` is the old path
(``tokenize_dataset`` lists held in the process) for comparison, ``load`` only loads and validates
(``load_examples``: the streaming pass that keys the stores; cheap at any size).

    python bench/data_scale.py                         # 20k and 100k rows, cold + warm, lists at 20k
    python bench/data_scale.py --rows 20000,100000,300000 --num-proc 2
    python bench/data_scale.py --rows 20000,300000 --modes load --lists-at 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will what "
    "model answer because first second result number value problem reason step therefore consider"
).split()


def _rss_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def make_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.gauss(words, words / 5)))))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(40), "chosen": text(60), "rejected": text(60)}) + "\n")


def child(args) -> None:
    """One measurement, in this fresh process; prints one JSON line."""
    import gc

    from transformers import AutoTokenizer

    from preftune.config import load_config
    from preftune.data.prepare import prepare_data

    cfg = load_config(
        {
            "model": args.policy,
            "data": {"train": args.data, "num_proc": args.num_proc},
            "references": [{"model": "policy"}, {"model": args.other}],
            "method": "mrpo",
            "max_length": 192,
            "cache_dir": args.cache,
            "progress": False,
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    AutoTokenizer.from_pretrained(args.other)
    gc.collect()
    base = _rss_kb()
    if args.mode == "load":  # loading and validation alone
        from preftune.data import load_examples

        start = time.perf_counter()
        rows = len(load_examples(args.data))
    elif args.mode == "lists":  # the old path: lists of token ids per process
        from preftune.data import load_examples, tokenize_dataset

        start = time.perf_counter()
        loaded = load_examples(args.data)
        kept = [
            tokenize_dataset(loaded, AutoTokenizer.from_pretrained(p), max_length=192, progress=False)[0]
            for p in (args.policy, args.other)
        ]
        del loaded
        rows = len(kept[0])
    else:
        start = time.perf_counter()
        data = prepare_data(cfg, tokenizer, Path(args.policy), unpaired=False, log=lambda m: None)
        rows = len(data.views[0].tokenized["train"])
        for view in data.views:  # touch every row the way a training run would: all of its ids
            view.token_key("train", ("chosen", "rejected"))
    seconds = time.perf_counter() - start
    gc.collect()
    after = _rss_kb()
    mb = 1 / 1024
    print(
        json.dumps(
            {
                "rows": rows,
                "mode": args.mode,
                "num_proc": args.num_proc,
                "seconds": round(seconds, 2),
                "rows_per_s": round(rows / seconds, 1),
                "base_rss_mb": round(base["VmRSS"] * mb, 1),
                "peak_growth_mb": round((after["VmHWM"] - base["VmRSS"]) * mb, 1),
                "after_growth_mb": round((after["VmRSS"] - base["VmRSS"]) * mb, 1),
                "after_anon_growth_mb": round((after["RssAnon"] - base["RssAnon"]) * mb, 1),
                "after_file_mb": round(after["RssFile"] * mb, 1),
            }
        ),
        flush=True,
    )


def measure(rows: int, mode: str, num_proc: int, workdir: Path, models: tuple[Path, Path]) -> dict:
    data = workdir / f"rows-{rows}.jsonl"
    if not data.exists():
        make_rows(data, rows)
    cache = workdir / f"cache-{rows}"
    cmd = [
        sys.executable,
        str(HERE),
        "--child",
        "--mode",
        mode,
        "--data",
        str(data),
        "--policy",
        str(models[0]),
        "--other",
        str(models[1]),
        "--cache",
        str(cache),
        "--num-proc",
        str(num_proc),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="20000,100000", help="comma-separated row counts")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--lists-at", type=int, default=20000, help="rows for the old list path (0: skip)")
    parser.add_argument("--workdir", default=None, help="keep data, models and caches here")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--modes", default="cold,warm", help="comma-separated: cold, warm, load")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "data", "policy", "other", "cache"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from preftune.testing import save_tiny_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = (workdir / "policy", workdir / "other")
    if not (models[0] / "config.json").exists():
        save_tiny_model(models[0], vocab_size=512, hidden_size=16, layers=1, heads=2)
        save_tiny_model(models[1], vocab_size=8192, hidden_size=16, layers=1, heads=2)
    results = []
    sizes = [int(r) for r in args.rows.split(",")]
    if args.lists_at:
        results.append(measure(args.lists_at, "lists", 1, workdir, models))
        print(json.dumps(results[-1]), flush=True)
    for rows in sizes:
        for mode in args.modes.split(","):
            results.append(measure(rows, mode, args.num_proc, workdir, models))
            print(json.dumps(results[-1]), flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    header = "| rows | mode | num_proc | rows/s | peak RSS growth MB | RSS growth after MB | anon growth after MB |"
    print(header)
    print("|" + "---|" * 7)
    for r in results:
        print(
            f"| {r['rows']} | {r['mode']} | {r['num_proc']} | {r['rows_per_s']} | {r['peak_growth_mb']} | "
            f"{r['after_growth_mb']} | {r['after_anon_growth_mb']} |"
        )
    cold = {r["rows"]: r for r in results if r["mode"] == "cold"}
    if len(cold) > 1:
        lo, hi = min(cold), max(cold)
        per_row = (cold[hi]["peak_growth_mb"] - cold[lo]["peak_growth_mb"]) / (hi - lo)
        print(
            f"peak RSS growth {lo}→{hi} rows: {cold[hi]['peak_growth_mb'] - cold[lo]['peak_growth_mb']:.0f} MB "
            f"({per_row * 1024:.2f} KB/row; extrapolated 20k→300k: {per_row * 280000:.0f} MB)"
        )
    lists = [r for r in results if r["mode"] == "lists"]
    if lists and lists[0]["rows"] in cold:
        a, b = lists[0], cold[lists[0]["rows"]]
        print(
            f"at {a['rows']} rows: lists/store peak growth {a['peak_growth_mb']}/{b['peak_growth_mb']} MB "
            f"= {a['peak_growth_mb'] / max(b['peak_growth_mb'], 1):.1f}×, kept after "
            f"{a['after_growth_mb']}/{b['after_growth_mb']} MB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
