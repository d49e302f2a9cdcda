"""DPO, IPO, hinge and the generic options, against float64 re-derivations written here."""

import math

import pytest
import torch

import preftune.losses as L


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def batch(b: int, seed: int, dtype=torch.float64):
    """Plausible summed log-probs: negative, tens of nats, policy near its reference."""
    g = torch.Generator().manual_seed(seed)
    rc = -5 - 55 * torch.rand(b, generator=g, dtype=torch.float64)
    rr = -5 - 55 * torch.rand(b, generator=g, dtype=torch.float64)
    pc = rc + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (pc, pr, rc, rr)]


def expected_pair_loss(kind: str, delta: float, beta: float, eps: float = 0.0) -> float:
    if kind == "dpo":
        return -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    if kind == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - beta * delta)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,beta,eps",
    [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.1), ("dpo", 0.05, 0.3), ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0)]
    + [("hinge", 0.1, 0.0), ("hinge", 0.7, 0.0)],
)
def test_matches_float64_rederivation(kind, beta, eps):
    pc, pr, rc, rr = batch(16, seed=1)
    kwargs = {"label_smoothing": eps} if eps else {}
    out = getattr(L, kind)(pc, pr, rc, rr, beta=beta, **kwargs)
    expected = []
    for i in range(16):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected.append(expected_pair_loss(kind, delta, beta, eps))
    torch.testing.assert_close(
        out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert out.loss.item() == pytest.approx(sum(expected) / 16, rel=1e-12)

    rw = [beta * (pc[i].item() - rc[i].item()) for i in range(16)]
    rl = [beta * (pr[i].item() - rr[i].item()) for i in range(16)]
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(sum(rw) / 16, rel=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rl) / 16, rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx((sum(rw) - sum(rl)) / 16, rel=1e-12, abs=1e-12)
    assert m["rewards/accuracies"].item() == pytest.approx(sum(a > b for a, b in zip(rw, rl)) / 16)
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item())
    assert m["logps/rejected"].item() == pytest.approx(pr.mean().item())
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(rw, dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(rl, dtype=torch.float64))
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_reference_free_with_margin_is_simpo_style():
    pc, pr, _, _ = batch(8, seed=2)
    beta, gamma = 2.0, 0.5
    out = L.dpo(pc, pr, None, None, beta=beta, reference_free=True, gamma=gamma)
    expected = [-log_sigmoid(beta * (pc[i].item() - pr[i].item() - gamma)) for i in range(8)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    # rewards are the policy log-probs themselves
    torch.testing.assert_close(out.chosen_rewards, beta * pc)
    with pytest.raises(ValueError, match="reference_free"):
        L.mrpo(pc, pr, torch.stack([pc, pc]), torch.stack([pr, pr]), reference_free=True)


def test_sft_term_is_added_per_pair():
    pc, pr, rc, rr = batch(6, seed=3)
    lengths = torch.tensor([3, 7, 1, 12, 5, 9])
    lam = 0.3
    base = L.dpo(pc, pr, rc, rr)
    out = L.dpo(pc, pr, rc, rr, sft_weight=lam, chosen_lengths=lengths)
    expected = [base.losses[i].item() + lam * (-pc[i].item() / lengths[i].item()) for i in range(6)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    assert out.metrics["nll_loss"].item() == pytest.approx(
        sum(-pc[i].item() / lengths[i].item() for i in range(6)) / 6
    )
    # the two terms are logged apart and make up the loss: preference term + λ·nll_loss
    assert out.metrics["loss/sigmoid"].item() == pytest.approx(base.loss.item())
    assert out.loss.item() == pytest.approx(
        out.metrics["loss/sigmoid"].item() + lam * out.metrics["nll_loss"].item()
    )
    assert "loss/sigmoid" not in base.metrics  # a one-term loss is ``loss`` alone
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo(pc, pr, rc, rr, sft_weight=lam)


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge"])
def test_float32_agrees_with_float64_and_low_precision_is_upcast(name):
    p64 = batch(32, seed=4)
    out64 = getattr(L, name)(*p64, beta=0.1)
    out32 = getattr(L, name)(*[t.float() for t in p64], beta=0.1)
    assert out64.loss.dtype == torch.float64 and out32.loss.dtype == torch.float32
    torch.testing.assert_close(out32.losses.double(), out64.losses, rtol=2e-4, atol=2e-5)
    out16 = getattr(L, name)(*[t.bfloat16() for t in p64], beta=0.1)
    assert out16.loss.dtype == torch.float32


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge"])
def test_independent_of_batch_order(name):
    pc, pr, rc, rr = batch(12, seed=5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    a = getattr(L, name)(pc, pr, rc, rr)
    b = getattr(L, name)(pc[perm], pr[perm], rc[perm], rr[perm])
    torch.testing.assert_close(b.losses, a.losses[perm], rtol=0, atol=0)
    torch.testing.assert_close(b.loss, a.loss)


def test_gradient_reaches_only_the_policy_and_is_the_dpo_gradient():
    pc, pr, rc, rr = batch(8, seed=6)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    beta = 0.3
    L.dpo(pc, pr, rc, rr, beta=beta).loss.backward()
    assert rc.grad is None and rr.grad is None
    for i in range(8):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        d = -beta * (1 - math.exp(log_sigmoid(beta * delta))) / 8  # d/dΔ of −log σ(βΔ), / B
        assert pc.grad[i].item() == pytest.approx(d, rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(-d, rel=1e-10)


def test_bad_inputs_are_rejected():
    pc, pr, rc, rr = batch(4, seed=7)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.ipo(pc, pr, rc, rr, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        L.dpo(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="reference log-probs are required"):
        L.dpo(pc, pr, None, None)
    with pytest.raises(ValueError, match="batch"):
        L.dpo(pc, pr, rc[:3], rr[:3])
    with pytest.raises(ValueError, match="link"):
        L.preference_loss(pc, pr, rc, rr, link="logistic")


def test_empty_batch_gives_zero_without_nan():
    pc = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    out = L.dpo(pc, pc, pc.detach(), pc.detach())
    assert out.loss.item() == 0.0 and out.loss.requires_grad
