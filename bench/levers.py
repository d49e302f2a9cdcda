#!/usr/bin/env python
"""Each performance lever of preftune's scoring path, measured alone, in one process, interleaved.

    python bench/levers.py                  # all groups
    python bench/levers.py --groups head    # head, head-smollm2, shared, shared-long-prompt, floor
    python bench/levers.py --reps 5

Groups:
  head    the output-head log-probs of config 1 (3,072 completion positions of 16 sequences of 256
          tokens, hidden 32, vocabulary 50,257), forward + backward: full logits (HF-style),
          autograd-checkpointed chunks (preftune before), the fused head at several chunk sizes, and
          the fused head over every position (what projecting prompts and padding too would cost).
  head-smollm2  the same at SmolLM2's head shape (1,536 positions, hidden 576, vocabulary 49,152).
  shared  SmolLM2-135M policy forward + backward of a config-2 batch (4 pairs, prompt 64 +
          completions 192) as two rows per pair vs one shared-prompt row per pair;
          shared-long-prompt: the same with prompt 192 + completions 64.
  floor   SmolLM2-135M: the backbone's forward + backward alone vs preftune's whole scoring pass.

Variants of a group run round-robin, so a busy machine slows them alike; the median of the rounds
after the first is reported. (Memory is left to run.py: in one process, memory freed by a variant
stays in the allocator and hides the next variant's peak.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import CONFIGS, build_model, synthetic_pairs  # noqa: E402


def measure(variants: dict, reps: int) -> dict:
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v[1:] if len(v) > 1 else v), v) for k, v in times.items()}


def report(title: str, results: dict, baseline: str) -> None:
    print(f"\n{title}")
    base = results[baseline][0]
    for name, (med, all_times) in results.items():
        print(f"  {name:<40} {med:8.3f} s  ×{med / base:5.2f}   rounds {[round(t, 2) for t in all_times]}")


def head_group(reps: int, config: str = "1", chunks=(16, 41, 166, 667)) -> None:
    from preftune.scoring import token_logps

    w = CONFIGS[config]
    vocab, hidden = (w.vocab, w.hidden) if w.model == "tiny" else (49152, 576)
    n_pred = 2 * w.batch * w.completion_len
    n_all = 2 * w.batch * (w.seq - 1)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h_all = torch.randn(n_all, hidden)
    t_all = torch.randint(0, vocab, (n_all,))
    h_pred, t_pred = h_all[:n_pred], t_all[:n_pred]

    def run(h, t, **kw):
        def fn():
            x = h.clone().requires_grad_(True)
            logps, _ = token_logps(x, t, head, **kw)
            logps.sum().backward()
            head.weight.grad = None

        return fn

    def full_logits():
        x = h_pred.clone().requires_grad_(True)
        logits = head(x).float()
        torch.log_softmax(logits, -1).gather(-1, t_pred[:, None]).sum().backward()
        head.weight.grad = None

    before = "checkpointed chunks of 667 (before)"
    variants = {
        "full logits (log_softmax over [P, V])": full_logits,
        before: run(h_pred, t_pred, chunk_tokens=667, fused=False),
    }
    for chunk in chunks:
        variants[f"fused, chunk {chunk}"] = run(h_pred, t_pred, chunk_tokens=chunk, fused=True)
    default = max(1, 2**25 // vocab)
    variants[f"fused, chunk {default}, every position"] = run(h_all, t_all, chunk_tokens=default, fused=True)
    report(
        f"head (config {config}): {n_pred} completion positions × vocab {vocab} × hidden {hidden}, "
        f"forward + backward ({torch.get_num_threads()} threads)",
        measure(variants, reps),
        before,
    )


def shared_group(reps: int, prompt_len: int = 64) -> None:
    from dataclasses import replace

    from preftune.data.collate import collate_sequences, collate_shared_prompt_pairs
    from preftune.scoring import score_batch

    w = CONFIGS["2a"]
    w = replace(w, prompt_len=prompt_len, completion_len=w.seq - prompt_len)
    rows = synthetic_pairs(w, 49152)[: w.batch]
    model = build_model(w)
    model.train()
    prompts, chosen, rejected = ([r[i] for r in rows] for i in range(3))
    two_rows = collate_sequences(prompts * 2, chosen + rejected, 0)
    one_row = collate_shared_prompt_pairs(prompts, chosen, rejected, 0)

    def step(batch):
        def fn():
            s = score_batch(model, **batch)
            (s.logps.sum() * 1e-3).backward()
            model.zero_grad(set_to_none=True)

        return fn

    report(
        f"shared prompt: SmolLM2-135M forward + backward, {w.batch} pairs, prompt {w.prompt_len} + "
        f"2 × {w.completion_len} ({torch.get_num_threads()} threads)",
        measure({"two rows per pair": step(two_rows), "one shared-prompt row per pair": step(one_row)}, reps),
        "two rows per pair",
    )


def floor_group(reps: int) -> None:
    """How much of a SmolLM2 preference forward+backward is the backbone, which no framework avoids."""
    from preftune.data.collate import collate_sequences
    from preftune.scoring import backbone_and_head, score_batch

    w = CONFIGS["2a"]
    rows = synthetic_pairs(w, 49152)[: w.batch]
    model = build_model(w)
    model.train()
    prompts, chosen, rejected = ([r[i] for r in rows] for i in range(3))
    batch = collate_sequences(prompts * 2, chosen + rejected, 0)
    backbone, _, _ = backbone_and_head(model)
    probe = torch.randn(model.config.hidden_size) * 1e-3

    def backbone_only():
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        (hidden @ probe).sum().backward()
        model.zero_grad(set_to_none=True)

    def scoring():
        s = score_batch(model, **batch)
        (s.logps.sum() * 1e-3).backward()
        model.zero_grad(set_to_none=True)

    report(
        f"floor: SmolLM2-135M forward + backward, {w.batch} pairs × {w.seq} tokens ({torch.get_num_threads()} threads)",
        measure(
            {"backbone only (no output head)": backbone_only, "preftune scoring (backbone + head)": scoring},
            reps,
        ),
        "backbone only (no output head)",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="head,head-smollm2,shared,shared-long-prompt,floor")
    p.add_argument("--reps", type=int, default=4, help="rounds; the first is warm-up")
    args = p.parse_args(argv)
    import os

    print(f"load average {os.getloadavg()}")
    groups = {
        "head": head_group,
        "head-smollm2": lambda reps: head_group(reps, "2a", chunks=(170, 682, 1536)),
        "shared": shared_group,
        "shared-long-prompt": lambda reps: shared_group(reps, prompt_len=192),
        "floor": floor_group,
    }
    for group in args.groups.split(","):
        groups[group.strip()](args.reps)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
