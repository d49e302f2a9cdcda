"""MallowsPO: the pairwise link against brute-force Mallows enumeration, its numerics, and the losses."""

import itertools
import math

import numpy as np
import pytest
import torch

import preftune.losses as L

PHIS = [1e-6, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999, 1 - 1e-6]


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def naive_link(s: float, phi: float) -> float:
    """The Mallows link g_φ of docs/methods.md#mallows_phi, verbatim (fine in float64 for moderate s and φ)."""

    def h(k: float) -> float:
        return -1 / math.log(phi) if k == 0 else k / (1 - phi**k)

    if s >= 0:
        return h(s + 1) - h(s)
    return 1 - (h(-s + 1) - h(-s))


def brute_force_marginals(n: int, phi: float) -> np.ndarray:
    """P[i, j] = P(item i ranked above item j) under P(σ) ∝ φ^{Kendall(σ, identity)}."""
    perms = np.array(list(itertools.permutations(range(n))))  # perms[p, position] = item
    pos = np.argsort(perms, axis=1)  # pos[p, item] = position
    inversions = sum((perms[:, a] > perms[:, b]).astype(np.int64) for a in range(n) for b in range(a + 1, n))
    w = phi ** inversions.astype(np.float64)
    w /= w.sum()
    above = pos[:, :, None] < pos[:, None, :]
    return np.einsum("p,pij->ij", w, above)


@pytest.mark.parametrize("n", [3, 5, 7])
@pytest.mark.parametrize("phi", [0.02, 0.25, 0.5, 0.8, 0.97])
def test_link_equals_brute_force_mallows_marginals(n, phi):
    marg = brute_force_marginals(n, phi)
    s = torch.arange(1, n, dtype=torch.float64)
    g = L.mallows_link(s, torch.tensor(phi, dtype=torch.float64))
    for i in range(n):
        for step in range(1, n - i):
            assert abs(marg[i, i + step] - g[step - 1].item()) < 1e-9, (n, phi, i, step)
            assert abs(marg[i + step, i] - L.mallows_link(-s[step - 1], phi).item()) < 1e-9
    assert g[0].item() == pytest.approx(1 / (1 + phi), rel=1e-13)


def _grid(dtype):
    mags = torch.cat(
        [torch.logspace(-8, 4, 61, dtype=torch.float64), torch.arange(1, 11, dtype=torch.float64)]
    )
    s = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])
    phi = torch.tensor(PHIS, dtype=torch.float64)
    s, phi = torch.meshgrid(s, phi, indexing="ij")
    return s.to(dtype).contiguous(), phi.to(dtype).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_link_is_finite_bounded_and_has_finite_gradients_on_the_grid(dtype):
    s, phi = _grid(dtype)
    s.requires_grad_(True)
    phi.requires_grad_(True)
    log_g = L.mallows_log_link(s, phi)
    g = L.mallows_link(s, phi)
    assert log_g.dtype == dtype and g.dtype == dtype
    assert torch.isfinite(log_g).all() and (log_g <= 0).all()
    assert torch.isfinite(g).all() and (g >= 0).all() and (g <= 1).all()
    for out in (log_g, g):
        gs, gp = torch.autograd.grad(out.sum(), (s, phi), retain_graph=True)
        assert torch.isfinite(gs).all() and torch.isfinite(gp).all()
    # the loss gradient too: −log g is what training differentiates
    (gs,) = torch.autograd.grad((-log_g).sum(), (s,))
    assert (gs <= 0).all()  # a larger margin never increases the loss


