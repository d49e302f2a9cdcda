"""Batches for the model: token-id lists right-padded into the tensors :func:`preftune.scoring.score_batch`
takes. Two layouts: one row per sequence (``collate_sequences``, ``collate_pairs``), or one row per
pair whose prompt is shared by both completions (``collate_shared_prompt_pairs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion rows into input_ids / attention_mask / completion_mask [N, T]."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths) if lengths else 1
    n = len(lengths)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "completion_mask": completion_mask.to(device),
    }


def collate_pairs(
    examples: Sequence, pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward scores both sides of every pair."""
    prompts = [e.prompt_ids for e in examples] * 2
    completions = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    return collate_sequences(prompts, completions, pad_token_id, device)


def collate_shared_prompt_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> dict:
    """One row per pair, ``prompt | chosen | rejected``: the prompt goes through the model once.

    The rejected tokens see the prompt and themselves, never the chosen tokens, and their position
    ids continue from the prompt's, so every hidden state equals the one a separate
    ``prompt + rejected`` row would give; the last prompt position predicts the first token of both
    completions. :func:`preftune.scoring.score_batch` returns chosen sequences first (0..B-1), then rejected (B..2B-1),
    as for :func:`collate_pairs`.
    """
    b = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    width = max(lengths) if lengths else 1
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    index, targets, sequence = [], [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        lp, lc, lr = len(p), len(c), len(r)
        if lp == 0:
            raise ValueError(f"pair {i}: shared-prompt batches need a non-empty prompt")
        n = lp + lc + lr
        input_ids[i, :n] = torch.tensor(list(p) + list(c) + list(r), dtype=torch.long)
        position_ids[i, :n] = torch.cat([torch.arange(lp + lc), torch.arange(lp, lp + lr)])
        allowed[i, :n, :n] = causal[:n, :n]
        allowed[i, lp + lc : n, lp : lp + lc] = False  # rejected never sees chosen
        allowed[i, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding: itself only
        row = i * width
        # the hidden state before each completion token predicts it; for both completions the first
        # one is predicted from the last prompt position
        index += [row + lp - 1 + j for j in range(lc)]
        targets += list(c)
        sequence += [i] * lc
        index += [row + (lp - 1 if j == 0 else lp + lc + j - 1) for j in range(lr)]
        targets += list(r)
        sequence += [b + i] * lr
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": allowed.unsqueeze(1).to(device),
        "position_ids": position_ids.to(device),
        "predict_index": torch.tensor(index, dtype=torch.long).to(device),
        "predict_targets": torch.tensor(targets, dtype=torch.long).to(device),
        "predict_sequence": torch.tensor(sequence, dtype=torch.long).to(device),
        "num_sequences": 2 * b,
    }
