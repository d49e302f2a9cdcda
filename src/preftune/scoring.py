"""Per-sequence completion log-probs (and entropies) of any causal LM, without full-vocabulary logits.

The model's backbone runs once over the batch; only hidden states at positions that predict a
completion token are projected to the vocabulary, a chunk of positions at a time. With gradients on,
each chunk is recomputed in the backward pass (activation checkpointing), so at most one chunk of
float32 logits exists at any moment: memory no longer grows with batch × length × vocabulary.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import NamedTuple

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


class SequenceScores(NamedTuple):
    """Per-sequence scores of a batch of N sequences (a named tuple: DDP, FSDP and accelerate see
    its tensors as they see a tuple's)."""

    logps: torch.Tensor  # [N] sum over completion tokens of log p(token)
    n_tokens: torch.Tensor  # [N] number of completion tokens
    entropy: torch.Tensor | None = None  # [N] mean over completion positions of H(p)/log V
    # [N] WPO's aligned sum Σ_t [log p(y_t) − log Σ_v p(v)²], detached (``with_wpo``)
    wpo: torch.Tensor | None = None
    # [N] Σ of log p(y_t) over completion tokens of rank > ``tail_from`` (LD-DPO; ``tail_from``)
    tail: torch.Tensor | None = None


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP / accelerate wrappers."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "get_output_embeddings"):
        inner = inner.module  # DDP / accelerate wrappers
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _text_config(base: nn.Module):
    config = getattr(base, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_scale(config) -> float | None:
    """The factor transformers applies to ``lm_head(hidden)`` before any softcapping, or None.

    Each family spells it differently, and the same name does not mean the same operation
    (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies), so this goes by ``model_type``.
    Architectures not listed here are still checked by :func:`probe_scoring` against the model's own
    logits.
    """
    model_type = getattr(config, "model_type", "") or ""
    if model_type.startswith("cohere"):  # logits * logit_scale
        scale = getattr(config, "logit_scale", None)
    elif model_type.startswith("granite"):  # logits / logits_scaling
        divisor = getattr(config, "logits_scaling", None)
        scale = None if not divisor else 1.0 / divisor
    elif model_type == "minicpm3":  # hidden / logits_scaling before a bias-free head: the same thing
        divisor = getattr(config, "logits_scaling", None)
        scale = None if not divisor else 1.0 / divisor
    elif model_type.startswith("hyperclovax"):  # logits * logits_scaling
        scale = getattr(config, "logits_scaling", None)
    elif model_type.startswith("falcon_h1"):  # logits * lm_head_multiplier
        scale = getattr(config, "lm_head_multiplier", None)
    else:  # e.g. muse models: logits * output_multiplier, then softcapping
        scale = getattr(config, "output_multiplier", None)
    return None if scale is None or float(scale) == 1.0 else float(scale)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """Split a causal LM (plain, PEFT-wrapped or DDP-wrapped) into (backbone, lm_head, softcap)."""
    base = _base_model(model)
    head = base.get_output_embeddings()
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or backbone is None or backbone is base:
        raise ValueError(
            f"{type(base).__name__} is not a causal language model with an output projection "
            "(expected e.g. LlamaForCausalLM); preftune needs AutoModelForCausalLM models"
        )
    softcap = getattr(_text_config(base), "final_logit_softcapping", None)
    return backbone, head, softcap


def default_chunk_tokens(vocab: int, device: torch.device | str) -> int:
    budget = CPU_LOGITS_BUDGET if torch.device(device).type == "cpu" else DEFAULT_LOGITS_BUDGET
    return max(1, budget // vocab)


# --------------------------------------------------------------------------------------------------
# The straightforward chunked path (any head module): autograd through each chunk, recomputed in
# backward by activation checkpointing. Used for heads that are not a plain nn.Linear.


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None, scale=None) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_token_logps(hidden, targets, head: nn.Module, softcap: float | None, scale=None):
    logits = _logits(head, hidden, softcap, scale)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _chunk_token_logps_entropy(hidden, targets, head, softcap, scale=None):
    logits = _logits(head, hidden, softcap, scale)
    log_probs = torch.log_softmax(logits, dim=-1)
    token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) / math.log(logits.shape[-1])
    return token, entropy


@torch.no_grad()
def _chunk_log_sum_sq(hidden, head, softcap, scale=None):
    """WPO: ``log Σ_v p(v)²`` per position (never differentiated)."""
    return torch.logsumexp(2.0 * torch.log_softmax(_logits(head, hidden, softcap, scale), dim=-1), dim=-1)


def _checkpointed_token_logps(
    hidden, targets, head, softcap, chunk, with_entropy, scale=None, log_sum_sq=None
):
    pieces, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        chunk_hidden, chunk_targets = hidden[start : start + chunk], targets[start : start + chunk]
        if log_sum_sq is not None:
            log_sum_sq.append(_chunk_log_sum_sq(chunk_hidden, head, softcap, scale))
        if with_entropy:
            token, chunk_entropy = _chunk_token_logps_entropy(
                chunk_hidden, chunk_targets, head, softcap, scale
            )
            entropies.append(chunk_entropy)
        elif torch.is_grad_enabled():
            token = checkpoint(
                _chunk_token_logps, chunk_hidden, chunk_targets, head, softcap, scale, use_reentrant=False
            )
        else:
            token = _chunk_token_logps(chunk_hidden, chunk_targets, head, softcap, scale)
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


def _project(tile, hidden, weight_t, bias, scale=None) -> None:
    """tile[:] = (hidden @ weight_t (+ bias)) · scale in float32; a low-precision product is rounded
    first, exactly as the autocast path (head(hidden).float()) rounds it."""
    if hidden.dtype == tile.dtype:
        torch.mm(hidden, weight_t, out=tile)
    else:
        tile.copy_(hidden @ weight_t)
    if bias is not None:
        tile.add_(bias)
    if scale is not None:
        tile.mul_(scale)


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
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, with_entropy, scale=None, with_sq=False):
        cdtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_t = weight.to(cdtype).t()
            bias_c = None if bias is None else bias.to(cdtype).float()
            n, vocab = hidden.shape[0], weight.shape[0]
            f32 = dict(dtype=torch.float32, device=hidden.device)
            logps, lse = torch.empty(n, **f32), torch.empty(n, **f32)
            entropy = torch.empty(n, **f32) if with_entropy else None
            log_sq = torch.empty(n, **f32) if with_sq else None  # WPO: log Σ_v p_v²
            width = min(chunk, max(n, 1))
            tile = torch.empty(width, vocab, **f32)
            probs = torch.empty(width, vocab, **f32) if with_entropy else None
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                logits = tile[: end - start]
                _project(logits, hidden[start:end].to(cdtype), weight_t, bias_c, scale)
                if softcap:
                    _softcap_(logits, softcap)
                target = logits.gather(1, targets[start:end, None]).squeeze(1)
                peak = logits.amax(1, keepdim=True)
                if with_entropy:  # H = lse - sum_v p_v z_v
                    shifted_exp = probs[: end - start]
                    torch.sub(logits, peak, out=shifted_exp).exp_()
                    total = shifted_exp.sum(1)
                    if with_sq:
                        sq_sum = torch.einsum("ij,ij->i", shifted_exp, shifted_exp)
                    expected_logit = shifted_exp.mul_(logits).sum(1) / total
                else:
                    total = logits.sub_(peak).exp_().sum(1)
                    if with_sq:  # Σ_v e^{2(z_v − peak)}: the tile holds e^{z − peak} here
                        sq_sum = torch.einsum("ij,ij->i", logits, logits)
                if with_sq:  # log Σ p² = log Σ e^{2(z − peak)} − 2 log Σ e^{z − peak}
                    log_sq[start:end] = sq_sum.log() - 2.0 * total.log()
                chunk_lse = total.log_().add_(peak.squeeze(1))
                lse[start:end] = chunk_lse
                logps[start:end] = target - chunk_lse
                if with_entropy:
                    entropy[start:end] = (chunk_lse - expected_logit) / math.log(vocab)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.chunk, ctx.cdtype, ctx.scale = softcap, chunk, cdtype, scale
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        if log_sq is not None:
            ctx.mark_non_differentiable(log_sq)
        return logps, entropy, log_sq

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy, _grad_log_sq):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        softcap, chunk, cdtype, scale = ctx.softcap, ctx.chunk, ctx.cdtype, ctx.scale
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(cdtype)
            bias_c = None if bias is None else bias.to(cdtype).float()
            grad = grad_logps.float()
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
                logits = tile[:m]
                chunk_hidden = hidden[start:end].to(cdtype)
                _project(logits, chunk_hidden, weight_c.t(), bias_c, scale)
                if softcap:
                    _softcap_(logits, softcap, tanh[:m])
                chunk_grad = grad[start:end, None]
                # d logp(target) / d z_v = 1[v = target] - p_v, times the incoming gradient
                logits.sub_(lse[start:end, None]).exp_().mul_(-chunk_grad)
                logits.scatter_add_(1, targets[start:end, None], chunk_grad)
                if softcap:  # d z / d logits = 1 - tanh^2
                    chunk_tanh = tanh[:m]
                    logits.mul_(chunk_tanh.mul_(chunk_tanh).neg_().add_(1))
                if scale is not None:  # d (scale · logits) / d logits
                    logits.mul_(scale)
                grad_logits = logits if low is None else low[:m].copy_(logits)
                if need_h:
                    if grad_h.dtype == grad_logits.dtype:
                        torch.mm(grad_logits, weight_c, out=grad_h[start:end])
                    else:
                        grad_h[start:end] = grad_logits @ weight_c
                if need_w:
                    if grad_logits.dtype == torch.float32:
                        grad_w.addmm_(
                            grad_logits.t(),
                            chunk_hidden.float() if chunk_hidden.dtype != torch.float32 else chunk_hidden,
                        )
                    else:
                        grad_w.add_(grad_logits.t() @ chunk_hidden)
                if need_b:
                    grad_b.add_(logits.sum(0))
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
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
    scale: float | None = None,
    log_sum_sq: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) for P hidden states [P, H] -> [P] (and normalised entropies [P]), chunk by chunk.

    The logits are ``softcap · tanh(scale · head(hidden) / softcap)`` (each part only when given), as
    the model's own forward computes them (see :func:`output_scale`).

    ``fused`` (default: whenever the head is a plain ``nn.Linear``) uses one reusable logits tile and
    a hand-written backward; otherwise each chunk goes through autograd with checkpointing.

    ``log_sum_sq``: a list to append the positions' ``log Σ_v p(v)²`` [P] to (WPO), detached.
    """
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = chunk_tokens or default_chunk_tokens(vocab, hidden.device)
    if fused is None:
        fused = _fusable(head)
    if not fused:
        pieces: list | None = [] if log_sum_sq is not None else None
        out = _checkpointed_token_logps(hidden, targets, head, softcap, chunk, with_entropy, scale, pieces)
        if log_sum_sq is not None:
            log_sum_sq.append(torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32))
        return out
    args = (hidden, head.weight, head.bias, targets, softcap, chunk)
    with_sq = log_sum_sq is not None
    if with_entropy:  # entropy is for references and metrics: never differentiated
        with torch.no_grad():
            logps, entropy, log_sq = _LinearTokenLogProbs.apply(*args, True, scale, with_sq)
    else:
        (logps, entropy, log_sq) = _LinearTokenLogProbs.apply(*args, False, scale, with_sq)
    if with_sq:
        log_sum_sq.append(log_sq)
    return logps, entropy


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
    exact: bool | None = None,
    with_wpo: bool = False,
    tail_from: torch.Tensor | None = None,
) -> SequenceScores:
    """Score N right-padded sequences [N, T]; ``completion_mask`` marks the completion tokens.

    Position t's hidden state predicts token t+1, so the positions projected are those whose next
    token is a completion token. Prompt tokens and padding never count.

    A batch from :func:`collate_shared_prompt_pairs` instead names the projected positions itself
    (``predict_index`` into the flattened [rows × T] hidden states, ``predict_targets`` the token
    each one predicts, ``predict_sequence`` the sequence it belongs to) and carries a 4D attention
    mask and position ids.

    ``exact`` scores from the model's own ``logits`` instead of the chunked head; by default it follows
    the model's :func:`~preftune.scoring_probe.probe_scoring` result (chunked head when none was recorded).

    ``with_wpo`` adds WPO's aligned sums (``SequenceScores.wpo``, detached); ``tail_from`` ``[N]``
    adds LD-DPO's tails: the log-prob of each sequence's completion tokens beyond its first
    ``tail_from`` ones (``SequenceScores.tail``, with gradient like ``logps``).
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
    if exact is None:
        probe = getattr(_base_model(model), PROBE_ATTRIBUTE, None)
        exact = probe is not None and not probe.fused_exact
    log_sum_sq: list | None = [] if with_wpo else None
    if exact:
        tok_logps, tok_entropy = _exact_token_logps(
            model, input_ids, attention_mask, position_ids, flat, targets, with_entropy, log_sum_sq
        )
    else:
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
            scale=output_scale(_text_config(_base_model(model))),
            log_sum_sq=log_sum_sq,
        )
    logps = tok_logps.new_zeros(n).index_add(0, rows, tok_logps)
    n_tokens = torch.bincount(rows, minlength=n)
    entropy = wpo = tail = None
    if tok_entropy is not None:
        entropy = tok_entropy.new_zeros(n).index_add(0, rows, tok_entropy) / n_tokens.clamp(min=1)
    if log_sum_sq is not None:
        aligned = tok_logps.detach() - log_sum_sq[0].to(tok_logps.dtype)
        wpo = aligned.new_zeros(n).index_add(0, rows, aligned)
    if tail_from is not None:
        beyond = _completion_rank(rows, flat) > torch.as_tensor(tail_from, device=rows.device)[rows]
        tail = tok_logps.new_zeros(n).index_add(0, rows, torch.where(beyond, tok_logps, 0.0))
    return SequenceScores(logps=logps, n_tokens=n_tokens, entropy=entropy, wpo=wpo, tail=tail)


