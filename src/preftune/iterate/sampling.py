"""Sampling a round: k samples per prompt, batch by batch, written as they land.

Batch b of round N (prompts ``b*B .. b*B+B-1`` of the round, B = ``rounds.batch_size``) draws from a
generator seeded by (``rounds.seed``, N, b) alone, so its samples are the same whichever process
draws it and whether or not the round was interrupted before. Each batch is appended, as one line,
to ``round-N/samples.part-<rank>.jsonl`` (flushed and synced); a rerun reads every part file and
draws only the batches missing. Under torchrun the missing batches are dealt round-robin to the
ranks; :func:`merged_samples` puts them back in prompt order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

PART = "samples.part-{rank}.jsonl"


def batch_seed(seed: int, round_index: int, batch: int) -> int:
    digest = hashlib.sha256(f"preftune-iterate/{seed}/{round_index}/{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def done_batches(round_dir: Path) -> dict[int, list[list[str]]]:
    """The batches already sampled (from every part file; a torn last line is ignored)."""
    done: dict[int, list[list[str]]] = {}
    for part in sorted(round_dir.glob(PART.format(rank="*"))):
        for line in part.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that batch is drawn again
            done[int(record["batch"])] = record["samples"]
    return done


def sample_round(
    model,
    tokenizer,
    prompts: list,
    *,
    rounds,
    round_index: int,
    round_dir: Path,
    rank: int = 0,
    world: int = 1,
    chat_template: str | None = None,
    stop_when=None,
    progress: bool = False,
    on_batch=None,
    done: dict | None = None,
    stop=None,
) -> int:
    """Draw this rank's missing batches of the round; returns how many batches it drew.

    ``done`` (default: read now) are the batches already drawn; under several processes every rank
    must deal from the same ``done``, read before any rank writes (then a barrier). ``stop()``, asked
    before each batch: True ends the loop there (a preemption signal; the batches written stay)."""
    from ..generation import sample_batch
    from ..progress import bar as progress_bar

    k, size = rounds.samples_per_prompt, rounds.batch_size
    batches = list(range((len(prompts) + size - 1) // size))
    done = done_batches(round_dir) if done is None else done
    missing = [b for b in batches if b not in done]
    mine = missing[rank::world]
    device = next(model.parameters()).device
    total = sum(len(prompts[b * size : (b + 1) * size]) for b in mine) * k
    bar = progress_bar(total=total, desc=f"round {round_index} samples", unit="sample", enabled=progress)
    part = round_dir / PART.format(rank=rank)
    drop_torn_tail(part)
    drawn = 0
    try:
        with open(part, "a") as f:
            for b in mine:
                if stop is not None and stop():
                    break
                generator = torch.Generator(device=device).manual_seed(
                    batch_seed(rounds.seed, round_index, b)
                )
                texts = sample_batch(
                    model,
                    tokenizer,
                    prompts[b * size : (b + 1) * size],
                    k=k,
                    generator=generator,
                    temperature=rounds.temperature,
                    top_p=rounds.top_p,
                    max_new_tokens=rounds.max_new_tokens,
                    chat_template=chat_template,
                    stop_when=stop_when,
                    on_done=bar.update,
                )
                f.write(json.dumps({"batch": b, "samples": texts}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                drawn += 1
                if on_batch is not None:
                    on_batch(b)
    finally:
        bar.close()
    return drawn


def drop_torn_tail(part: Path) -> None:
    """Cut a last line that a kill left unfinished, so that the next batch starts a line of its own."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(part, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def merged_samples(round_dir: Path, n_prompts: int, batch_size: int) -> list[list[str]] | None:
    """Every prompt's samples in prompt order, or None while a batch is missing."""
    done = done_batches(round_dir)
    out: list[list[str]] = []
    for b in range((n_prompts + batch_size - 1) // batch_size):
        if b not in done:
            return None
        out += done[b]
    return out
