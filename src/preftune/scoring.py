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

from .data.collate import collate_sequences

# Logits budget per chunk, in float32 values. The tile is allocated once per pass and reused by
# every chunk. Larger chunks keep the head's matmuls efficient (on a 2-core CPU, 682 rows of
# SmolLM2's head run 17 % faster than 170) and keep the number of threaded ops per step low, which
# matters on a busy machine; see bench/NOTES.md. CPU: 2**25 values = 128 MiB; GPU: 512 MiB.
DEFAULT_LOGITS_BUDGET = 2**27
CPU_LOGITS_BUDGET = 2**25


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


def default_chunk_tokens(vocab: int, device: torch.device | str) -> int:
    budget = CPU_LOGITS_BUDGET if torch.device(device).type == "cpu" else DEFAULT_LOGITS_BUDGET
    return max(1, budget // vocab)


# --------------------------------------------------------------------------------------------------
# The straightforward chunked path (any head module): autograd through each chunk, recomputed in
# backward by activation checkpointing. Used for heads that are not a plain nn.Linear.


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


def _checkpointed_token_logps(hidden, targets, head, softcap, chunk, with_entropy):
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


# --------------------------------------------------------------------------------------------------
# The fused path (plain nn.Linear heads): one reusable float32 logits tile, in-place arithmetic, and
# a hand-written backward that turns each recomputed tile into d(logits) in place and feeds it to the
# two gradient matmuls. Same math as above; no per-chunk allocations, no autograd graph per chunk.


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _project(tile, hidden, weight_t, bias) -> None:
    """tile[:] = hidden @ weight_t (+ bias) in float32; a low-precision product is rounded first,
    exactly as the autocast path (head(hidden).float()) rounds it."""
    if hidden.dtype == tile.dtype:
        torch.mm(hidden, weight_t, out=tile)
    else:
        tile.copy_(hidden @ weight_t)
    if bias is not None:
        tile.add_(bias)


def _softcap_(tile, softcap, tanh_out=None) -> None:
    """tile <- softcap · tanh(tile / softcap) in place; keeps tanh in tanh_out when given."""
    if tanh_out is None:
        tile.div_(softcap).tanh_().mul_(softcap)
    else:
        torch.div(tile, softcap, out=tanh_out)
        tanh_out.tanh_()
        torch.mul(tanh_out, softcap, out=tile)


class _LinearTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, with_entropy):
        cdtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_t = weight.to(cdtype).t()
            bias_c = None if bias is None else bias.to(cdtype).float()
            n, vocab = hidden.shape[0], weight.shape[0]
            f32 = dict(dtype=torch.float32, device=hidden.device)
            logps, lse = torch.empty(n, **f32), torch.empty(n, **f32)
            entropy = torch.empty(n, **f32) if with_entropy else None
            width = min(chunk, max(n, 1))
            tile = torch.empty(width, vocab, **f32)
            probs = torch.empty(width, vocab, **f32) if with_entropy else None
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                t = tile[: end - start]
                _project(t, hidden[start:end].to(cdtype), weight_t, bias_c)
                if softcap:
                    _softcap_(t, softcap)
                target = t.gather(1, targets[start:end, None]).squeeze(1)
                peak = t.amax(1, keepdim=True)
                if with_entropy:  # H = lse - sum_v p_v z_v
                    e = probs[: end - start]
                    torch.sub(t, peak, out=e).exp_()
                    total = e.sum(1)
                    pz = e.mul_(t).sum(1) / total
                else:
                    total = t.sub_(peak).exp_().sum(1)
                chunk_lse = total.log_().add_(peak.squeeze(1))
                lse[start:end] = chunk_lse
                logps[start:end] = target - chunk_lse
                if with_entropy:
                    entropy[start:end] = (chunk_lse - pz) / math.log(vocab)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.chunk, ctx.cdtype = softcap, chunk, cdtype
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        softcap, chunk, cdtype = ctx.softcap, ctx.chunk, ctx.cdtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(cdtype)
            bias_c = None if bias is None else bias.to(cdtype).float()
            g = grad_logps.float()
            grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, **f32) if need_w else None
            grad_b = torch.zeros(vocab, **f32) if need_b else None
            width = min(chunk, max(n, 1))
            tile = torch.empty(width, vocab, **f32)
            tanh = torch.empty(width, vocab, **f32) if softcap else None
            low = (
                torch.empty(width, vocab, dtype=cdtype, device=hidden.device)
                if cdtype != torch.float32
                else None
            )
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                m = end - start
                t = tile[:m]
                h = hidden[start:end].to(cdtype)
                _project(t, h, weight_c.t(), bias_c)
                if softcap:
                    _softcap_(t, softcap, tanh[:m])
                gc = g[start:end, None]
                # d logp(target) / d z_v = 1[v = target] - p_v, times the incoming gradient
                t.sub_(lse[start:end, None]).exp_().mul_(-gc)
                t.scatter_add_(1, targets[start:end, None], gc)
                if softcap:  # d z / d logits = 1 - tanh^2
                    th = tanh[:m]
                    t.mul_(th.mul_(th).neg_().add_(1))
                d = t if low is None else low[:m].copy_(t)
                if need_h:
                    if grad_h.dtype == d.dtype:
                        torch.mm(d, weight_c, out=grad_h[start:end])
                    else:
                        grad_h[start:end] = d @ weight_c
                if need_w:
                    if d.dtype == torch.float32:
                        grad_w.addmm_(d.t(), h.float() if h.dtype != torch.float32 else h)
                    else:
                        grad_w.add_(d.t() @ h)
                if need_b:
                    grad_b.add_(t.sum(0))
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def _fusable(head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor / FSDP flat view
        and not head._forward_hooks
        and not head._forward_pre_hooks
    )


