"""Greedy generation: one ``model.generate`` call per batch against preftune's, where rows that stopped
leave the batch (and the KV cache) every ``LOOK_EVERY`` new tokens.

Both are ``preftune.generation.generate`` on the same prompts; the baseline sets ``LOOK_EVERY`` past
``max_new_tokens`` (one call per batch: every row is carried to the longest one's end, as
``model.generate`` alone does). The two alternate, ``--repeats`` times each, in this process, so a
busy machine slows both; the ratio is baseline / preftune of the fastest repeats, and the texts
must be identical.

    python bench/generation.py                   # SmolLM2-135M (preset), 64 bundled test problems,
                                                 # batch 32, 96 new tokens, stop at "The answer is N."
    python bench/generation.py --stop eos        # rows stop at EOS only (the demo, eval --prompts)
    python bench/generation.py --quick           # a tiny random model, 8 prompts (~10 s; the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def _model(quick: bool, workdir: Path):
    from preftune.models import load_causal_lm

    if not quick:
        return load_causal_lm("smollm2-135m-instruct")
    from preftune.testing import save_tiny_model

    return load_causal_lm(str(save_tiny_model(workdir / "tiny", vocab_size=512, seed=0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 prompts, 12 tokens")
    parser.add_argument("--prompts", type=int, default=64, help="bundled test problems to answer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--stop", choices=("answer", "eos"), default="answer")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.batch_size, args.max_new_tokens, args.repeats = 8, 4, 12, 1
    torch.set_num_threads(args.threads)

    import tempfile

    from preftune import generation
    from preftune.data.arithmetic import load_arithmetic

    rows = load_arithmetic("test")[: args.prompts]
    prompts = [r["prompt"] for r in rows]
    stop = generation.ANSWER_STATED if args.stop == "answer" else None
    default_every = generation.LOOK_EVERY
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = _model(args.quick, Path(tmp))
        times: dict[str, list[float]] = {"one call": [], "preftune": []}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for name, every in (("one call", args.max_new_tokens + 1), ("preftune", default_every)):
                generation.LOOK_EVERY = every
                start = time.perf_counter()
                texts[name] = generation.generate(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    stop_when=stop,
                )
                times[name].append(time.perf_counter() - start)
        generation.LOOK_EVERY = default_every
    result = {
        "model": "tiny random llama" if args.quick else "smollm2-135m-instruct",
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
        "look_every": default_every,
        "threads": args.threads,
        "seconds": times,
        "ratio": min(times["one call"]) / min(times["preftune"]),
        "identical": texts["one call"] == texts["preftune"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
    }
    print(
        f"{result['model']}: {len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new "
        f"tokens, stop at {args.stop}, {args.threads} thread(s)\n"
        f"  one call per batch  {' '.join(f'{t:.1f}s' for t in times['one call'])}\n"
        f"  preftune            {' '.join(f'{t:.1f}s' for t in times['preftune'])}\n"
        f"  ratio (fastest)     {result['ratio']:.2f}x   identical texts: {result['identical']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
