"""Relative Preference Optimization (paired, unpaired, ablations) against loop re-derivations."""

import math

import pytest
import torch

import preftune.losses as L


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def batch(b: int, seed: int, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    rc = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    rr = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    pc = rc + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr, emb


def expected_weights(eq, ek, tau):
    """W_ij = exp(−D_ij/τ) / Σ_k exp(−D_ik/τ), D = 1 − cosine, by loops."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    q = [unit(r) for r in eq.tolist()]
    k = [unit(r) for r in ek.tolist()]
    w = []
    for qi in q:
        e = [math.exp(-(1 - sum(a * b for a, b in zip(qi, kj))) / tau) for kj in k]
        w.append([x / sum(e) for x in e])
    return w


def link_loss(link, z_margin, beta):
    if link == "sigmoid":
        return -log_sigmoid(beta * z_margin)
    if link == "ipo":
        return (z_margin - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * z_margin)


@pytest.mark.parametrize("link", ["sigmoid", "ipo", "hinge"])
def test_paired_rpo_matches_rederivation(link):
    pc, pr, rc, rr, emb = batch(7, seed=31)
    beta, tau = 0.2, 0.5
    out = L.preference_loss(
        pc, pr, rc, rr, beta=beta, pairing="rpo", prompt_embeddings=emb, tau=tau, link=link
    )
    w = expected_weights(emb, emb, tau)
    rows = []
    for i in range(7):
        row = []
        for j in range(7):
            s_ij = (pc[i].item() - rc[i].item()) - (pr[j].item() - rr[j].item())
            row.append(link_loss(link, w[i][j] * s_ij, beta))
        rows.append(sum(row) / 7)
    torch.testing.assert_close(out.losses, torch.tensor(rows, dtype=torch.float64), rtol=1e-11, atol=1e-12)
    assert out.metrics["rpo/weight_diag"].item() == pytest.approx(sum(w[i][i] for i in range(7)) / 7)
    if link == "sigmoid":
        torch.testing.assert_close(L.rpo(pc, pr, rc, rr, emb, beta=beta, tau=tau).losses, out.losses)


@pytest.mark.parametrize("w_diag", [0.8, 0.3])
def test_uniform_and_diagonal_ablations_match_rederivation(w_diag):
    pc, pr, rc, rr, _ = batch(6, seed=32)
    beta = 0.3
    uni = L.rpo_uniform(pc, pr, rc, rr, beta=beta)
    dia = L.rpo_diagonal(pc, pr, rc, rr, beta=beta, diagonal_weight=w_diag)
    exp_uni, exp_dia = [], []
    for i in range(6):
        s = [(pc[i].item() - rc[i].item()) - (pr[j].item() - rr[j].item()) for j in range(6)]
        exp_uni.append(sum(-log_sigmoid(beta * x / 6) for x in s) / 6)
        off = [-log_sigmoid(beta * s[j]) for j in range(6) if j != i]
        exp_dia.append(w_diag * -log_sigmoid(beta * s[i]) + (1 - w_diag) * sum(off) / 5)
    torch.testing.assert_close(uni.losses, torch.tensor(exp_uni, dtype=torch.float64), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dia.losses, torch.tensor(exp_dia, dtype=torch.float64), rtol=1e-12, atol=1e-13)


def test_weights_are_row_stochastic_and_scale_invariant():
    _, _, _, _, emb = batch(9, seed=33, d=32)
    for tau in (0.05, 0.25, 0.5, 2.0):
        w = L.rpo_weights(emb, tau=tau)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(1), torch.ones(9), rtol=0, atol=1e-6)
        scales = torch.rand(9, 1, dtype=torch.float64) * 100 + 1e-3
        torch.testing.assert_close(L.rpo_weights(emb * scales, tau=tau), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            L.rpo_weights(emb, tau=tau, dtype=torch.float64),
            torch.tensor(expected_weights(emb, emb, tau), dtype=torch.float64),
        )
    # bf16 embeddings are still weighted in float32 (docs/methods.md#rpo: W is never computed in bf16)
    assert L.rpo_weights(emb.bfloat16(), tau=0.5, dtype=torch.bfloat16).dtype == torch.float32


@pytest.mark.parametrize("fn", ["rpo", "rpo_uniform", "rpo_diagonal"])
def test_single_pair_is_dpo(fn):
    pc, pr, rc, rr, emb = batch(1, seed=34)
    extra = (emb,) if fn == "rpo" else ()
    ours = getattr(L, fn)(pc, pr, rc, rr, *extra, beta=0.4)
    torch.testing.assert_close(ours.losses, L.dpo(pc, pr, rc, rr, beta=0.4).losses, rtol=0, atol=0)


def test_zero_temperature_gradient_is_dpo_gradient_over_m():
    m = 6
    pc, pr, rc, rr, emb = batch(m, seed=35)
    a = [t.clone().requires_grad_(True) for t in (pc, pr)]
    L.rpo(a[0], a[1], rc, rr, emb, beta=0.3, tau=1e-4).loss.backward()
    b = [t.clone().requires_grad_(True) for t in (pc, pr)]
    L.dpo(b[0], b[1], rc, rr, beta=0.3).loss.backward()
    torch.testing.assert_close(a[0].grad, b[0].grad / m, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(a[1].grad, b[1].grad / m, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(L.rpo_weights(emb, tau=1e-4), torch.eye(m), rtol=0, atol=1e-30)


def test_permuting_pairs_with_their_embeddings_changes_nothing():
    pc, pr, rc, rr, emb = batch(10, seed=36)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    for fn, extra in (("rpo", True), ("rpo_uniform", False), ("rpo_diagonal", False)):
        args = (pc, pr, rc, rr) + ((emb,) if extra else ())
        pargs = (pc[perm], pr[perm], rc[perm], rr[perm]) + ((emb[perm],) if extra else ())
        a, b = getattr(L, fn)(*args), getattr(L, fn)(*pargs)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-13, atol=0)
        torch.testing.assert_close(b.losses, a.losses[perm], rtol=1e-13, atol=0)


def test_gradient_reaches_only_the_policy():
    pc, pr, rc, rr, emb = batch(5, seed=37)
    leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr, emb)]
    L.rpo(*leaves).loss.backward()
    assert all(t.grad is None for t in leaves[2:])
    assert torch.isfinite(leaves[0].grad).all() and leaves[0].grad.abs().sum() > 0


def test_float32_agrees_with_float64():
    pc, pr, rc, rr, emb = batch(16, seed=38)
    a = L.rpo(pc, pr, rc, rr, emb)
    b = L.rpo(pc.float(), pr.float(), rc.float(), rr.float(), emb.float())
    assert b.loss.dtype == torch.float32
    torch.testing.assert_close(b.losses.double(), a.losses, rtol=1e-4, atol=1e-5)


def test_unpaired_rpo_matches_rederivation():
    g = torch.Generator().manual_seed(39)
    n_c, n_r, beta, tau = 4, 6, 0.25, 0.4
    pc = -30 + 5 * torch.randn(n_c, generator=g, dtype=torch.float64)
    rc = -30 + 5 * torch.randn(n_c, generator=g, dtype=torch.float64)
    pr = -30 + 5 * torch.randn(n_r, generator=g, dtype=torch.float64)
    rr = -30 + 5 * torch.randn(n_r, generator=g, dtype=torch.float64)
    ec = torch.randn(n_c, 8, generator=g, dtype=torch.float64)
    er = torch.randn(n_r, 8, generator=g, dtype=torch.float64)
    out = L.rpo_unpaired(pc, rc, ec, pr, rr, er, beta=beta, tau=tau)
    w = expected_weights(ec, er, tau)
    rows = []
    for i in range(n_c):
        vals = []
        for j in range(n_r):
            s_ij = (pc[i].item() - rc[i].item()) - (pr[j].item() - rr[j].item())
            vals.append(-log_sigmoid(beta * w[i][j] * s_ij))
        rows.append(sum(vals) / n_r)
    torch.testing.assert_close(out.losses, torch.tensor(rows, dtype=torch.float64), rtol=1e-11, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(rows) / n_c, rel=1e-12)
    acc = sum((pc[i] - rc[i]).item() > (pr[j] - rr[j]).item() for i in range(n_c) for j in range(n_r))
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(acc / (n_c * n_r))
    assert out.chosen_rewards.shape == (n_c,) and out.rejected_rewards.shape == (n_r,)


@pytest.mark.parametrize("n_c,n_r", [(0, 3), (3, 0), (0, 0)])
def test_unpaired_rpo_with_an_empty_side_is_zero_without_nan(n_c, n_r):
    pc = (-10 * torch.rand(n_c)).requires_grad_(True)
    pr = (-10 * torch.rand(n_r)).requires_grad_(True)
    out = L.rpo_unpaired(pc, pc.detach() + 1, torch.randn(n_c, 4), pr, pr.detach() - 1, torch.randn(n_r, 4))
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    assert out.losses.shape == (n_c,) and not torch.isnan(out.losses).any()
    out.loss.backward()
    for t in (pc, pr):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_rpo_needs_its_embeddings():
    pc, pr, rc, rr, emb = batch(4, seed=40)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        L.preference_loss(pc, pr, rc, rr, pairing="rpo")
    with pytest.raises(ValueError, match="rows"):
        L.rpo(pc, pr, rc, rr, emb[:3])
    with pytest.raises(ValueError, match="tau"):
        L.rpo(pc, pr, rc, rr, emb, tau=0.0)
    with pytest.raises(ValueError, match="only used by pairing='rpo'"):
        L.dpo(pc, pr, rc, rr, prompt_embeddings=emb)