def _completion_rank(rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """1-based rank of each predicted token within its sequence, in position order."""
    if rows.numel() == 0:
        return rows
    key = rows.long() * (int(flat.max()) + 1) + flat.long()
    order = torch.argsort(key)
    sorted_rows = rows[order]
    first = torch.ones_like(sorted_rows, dtype=torch.bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    index = torch.arange(rows.numel(), device=rows.device)
    start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=0).values
    rank = torch.empty_like(index)
    rank[order] = index - start + 1
    return rank


def _exact_token_logps(
    model, input_ids, attention_mask, position_ids, flat, targets, with_entropy, log_sum_sq=None
):
    """Token log-probs from the model's own ``logits`` (whatever its head does), for the positions
    ``flat`` indexes into [rows × T]. Only the columns some row needs are projected (``logits_to_keep``)."""
    width = input_ids.shape[1]
    columns = flat % width
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    if "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters:
        keep = torch.unique(columns)  # sorted
        kwargs["logits_to_keep"] = keep
        index = (flat // width) * keep.numel() + torch.searchsorted(keep, columns)
    else:
        index = flat
    logits = model(**kwargs).logits
    picked = logits.reshape(-1, logits.shape[-1])[index]
    log_probs = torch.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)
    token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1) / math.log(log_probs.shape[-1])
    if log_sum_sq is not None:
        with torch.no_grad():
            log_sum_sq.append(torch.logsumexp(2.0 * log_probs, dim=-1))
    return token, entropy