def test_link_matches_high_precision_closed_form_everywhere():
    mpmath = pytest.importorskip("mpmath")
    s, phi = _grid(torch.float64)
    log_g = L.mallows_log_link(s, phi).flatten()
    log_g32 = L.mallows_log_link(s.float(), phi.float()).flatten()

    def exact_log_link(sv: float, pv: float) -> float:
        a = -mpmath.log(mpmath.mpf(pv))

        def h(k):
            return 1 / a if k == 0 else k / (1 - mpmath.exp(-a * k))

        t = abs(mpmath.mpf(sv))
        g_pos = h(t + 1) - h(t)
        return float(mpmath.log(g_pos if sv >= 0 else 1 - g_pos))

    checked = 0
    for idx in range(0, s.numel(), 5):
        sv, pv = s.flatten()[idx].item(), phi.flatten()[idx].item()
        if log_g[idx].item() < -3000:
            continue  # 1 − g would need thousands of digits
        # 1 − g for very negative margins cancels catastrophically: carry enough digits
        with mpmath.workdps(40 + int(-log_g[idx].item() / 2.3)):
            exact = exact_log_link(sv, pv)
            exact32 = exact_log_link(float(np.float32(sv)), float(np.float32(pv)))
        assert abs(log_g[idx].item() - exact) <= 1e-12 * max(1.0, abs(exact)), (sv, pv)
        # float32 evaluation agrees with the exact value at the float32-rounded inputs
        assert abs(log_g32[idx].item() - exact32) <= 5e-6 * max(1.0, abs(exact32)), (sv, pv)
        checked += 1
    assert checked > 300


def test_symmetry_jump_and_limits():
    s = torch.cat([torch.logspace(-6, 4, 50, dtype=torch.float64), torch.arange(1, 20, dtype=torch.float64)])
    for phi in PHIS:
        g_pos, g_neg = L.mallows_link(s, phi), L.mallows_link(-s, phi)
        torch.testing.assert_close(g_pos + g_neg, torch.ones_like(s), rtol=0, atol=1e-14)
        # jump at 0: g(0) = 1/(1−φ) + 1/log φ > 1/2, and the left limit is 1 − g(0)
        g0 = L.mallows_link(torch.tensor(0.0, dtype=torch.float64), phi).item()
        if 1e-3 < phi < 0.999:
            assert g0 == pytest.approx(1 / (1 - phi) + 1 / math.log(phi), rel=1e-12)
        assert g0 > 0.5
        left = L.mallows_link(torch.tensor(-1e-12, dtype=torch.float64), phi).item()
        assert left == pytest.approx(1 - g0, abs=1e-9)
        # non-decreasing in s
        full = L.mallows_link(torch.linspace(-30, 30, 2001, dtype=torch.float64), phi)
        assert (full.diff() >= -1e-15).all()
    # φ → 1: g → 1/2 for every s, with |g − 1/2| ≲ (−log φ)·(|s| + 1)
    for k in range(2, 9):
        phi = 1 - 10.0**-k
        dev = (L.mallows_link(torch.cat([-s, s]), phi) - 0.5).abs()
        assert (dev <= -math.log(phi) * (torch.cat([s, s]) + 1)).all()
    torch.testing.assert_close(L.mallows_link(s, 1.0), torch.full_like(s, 0.5), rtol=0, atol=1e-12)


def test_link_gradcheck_away_from_zero():
    s = torch.tensor([-40.0, -3.3, -0.7, -0.01, 0.01, 0.5, 1.0, 2.5, 17.0], dtype=torch.float64)
    for phi in (0.01, 0.3, 0.9, 0.999):
        p = torch.full_like(s, phi)
        assert torch.autograd.gradcheck(
            L.mallows_log_link, (s.clone().requires_grad_(True), p.requires_grad_(True))
        )


def batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rc = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    rr = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    pc = rc + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_mallows_theta_and_phi_match_rederivation(eps):
    pc, pr, rc, rr = batch(12, seed=21)
    g = torch.Generator().manual_seed(3)
    c = 0.2 + 2 * torch.rand(12, generator=g, dtype=torch.float64)
    phi = 0.05 + 0.9 * torch.rand(12, generator=g, dtype=torch.float64)
    beta = 0.25
    theta = L.mallows_theta(pc, pr, rc, rr, c, beta=beta, label_smoothing=eps)
    mphi = L.mallows_phi(pc, pr, rc, rr, phi, beta=beta, label_smoothing=eps)
    exp_theta, exp_phi = [], []
    for i in range(12):
        delta = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        z = c[i].item() * beta * delta
        exp_theta.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
        s = beta * delta
        exp_phi.append(
            -(1 - eps) * math.log(naive_link(s, phi[i].item()))
            - eps * math.log(naive_link(-s, phi[i].item()))
        )
    torch.testing.assert_close(
        theta.losses, torch.tensor(exp_theta, dtype=torch.float64), rtol=1e-12, atol=1e-13
    )
    torch.testing.assert_close(mphi.losses, torch.tensor(exp_phi, dtype=torch.float64), rtol=1e-9, atol=1e-11)
    assert theta.metrics["mallows/neg_log_dispersion"].item() == pytest.approx(c.mean().item())
    assert mphi.metrics["mallows/dispersion"].item() == pytest.approx(phi.mean().item())