def token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    chunk_tokens: int = 0,
    with_entropy: bool = False,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) for P hidden states [P, H] -> [P] (and normalised entropies [P]), chunk by chunk.

    ``fused`` (default: whenever the head is a plain ``nn.Linear``) uses one reusable logits tile and
    a hand-written backward; otherwise each chunk goes through autograd with checkpointing.
    """
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = chunk_tokens or default_chunk_tokens(vocab, hidden.device)
    if fused is None:
        fused = _fusable(head)
    if not fused:
        return _checkpointed_token_logps(hidden, targets, head, softcap, chunk, with_entropy)
    if with_entropy:  # entropy is for references and metrics: never differentiated
        with torch.no_grad():
            return _LinearTokenLogProbs.apply(hidden, head.weight, head.bias, targets, softcap, chunk, True)
    logps, _ = _LinearTokenLogProbs.apply(hidden, head.weight, head.bias, targets, softcap, chunk, False)
    return logps, None


def score_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    chunk_tokens: int = 0,
    with_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
    predict_index: torch.Tensor | None = None,
    predict_targets: torch.Tensor | None = None,
    predict_sequence: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> SequenceScores:
    """Score N right-padded sequences [N, T]; ``completion_mask`` marks the completion tokens.

    Position t's hidden state predicts token t+1, so the positions projected are those whose next
    token is a completion token. Prompt tokens and padding never count.

    A batch from :func:`collate_shared_prompt_pairs` instead names the projected positions itself
    (``predict_index`` into the flattened [rows × T] hidden states, ``predict_targets`` the token
    each one predicts, ``predict_sequence`` the sequence it belongs to) and carries a 4D attention
    mask and position ids.
    """
    backbone, head, softcap = backbone_and_head(model)
    if predict_index is None:
        predicts = completion_mask[:, 1:].bool()
        flat = torch.arange(input_ids.numel(), device=input_ids.device).view_as(input_ids)[:, :-1][predicts]
        targets = input_ids[:, 1:][predicts]
        rows = (
            torch.arange(input_ids.shape[0], device=input_ids.device)
            .unsqueeze(1)
            .expand_as(predicts)[predicts]
        )
        n = input_ids.shape[0]
    else:
        flat, targets, rows, n = predict_index, predict_targets, predict_sequence, num_sequences
        attention_mask = _mask_for(backbone, attention_mask)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    tok_logps, tok_entropy = token_logps(
        hidden.reshape(-1, hidden.shape[-1])[flat],
        targets,
        head,
        softcap=softcap,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )
    logps = tok_logps.new_zeros(n).index_add(0, rows, tok_logps)
    n_tokens = torch.bincount(rows, minlength=n)
    entropy = None
    if tok_entropy is not None:
        entropy = tok_entropy.new_zeros(n).index_add(0, rows, tok_entropy) / n_tokens.clamp(min=1)
    return SequenceScores(logps=logps, n_tokens=n_tokens, entropy=entropy)


def _mask_for(backbone: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean [rows, 1, T, T] "may attend" mask in the form the model's attention expects."""
    config = getattr(backbone, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(backbone.parameters()).dtype
        if torch.is_autocast_enabled(allowed.device.type):
            dtype = torch.get_autocast_dtype(allowed.device.type)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(
        f"shared-prompt batches need a custom attention mask, which attn_implementation={impl!r} does "
        "not take; use sdpa or eager, or collate_pairs"
    )


def shared_prompt_support(model: nn.Module, max_length: int) -> str | None:
    """None if :func:`collate_shared_prompt_pairs` batches give this model's exact numbers, else why not.

    They need a custom 4D mask that the model passes to attention unchanged (transformers does for
    sdpa and eager attention), and no sliding window shorter than a sequence: the custom mask
    replaces the model's own, window included.
    """
    backbone, _, _ = backbone_and_head(model)
    config = getattr(backbone, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attn_implementation={impl!r} takes no custom attention mask"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        return f"sliding_window={window} is shorter than max_length={max_length}"
    return None


SHARE_PROMPT_MIN_SAVING = 0.25


def sharing_pays(prompts: Sequence[Sequence[int]], chosen: Sequence, rejected: Sequence) -> bool:
    """Whether shared-prompt rows are worth it for these pairs (automatic ``share_prompt``).

    True when the prompts' second copies are at least SHARE_PROMPT_MIN_SAVING of the two-row
    batch's tokens. Measured on a 2-core CPU (SmolLM2-135M, 4 pairs of 256 tokens, forward +
    backward): a 37.5 % saving made the step 0.66x as long; 12.5 % broke even, because attention
    under a custom mask over the longer rows costs more than causal attention over the short ones
    (bench/NOTES.md).
    """
    saved = sum(len(p) for p in prompts)
    total = 2 * saved + sum(len(c) for c in chosen) + sum(len(r) for r in rejected)
    return saved >= SHARE_PROMPT_MIN_SAVING * total


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