# Where preftune.scoring_probe records what it found for a model (score_batch follows it).
PROBE_ATTRIBUTE = "_preftune_scoring_probe"


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
    tail_from: Sequence[int] | None = None,
) -> SequenceScores:
    """Score a whole list of sequences without gradient, batching by length to waste little padding.

    ``tail_from`` (one count per sequence) adds LD-DPO's tails (``SequenceScores.tail``)."""
    n = len(prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(completions[i]))
    logps = torch.zeros(n, dtype=torch.float32)
    n_tokens = torch.zeros(n, dtype=torch.long)
    entropy = torch.zeros(n, dtype=torch.float32)
    tail = torch.zeros(n, dtype=torch.float32) if tail_from is not None else None
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
            tails = None if tail_from is None else torch.tensor([tail_from[i] for i in idx], device=device)
            scores = score_batch(
                model, **batch, with_entropy=with_entropy, chunk_tokens=chunk_tokens, tail_from=tails
            )
        index = torch.tensor(idx)
        if tail is not None:
            tail[index] = scores.tail.float().cpu()
        logps[index] = scores.logps.float().cpu()
        n_tokens[index] = scores.n_tokens.cpu()
        if scores.entropy is not None:
            entropy[index] = scores.entropy.float().cpu()
        if progress is not None:
            progress.update(size)
        start += size
    model.train(was_training)
    return SequenceScores(
        logps=logps, n_tokens=n_tokens, entropy=entropy if with_entropy else None, tail=tail
    )
