"""Sampling k completions per prompt: preftune's ``generation.sample_batch`` against
``model.generate(do_sample=True, num_return_sequences=k)`` on the same prompts, in one process.

preftune prefills each prompt once and expands its KV cache to its k rows, writes each new token
into a preallocated cache, and drops the rows that have stopped from the batch
(``preftune.decoding``); ``model.generate`` prefills k copies of every prompt, concatenates its
whole cache each step and carries every row to the longest one's end. Both sample with temperature 1, top-p 1 (no
top-k), the same batches (``--batch-size`` prompts, each with k rows) and the same stopping rule. The
two alternate, ``--repeats`` times each, so a busy machine slows both; the ratio is
median(generate) / median(preftune). The texts must be identical at temperature 0 (greedy: k copies
of one text each way; ``generate`` takes top-k 1 for it), checked in a separate untimed pass.

    python bench/sampling.py             # SmolLM2-135M-Instruct (preset), 32 bundled arithmetic
                                         # prompts, k = 4, 96 new tokens, rows stop at EOS
    python bench/sampling.py --quick     # a tiny random model, 4 prompts (~10 s; the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _model(quick: bool, workdir: Path):
    from preftune.models import load_causal_lm

    if not quick:
        return load_causal_lm("smollm2-135m-instruct")
    from preftune.testing import save_tiny_model

    return load_causal_lm(str(save_tiny_model(workdir / "tiny", vocab_size=512, seed=0)))


def baseline(model, tokenizer, prompts, *, k, max_new_tokens, batch_size, temperature, stop_when):
    """``model.generate`` per batch of prompts, ``num_return_sequences=k``: [prompt][sample]."""
    from preftune.generation import _text_stops, _texts, prompt_encodings

    out: list[list[str]] = []
    device = next(model.parameters()).device
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        enc = prompt_encodings(tokenizer, chunk, device=device)
        start = enc["input_ids"].shape[1]
        # temperature 0: greedy (generate refuses num_return_sequences without sampling: top_k=1 is the argmax)
        sampling = dict(temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(top_k=1)
        seqs = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=_text_stops(tokenizer, stop_when, start) if stop_when is not None else None,
            do_sample=True,
            **sampling,
        )
        texts = _texts(tokenizer, seqs[:, start:], tokenizer.eos_token_id)
        out += [texts[i * k : (i + 1) * k] for i in range(len(chunk))]
    return out


def preftune_sampling(model, tokenizer, prompts, *, k, max_new_tokens, batch_size, temperature, stop_when):
    from preftune.generation import sample_batch

    out: list[list[str]] = []
    for b, s in enumerate(range(0, len(prompts), batch_size)):
        out += sample_batch(
            model,
            tokenizer,
            prompts[s : s + batch_size],
            k=k,
            generator=torch.Generator().manual_seed(b),
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            stop_when=stop_when,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 prompts, 12 tokens")
    parser.add_argument("--prompts", type=int, default=32, help="bundled arithmetic prompts (test split)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (k rows each)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--stop", choices=("eos", "answer"), default="eos")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.batch_size, args.max_new_tokens, args.repeats = 4, 2, 12, 1
    torch.set_num_threads(args.threads)

    import tempfile

    from preftune import generation
    from preftune.data.arithmetic import load_arithmetic

    torch.manual_seed(0)  # model.generate samples from the global generator
    prompts = [r["prompt"] for r in load_arithmetic("test")[: args.prompts]]
    stop = generation.ANSWER_STATED if args.stop == "answer" else None
    ways = {"generate": baseline, "preftune": preftune_sampling}
    common = dict(k=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_when=stop)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = _model(args.quick, Path(tmp))
        model.eval()
        times: dict[str, list[float]] = {name: [] for name in ways}
        lengths: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, way in ways.items():
                    start = time.perf_counter()
                    texts = way(model, tokenizer, prompts, temperature=1.0, **common)
                    times[name].append(time.perf_counter() - start)
                    flat = [t for g in texts for t in g]
                    lengths[name] = sum(len(tokenizer(t)["input_ids"]) for t in flat) / len(flat)
            greedy = {
                name: way(model, tokenizer, prompts, temperature=0.0, **common) for name, way in ways.items()
            }
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": "tiny random llama" if args.quick else "smollm2-135m-instruct",
        "prompts": len(prompts),
        "k": args.k,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
        "threads": args.threads,
        "seconds": times,
        "median_seconds": medians,
        "ratio": medians["generate"] / medians["preftune"],
        "mean_sample_tokens": lengths,
        "identical_at_temperature_0": greedy["generate"] == greedy["preftune"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"{result['model']}: {len(prompts)} prompts x k={args.k}, batch {args.batch_size} prompts, "
        f"{args.max_new_tokens} new tokens, stop at {args.stop}, {args.threads} thread(s)\n"
        f"  generate(num_return_sequences)  {' '.join(f'{t:.1f}s' for t in times['generate'])}\n"
        f"  preftune sample_batch           {' '.join(f'{t:.1f}s' for t in times['preftune'])}\n"
        f"  ratio (medians)                 {result['ratio']:.2f}x   identical texts at temperature 0: "
        f"{result['identical_at_temperature_0']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["identical_at_temperature_0"] else 1


if __name__ == "__main__":
    sys.exit(main())
