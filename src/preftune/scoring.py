"""Per-sequence completion log-probs (and entropies) of any causal LM, without full-vocabulary logits.

The model's backbone runs once over the batch; only hidden states at positions that predict a
completion token are projected to the vocabulary, a chunk of positions at a time. With gradients on,
each chunk is recomputed in the backward pass (activation checkpointing), so at most one chunk of
float32 logits exists at any moment: memory no longer grows with batch × length × vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Default logits budget per chunk: 2**25 float32 values = 128 MiB.
DEFAULT_LOGITS_BUDGET = 2**25


@dataclass
class SequenceScores:
    """Per-sequence scores of a batch of N sequences."""

    logps: torch.Tensor  # [N] sum over completion tokens of log p(token)
    n_tokens: torch.Tensor  # [N] number of completion tokens
    entropy: torch.Tensor | None = None  # [N] mean over completion positions of H(p)/log V


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """Split a causal LM (plain, PEFT-wrapped or DDP-wrapped) into (backbone, lm_head, softcap)."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "get_output_embeddings"):
        inner = inner.module  # DDP / accelerate wrappers
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = base.get_output_embeddings()
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or backbone is None or backbone is base:
        raise ValueError(
            f"{type(base).__name__} is not a causal language model with an output projection "
            "(expected e.g. LlamaForCausalLM); preftune needs AutoModelForCausalLM models"
        )
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return backbone, head, softcap


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None):
    logits = _logits(head, hidden, softcap)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _chunk_token_logps_entropy(hidden, targets, head, softcap):
    logits = _logits(head, hidden, softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) / math.log(logits.shape[-1])
    return token, entropy


def token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    chunk_tokens: int = 0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) for P hidden states [P, H] -> [P] (and normalised entropies [P]), chunk by chunk."""
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = chunk_tokens or max(1, DEFAULT_LOGITS_BUDGET // vocab)
    pieces, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if with_entropy:
            token, ent = _chunk_token_logps_entropy(h, t, head, softcap)
            entropies.append(ent)
        elif torch.is_grad_enabled():
            token = checkpoint(_chunk_token_logps, h, t, head, softcap, use_reentrant=False)
        else:
            token = _chunk_token_logps(h, t, head, softcap)
        pieces.append(token)
    empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    logps = torch.cat(pieces) if pieces else empty
    return logps, (torch.cat(entropies) if entropies else (empty if with_entropy else None))


def score_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_tokens: int = 0,
    with_entropy: bool = False,
) -> SequenceScores:
    """Score N right-padded sequences [N, T]; ``completion_mask`` marks the completion tokens.

    Position t's hidden state predicts token t+1, so the positions projected are those whose next
    token is a completion token. Prompt tokens and padding never count.
    """
    backbone, head, softcap = backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predicts = completion_mask[:, 1:].bool()
    rows = (
        torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(predicts)[predicts]
    )
    tok_logps, tok_entropy = token_logps(
        hidden[:, :-1][predicts],
        input_ids[:, 1:][predicts],
        head,
        softcap=softcap,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )
    n = input_ids.shape[0]
    logps = tok_logps.new_zeros(n).index_add(0, rows, tok_logps)
    n_tokens = torch.bincount(rows, minlength=n)
    entropy = None
    if tok_entropy is not None:
        entropy = tok_entropy.new_zeros(n).index_add(0, rows, tok_entropy) / n_tokens.clamp(min=1)
    return SequenceScores(logps=logps, n_tokens=n_tokens, entropy=entropy)


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


@torch.no_grad()
def score_dataset(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_tokens: int = 8192,
    max_batch: int = 64,
    device: torch.device | str = "cpu",
    with_entropy: bool = True,
    chunk_tokens: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress=None,
) -> SequenceScores:
    """Score a whole list of sequences without gradient, batching by length to waste little padding."""
    n = len(prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(completions[i]))
    logps = torch.zeros(n, dtype=torch.float32)
    n_tokens = torch.zeros(n, dtype=torch.long)
    entropy = torch.zeros(n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    start = 0
    device_type = torch.device(device).type
    while start < n:
        longest = len(prompts[order[start]]) + len(completions[order[start]])
        size = 1
        while start + size < n and size < max_batch:
            nxt = order[start + size]
            longest = max(longest, len(prompts[nxt]) + len(completions[nxt]))
            if longest * (size + 1) > batch_tokens:
                break
            size += 1
        idx = order[start : start + size]
        batch = collate_sequences(
            [prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id, device
        )
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scores = score_batch(model, **batch, with_entropy=with_entropy, chunk_tokens=chunk_tokens)
        index = torch.tensor(idx)
        logps[index] = scores.logps.float().cpu()
        n_tokens[index] = scores.n_tokens.cpu()
        if scores.entropy is not None:
            entropy[index] = scores.entropy.float().cpu()
        if progress is not None:
            progress.update(size)
        start += size
    model.train(was_training)
    return SequenceScores(logps=logps, n_tokens=n_tokens, entropy=entropy if with_entropy else None)