def test_theta_with_unit_dispersion_is_dpo():
    pc, pr, rc, rr = batch(16, seed=22)
    for eps in (0.0, 0.1):
        ours = L.mallows_theta(
            pc, pr, rc, rr, torch.ones(16, dtype=torch.float64), beta=0.3, label_smoothing=eps
        )
        ref = L.dpo(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
        torch.testing.assert_close(ours.losses, ref.losses, rtol=0, atol=0)


def test_mallows_losses_gradients_reach_only_the_policy_and_are_finite():
    pc, pr, rc, rr = batch(8, seed=23)
    pc.requires_grad_(True)
    c = torch.rand(8, dtype=torch.float64, requires_grad=True)
    phi = torch.rand(8, dtype=torch.float64).clamp(0.01, 0.99).requires_grad_(True)
    ref = rc.clone().requires_grad_(True)
    L.mallows_theta(pc, pr, ref, rr, c).loss.backward()
    assert c.grad is None and ref.grad is None and torch.isfinite(pc.grad).all()
    pc.grad = None
    # huge margins both ways: the Mallows loss stays finite with finite gradients
    big = torch.tensor([1e5, -1e5, 0.0, 3.0, -3.0, 1e3, -1e3, 1e-9], dtype=torch.float64)
    out = L.mallows_phi(pc, pc.detach() - big, rc * 0, rc * 0, phi, beta=1.0)
    out.loss.backward()
    assert phi.grad is None and torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()


def test_float32_agrees_with_float64():
    pc, pr, rc, rr = batch(32, seed=24)
    c = torch.rand(32, dtype=torch.float64) + 0.5
    phi = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
    for fn, extra in ((L.mallows_theta, c), (L.mallows_phi, phi)):
        a = fn(pc, pr, rc, rr, extra)
        b = fn(pc.float(), pr.float(), rc.float(), rr.float(), extra.float())
        assert b.loss.dtype == torch.float32
        torch.testing.assert_close(b.losses.double(), a.losses, rtol=1e-4, atol=1e-5)
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
        p = fn(pc[perm], pr[perm], rc[perm], rr[perm], extra[perm])
        torch.testing.assert_close(p.losses, a.losses[perm], rtol=0, atol=0)


def test_dispersion_from_entropy():
    hc = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    hr = torch.tensor([0.3, 0.5, 0.7, 0.05], dtype=torch.float64)
    c = L.neg_log_dispersion(hc, hr, 0.29)
    expected = [-0.29 * math.log((a + b) / 2) for a, b in zip(hc.tolist(), hr.tolist())]
    torch.testing.assert_close(c, torch.tensor(expected, dtype=torch.float64))
    phi_star = L.calibrate_phi_star(hc, hr)
    assert phi_star == pytest.approx(1 / (sum(e / 0.29 for e in expected) / 4))
    assert L.neg_log_dispersion(hc, hr, phi_star).mean().item() == pytest.approx(1.0)
    # φ = exp(−c) = H̄^φ*
    torch.testing.assert_close(torch.exp(-c), ((hc + hr) / 2) ** 0.29)
    # no gradient to the entropies; degenerate entropies stay finite
    h = hc.clone().requires_grad_(True)
    assert not L.neg_log_dispersion(h, hr, 1.0).requires_grad
    assert torch.isfinite(L.neg_log_dispersion(torch.zeros(2), torch.zeros(2), 1.0)).all()
    with pytest.raises(ValueError):
        L.calibrate_phi_star(torch.ones(3), torch.ones(3))


def test_neg_log_dispersion_keeps_float64_precision_of_phi_star():
    import torch

    from preftune.losses import calibrate_phi_star, neg_log_dispersion

    g = torch.Generator().manual_seed(0)
    hc = torch.rand(50, generator=g, dtype=torch.float64) * 0.8 + 0.1
    hr = torch.rand(50, generator=g, dtype=torch.float64) * 0.8 + 0.1
    c = neg_log_dispersion(hc, hr, calibrate_phi_star(hc, hr))
    assert c.dtype == torch.float64
    assert abs(float(c.mean()) - 1.0) < 1e-12
