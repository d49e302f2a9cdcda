"""The scoring probe: does preftune's chunked head reproduce a model's own logits, and do shared-prompt
rows reproduce plain rows? Checked on a few random sequences when a model is loaded
(:func:`preftune.models.loading.load_causal_lm`), never assumed; :func:`~preftune.scoring.score_batch`
and :func:`shared_prompt_support` follow what it recorded on the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .data.collate import collate_sequences, collate_shared_prompt_pairs
from .scoring import PROBE_ATTRIBUTE, _base_model, _text_config, backbone_and_head, score_batch

logger = logging.getLogger(__name__)


@dataclass
class ScoringProbe:
    """What :func:`probe_scoring` found for one model."""

    architecture: str
    fused_exact: bool  # the fused head's log-probs equal the model's own logits' (else: exact path)
    fused_error: float  # largest |difference| in a sequence log-prob, fused vs the model's logits
    shared_prompt: str | None  # None if shared-prompt rows equal plain rows, else why not


_RECURRENT_KEYS = ("mamba", "ssm", "rwkv", "recurrent", "linear_attn", "linear_conv")


def _mask_blind_layers(config) -> str | None:
    """Why some layer of this architecture ignores a custom attention mask, judged from its config.

    ALiBi adds a bias that depends on the key's position in the row, which a shared-prompt row moves;
    state-space, recurrent, convolution and linear-attention layers carry state along the row, across
    the mask. On a tiny random model the resulting difference can be as small as float32 noise, so the
    config decides where it can; the probe catches the rest.
    """
    attn_config = getattr(config, "attn_config", None)
    alibi = getattr(config, "alibi", False) or getattr(attn_config, "alibi", False)
    if isinstance(attn_config, dict):
        alibi = alibi or attn_config.get("alibi", False)
    if alibi or getattr(config, "model_type", None) == "bloom":
        return "ALiBi position biases"
    keys = [key for key in config.to_dict() if any(word in key for word in _RECURRENT_KEYS)]
    layers = [
        kind
        for name in ("layer_types", "layers_block_type", "block_types")
        for kind in (getattr(config, name, None) or [])
        if isinstance(kind, str) and (kind == "hybrid" or "linear" in kind or "attention" not in kind)
    ]
    if keys or layers:
        return f"state carried along the row by non-attention layers ({', '.join(sorted(set(layers)) or keys[:2])})"
    return None


def _tolerance(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # float32: both sides agree to ~1e-5 on a sequence; half precision rounds every logit
    if dtype in (torch.float16, torch.bfloat16):
        return 0.05 + 0.02 * reference.abs()
    return 1e-3 + 1e-4 * reference.abs()


def _probe_pairs(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    high = max(2, min(vocab, 32000))

    def ids(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=gen).tolist()

    shapes = [(5, 4, 3), (3, 6, 5), (7, 2, 4)]  # (prompt, chosen, rejected) lengths: padding included
    return [ids(p) for p, _, _ in shapes], [ids(c) for _, c, _ in shapes], [ids(r) for _, _, r in shapes]


@torch.no_grad()
def probe_scoring(model: nn.Module, *, log=None) -> ScoringProbe:
    """Compare preftune's scoring with the model's own forward on a small random batch, and record the
    decision on the model (``score_batch`` and :func:`shared_prompt_support` follow it).

    If the fused head differs from the model's logits (an output scaling preftune does not know, say),
    scoring falls back to the model's own logits, with a one-line warning. Shared-prompt rows are
    offered only if they give the plain rows' numbers (not so for ALiBi or state-space layers, whose
    state crosses the custom mask). Raises ValueError naming the architecture if the model's own
    forward cannot score the probe.
    """
    base = _base_model(model)
    architecture = type(base).__name__
    log = log or logger.warning
    _, head, _ = backbone_and_head(model)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    device = next(base.parameters()).device
    prompts, chosen, rejected = _probe_pairs(vocab)
    plain = collate_sequences(prompts * 2, chosen + rejected, 0, device)
    was_training = base.training
    base.eval()
    try:
        try:
            want = score_batch(model, **plain, exact=True).logps
        except Exception as error:
            raise ValueError(
                f"{architecture}: preftune cannot score this model: its own forward failed on a probe batch "
                f"({type(error).__name__}: {error})"
            ) from error
        dtype = want.dtype if head.weight.dtype == torch.float32 else head.weight.dtype
        tol = _tolerance(want.float(), dtype)
        try:
            got = score_batch(model, **plain, exact=False).logps
            diff = (got.float() - want.float()).abs()
            fused_error = float(diff.max())
            fused_exact = bool((diff <= tol).all())
        except Exception as failure:  # the fused path cannot run this head: use the model's own logits
            fused_error, fused_exact = float("inf"), False
            log(
                f"{architecture}: the chunked head failed ({type(failure).__name__}: {failure}); "
                "scoring with the model's own logits"
            )
        else:
            if not fused_exact:
                log(
                    f"{architecture}: the chunked head's log-probs differ from the model's own logits by "
                    f"{fused_error:.3g} (an output scaling preftune does not know?); scoring with the model's "
                    "own logits instead, which costs memory for full-vocabulary logits"
                )
        plain_logps = want if not fused_exact else got
        blind = _mask_blind_layers(_text_config(base))
        try:
            shared = score_batch(
                model,
                **collate_shared_prompt_pairs(prompts, chosen, rejected, 0, device),
                exact=not fused_exact,
            ).logps
            shared_error = float((shared.float() - plain_logps.float()).abs().max())
            if not bool(((shared.float() - plain_logps.float()).abs() <= tol).all()):
                reason = (
                    f"{architecture} gives other log-probs for shared-prompt rows than for plain rows "
                    f"(by {shared_error:.3g}: {blind or 'its layers do not follow the custom mask'})"
                )
            elif blind:
                reason = f"{architecture} has {blind}, which a shared-prompt row's custom mask does not cover"
            else:
                reason = None
        except Exception as failure:
            message = str(failure).splitlines()[0] if str(failure) else ""
            reason = f"{architecture} cannot run shared-prompt rows ({type(failure).__name__}: {message})"
    finally:
        base.train(was_training)
    probe = ScoringProbe(architecture, fused_exact, fused_error, reason)
    setattr(base, PROBE_ATTRIBUTE, probe)
    return probe


def shared_prompt_support(model: nn.Module, max_length: int) -> str | None:
    """None if :func:`collate_shared_prompt_pairs` batches give this model's exact numbers, else why not.

    They need a custom 4D mask that the model passes to attention unchanged (transformers does for
    sdpa and eager attention), no sliding window shorter than a sequence (the custom mask replaces the
    model's own, window included), and a model whose every layer respects that mask: the probe
    (:func:`probe_scoring`, run now if the model has no result yet) compares shared-prompt rows with
    plain rows, which rules out ALiBi biases and state-space layers.
    """
    backbone, _, _ = backbone_and_head(model)
    config = getattr(backbone, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attn_implementation={impl!r} takes no custom attention mask"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_length:
        return f"sliding_window={window} is shorter than max_length={max_length}"
    probe = getattr(_base_model(model), PROBE_ATTRIBUTE, None)
    if probe is None:
        probe = probe_scoring(model)
    return probe.shared_prompt
