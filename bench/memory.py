#!/usr/bin/env python
"""Where one preftune training step's memory goes: saved activations, fixed costs, and the process's RSS.

    python bench/memory.py --config 2a
    python bench/memory.py --config 2b --gradient-checkpointing
    MALLOC_MMAP_THRESHOLD_=131072 python bench/memory.py --config 2b --gradient-checkpointing

For a configuration of run.py, this builds the same model and batch as the preftune worker and
runs a few forward + backward passes of preftune's scoring (no optimiser step), reporting:
- the tensors autograd saves for the backward pass (parameters left out), counted once per storage
  and grouped by shape and producing operation (with gradient checkpointing, only what is saved
  outside the checkpointed layers: their inputs), and that total per token per layer;
- the fixed costs of full fine-tuning that no trainer avoids at the same math: gradients and
  AdamW's two moments (float32, 4 bytes each per trainable parameter);
- the peak RSS over the setup baseline during the passes, as run.py measures memory on the CPU.

The difference between the RSS peak and what is live comes from the C allocator: glibc keeps freed
memory for reuse, and its heap grows by fragmentation. Running with a fixed mmap threshold (the
environment variable above) makes RSS follow live memory, at the price of page faults on every
large allocation; bench/NOTES.md records what both cost here.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import MemoryMeter, allocator_env, trainable_policy  # noqa: E402
from workloads import CONFIGS, model_vocab, quick, synthetic_pairs  # noqa: E402


class SavedTensorCensus:
    """Counts the storages autograd saves during a forward pass, each once, leaving out the model's
    parameters and buffers (saved by reference: they cost nothing more)."""

    def __init__(self, model: torch.nn.Module):
        self.by_kind: collections.Counter = collections.Counter()
        self._resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._seen and ptr not in self._resident:
            self._seen.add(ptr)
            op = type(t.grad_fn).__name__ if t.grad_fn is not None else "constant"
            self.by_kind[(tuple(t.shape), str(t.dtype).replace("torch.", ""), op)] += storage.nbytes()
        return t

    def hooks(self):
        self.by_kind.clear()
        self._seen.clear()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def total_bytes(self) -> int:
        return sum(self.by_kind.values())


def census(config: str, gradient_checkpointing: bool, passes: int, small: bool) -> dict:
    from preftune.data.collate import collate_sequences
    from preftune.step import PolicyScorer

    w = replace(CONFIGS[config], gradient_checkpointing=gradient_checkpointing)
    if small:
        w = quick(w)
    model = trainable_policy(w)
    scorer = PolicyScorer(model)
    prompt, chosen, rejected = zip(*synthetic_pairs(replace(w, warmup=0, steps=1), model_vocab(w)))
    batch = collate_sequences(list(prompt) * 2, list(chosen) + list(rejected), 0, torch.device("cpu"))
    tokens = int(batch["attention_mask"].sum())
    layers = model.config.num_hidden_layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = SavedTensorCensus(model)
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    rounds = []
    for _ in range(passes):
        t0 = time.perf_counter()
        with counted.hooks():
            logps = scorer(**batch).logps
        t1 = time.perf_counter()
        logps.sum().backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        rounds.append({"forward_s": t1 - t0, "backward_s": t2 - t1})
    memory = meter.stop()
    return {
        "config": w.name,
        "title": w.title,
        "gradient_checkpointing": gradient_checkpointing,
        "malloc_env": allocator_env(),
        "tokens": tokens,
        "layers": layers,
        "saved_mb": counted.total_bytes / 2**20,
        "saved_kb_per_token_layer": counted.total_bytes / 1024 / tokens / layers,
        "saved_top": [
            {"shape": list(shape), "dtype": dtype, "op": op, "mb": nbytes / 2**20}
            for (shape, dtype, op), nbytes in counted.by_kind.most_common(12)
        ],
        "grads_and_adam_mb": trainable * 4 * 3 / 2**20,
        "passes": rounds,
        "peak_rss_mb": memory["peak_mb"],
        "memory_method": memory["memory_method"],
    }


def print_report(r: dict) -> None:
    print(f"config {r['config']}: {r['title']}")
    print(
        f"  gradient checkpointing: {'on' if r['gradient_checkpointing'] else 'off'}; "
        f"allocator environment: {r['malloc_env'] or 'glibc defaults'}"
    )
    print(
        f"  saved for backward (parameters left out): {r['saved_mb']:.0f} MB over {r['tokens']} tokens × {r['layers']} layers "
        f"= {r['saved_kb_per_token_layer']:.1f} KB per token per layer"
    )
    for row in r["saved_top"]:
        print(f"    {row['mb']:8.1f} MB  {row['shape']} {row['dtype']} from {row['op']}")
    print(
        f"  gradients + AdamW moments of the trainable parameters (float32): {r['grads_and_adam_mb']:.0f} MB"
    )
    for i, p in enumerate(r["passes"]):
        print(f"  pass {i}: forward {p['forward_s']:.2f} s, backward {p['backward_s']:.2f} s")
    print(f"  peak RSS over the setup baseline: {r['peak_rss_mb']:.0f} MB ({r['memory_method']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="2a", choices=[k for k, w in CONFIGS.items() if not w.needs_gpu])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the same code path at toy sizes (tests)")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    result = census(args.config, args.gradient_checkpointing, args.passes, args.quick)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
