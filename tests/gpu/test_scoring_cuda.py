"""The fused chunked head and shared-prompt rows on the device, against each model's own logits.

The CPU version is tests/engine/test_architectures.py (same tiny models, built by its ``build``); here
the models run on the GPU in fp32, in bf16 weights and under bf16 autocast (preftune's trainer: fp32
master weights, bf16 compute), forward and backward (the head's hand-written backward).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from engine.test_architectures import build, own_logps, pairs

from preftune.data.collate import collate_sequences, collate_shared_prompt_pairs
from preftune.scoring import (
    score_batch,
)
from preftune.scoring_probe import _tolerance as bf16_tolerance
from preftune.scoring_probe import probe_scoring, shared_prompt_support

from .conftest import relative, to

pytestmark = pytest.mark.gpu

# tiny Llama, Qwen3, Gemma 3 (final logit softcapping), Cohere (logit_scale), Granite (logits_scaling)
ARCHITECTURES = ["llama", "qwen3", "gemma3_text", "cohere", "granite"]
# mode -> (weights dtype, autocast dtype)
MODES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "autocast": (torch.float32, torch.bfloat16),
}


def _context(device, autocast_dtype):
    return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()


def _close(got, want, low_precision: bool) -> None:
    if low_precision:  # the probe's own tolerance for half precision: every logit is rounded
        assert ((got.float() - want.float()).abs() <= bf16_tolerance(want.float(), torch.bfloat16)).all(), (
            got,
            want,
        )
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ARCHITECTURES)
@torch.no_grad()
def test_fused_head_equals_the_models_own_logits_on_the_device(name, mode, device):
    weights, autocast_dtype = MODES[mode]
    cpu_model = build(name)
    prompts, chosen, rejected = pairs()
    plain_cpu = collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0)
    fp32_cpu = own_logps(cpu_model, plain_cpu)  # the answer in fp32, on the CPU

    model = build(name).to(device=device, dtype=weights)
    plain = to(plain_cpu, device)
    with _context(device, autocast_dtype):
        want = own_logps(model, plain)
        fused = score_batch(model, **plain, exact=False).logps
        exact = score_batch(model, **plain, exact=True).logps
        probe = probe_scoring(model)
    low = weights != torch.float32 or autocast_dtype is not None
    assert probe.fused_exact, probe  # the probe, run on the device in this precision, keeps the fused head
    _close(fused, want, low)
    _close(exact, want, low)
    _close(want.cpu(), fp32_cpu, low)  # the device's own answer is the CPU's, to the precision's rounding
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
@pytest.mark.parametrize("name", ["llama", "gemma3_text", "cohere"])
def test_fused_head_gradients_equal_autograd_through_the_models_logits(name, mode, device):
    weights, autocast_dtype = MODES[mode]
    prompts, chosen, rejected = pairs()
    plain = to(collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0), device)
    grads = {}
    for path in ("own", "fused"):
        model = build(name).to(device=device, dtype=weights).train()
        with _context(device, autocast_dtype):
            logps = (
                own_logps(model, plain) if path == "own" else score_batch(model, **plain, exact=False).logps
            )
            (logps * torch.linspace(0.5, 1.5, logps.numel(), device=device)).sum().backward()
        grads[path] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["own"].keys() == grads["fused"].keys()
    bound = 2e-2 if autocast_dtype else 1e-4  # fp32: reduction order only
    for n, g in grads["own"].items():
        if g.norm() > 0:
            assert relative(grads["fused"][n], g) <= bound, (n, relative(grads["fused"][n], g))


def _long_pairs(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(48, 30, 20), (20, 50, 40), (60, 8, 30)]  # prompt, chosen, rejected; positions < 128
    return [ids(p) for p, _, _ in lengths], [ids(c) for _, c, _ in lengths], [ids(r) for _, _, r in lengths]


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
@pytest.mark.parametrize(
    "name, make_pairs",
    [
        ("llama", pairs),
        ("qwen3", pairs),
        ("gemma3_text", pairs),
        ("llama", _long_pairs),
        ("qwen3", _long_pairs),
    ],
    ids=["llama", "qwen3", "gemma3_text", "llama-long", "qwen3-long"],
)
def test_shared_prompt_rows_equal_plain_rows_on_the_device(name, make_pairs, mode, device):
    """One ``prompt | chosen | rejected`` row per pair (a 4D mask through SDPA on the GPU) gives the
    log-probs and the gradients of two plain rows."""
    weights, autocast_dtype = MODES[mode]
    prompts, chosen, rejected = make_pairs()
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
    model = build(name).to(device=device, dtype=weights).train()
    assert shared_prompt_support(model, max_length=longest) is None
    plain = to(collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0), device)
    shared = to(collate_shared_prompt_pairs(prompts, chosen, rejected, 0), device)
    out, grads = {}, {}
    for kind, batch in (("plain", plain), ("shared", shared)):
        model.zero_grad(set_to_none=True)
        with _context(device, autocast_dtype):
            logps = score_batch(model, **batch).logps
            logps.sum().backward()
        out[kind] = logps.detach()
        grads[kind] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    low = autocast_dtype is not None
    _close(out["shared"], out["plain"], low)
    for n, g in grads["plain"].items():
        if g.norm() > 0:
            assert relative(grads["shared"][n], g) <= (2e-2 if low else 1e-4), n
