"""MRPO / MDPO against a plain-Python float64 re-derivation of docs/methods.md#mrpo, and its reductions to DPO."""

import math

import pytest
import torch

import preftune.losses as L


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def refs_batch(k: int, b: int, seed: int, spread: float = 8.0):
    """K references that disagree by a few nats around a primary, plus a policy near the primary."""
    g = torch.Generator().manual_seed(seed)
    base_c = -10 - 50 * torch.rand(b, generator=g, dtype=torch.float64)
    base_r = -10 - 50 * torch.rand(b, generator=g, dtype=torch.float64)
    rc = base_c + spread * torch.randn(k, b, generator=g, dtype=torch.float64)
    rr = base_r + spread * torch.randn(k, b, generator=g, dtype=torch.float64)
    pc = rc[0] + 3 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr[0] + 3 * torch.randn(b, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr


def expected_pair(lc, lr, weights=None, eps=0.1, clip="adaptive"):
    """The virtual reference with ARWC weights and CTRO clipping (docs/methods.md#mrpo) for one pair: lc, lr are lists of K reference log-probs (all negative)."""
    k = len(lc)
    if weights is None:  # ARWC from the unclipped log-probs
        m = [abs(lc[j] - lr[j]) for j in range(k)]
        alpha = [x / sum(m) for x in m]
    else:
        alpha = [w / sum(weights) for w in weights]
    if clip == "adaptive":
        bw, bl = sum(lc) / k, sum(lr) / k
        ew = eps * abs(bw) / (abs(bw) + abs(bl))
        el = eps - ew
    elif clip == "fixed":
        ew = el = eps
    else:
        ew = el = None

    def clipped(vals, e):
        if e is None:
            return list(vals)
        lo, hi = vals[0] * (1 + e), vals[0] * (1 - e)  # negative log-probs: lo <= hi
        return [vals[0]] + [min(max(v, lo), hi) for v in vals[1:]]

    cc, cr = clipped(lc, ew), clipped(lr, el)
    vc = -math.log(sum(a * math.exp(-x) for a, x in zip(alpha, cc)))
    vr = -math.log(sum(a * math.exp(-x) for a, x in zip(alpha, cr)))
    return vc, vr, alpha, cc, cr


@pytest.mark.parametrize("clip", ["adaptive", "fixed", "none"])
@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 0.3], [3.0, 0.0, 1.0]])
def test_mrpo_and_mdpo_match_rederivation(clip, weights):
    pc, pr, rc, rr = refs_batch(3, 10, seed=11)
    beta, eps = 0.2, 0.15
    w = "adaptive" if weights is None else weights
    out = L.mrpo(pc, pr, rc, rr, beta=beta, weights=w, clip_eps=eps, clip=clip)
    out_md = L.mdpo(pc, pr, rc, rr, beta=beta, weights=w, clip_eps=eps, clip=clip)
    vc_t, vr_t = L.virtual_reference(rc, rr, weights=w, clip_eps=eps, clip=clip)
    exp_mrpo, exp_mdpo, alphas = [], [], []
    for i in range(10):
        vc, vr, alpha, cc, cr = expected_pair(rc[:, i].tolist(), rr[:, i].tolist(), weights, eps, clip)
        assert vc_t[i].item() == pytest.approx(vc, rel=1e-12)
        assert vr_t[i].item() == pytest.approx(vr, rel=1e-12)
        delta = (pc[i].item() - vc) - (pr[i].item() - vr)
        exp_mrpo.append(-log_sigmoid(beta * delta))
        exp_mdpo.append(
            sum(
                a * -log_sigmoid(beta * ((pc[i].item() - c) - (pr[i].item() - r)))
                for a, c, r in zip(alpha, cc, cr)
            )
        )
        alphas.append(alpha)
    torch.testing.assert_close(
        out.losses, torch.tensor(exp_mrpo, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        out_md.losses, torch.tensor(exp_mdpo, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    for k in range(3):
        mean_alpha = sum(a[k] for a in alphas) / 10
        assert out.metrics[f"mrpo/alpha_{k}"].item() == pytest.approx(mean_alpha, rel=1e-12, abs=1e-15)
        assert out_md.metrics[f"mdpo/alpha_{k}"].item() == pytest.approx(mean_alpha, rel=1e-12, abs=1e-15)
    # logged rewards are against the virtual reference
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - vc_t))


def test_alpha_is_computed_from_unclipped_log_probs():
    # reference 1 separates the pair strongly before clipping; clipping squeezes it onto the primary
    rc = torch.tensor([[-20.0], [-5.0]], dtype=torch.float64)
    rr = torch.tensor([[-21.0], [-40.0]], dtype=torch.float64)
    alpha = L.arwc_weights(rc, rr)
    torch.testing.assert_close(alpha[:, 0], torch.tensor([1 / 36, 35 / 36], dtype=torch.float64))
    out = L.mrpo(torch.tensor([-19.0]), torch.tensor([-22.0]), rc, rr, clip_eps=0.1, clip="fixed")
    assert out.metrics["mrpo/alpha_1"].item() == pytest.approx(35 / 36, rel=1e-6)
    cc, cr = L.ctro_clip(rc, rr, 0.1, "fixed")
    assert cc[1, 0].item() == pytest.approx(-18.0) and cr[1, 0].item() == pytest.approx(-23.1)
    assert out.metrics["mrpo/clip_fraction"].item() == 1.0


@pytest.mark.parametrize("fn", [L.mrpo, L.mdpo])
@pytest.mark.parametrize("weights", ["adaptive", [1.0]])
def test_single_reference_is_exactly_dpo(fn, weights):
    pc, pr, rc, rr = refs_batch(1, 16, seed=12)
    for label_smoothing in (0.0, 0.2):
        ours = fn(pc, pr, rc, rr, beta=0.3, weights=weights, label_smoothing=label_smoothing)
        ref = L.dpo(pc, pr, rc[0], rr[0], beta=0.3, label_smoothing=label_smoothing)
        torch.testing.assert_close(ours.losses, ref.losses, rtol=0, atol=0)
        torch.testing.assert_close(ours.chosen_rewards, ref.chosen_rewards, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [L.mrpo, L.mdpo])
@pytest.mark.parametrize("clip", ["adaptive", "fixed"])
@pytest.mark.parametrize("weights", ["adaptive", [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]])
def test_zero_radius_is_dpo_with_the_primary(fn, clip, weights):
    pc, pr, rc, rr = refs_batch(3, 16, seed=13)
    ours = fn(pc, pr, rc, rr, beta=0.2, weights=weights, clip_eps=0.0, clip=clip)
    ref = L.dpo(pc, pr, rc[0], rr[0], beta=0.2)
    torch.testing.assert_close(ours.losses, ref.losses, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("fn", [L.mrpo, L.mdpo])
@pytest.mark.parametrize("clip,eps", [("none", 0.1), ("fixed", 1e3), ("adaptive", 1e4)])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_weights_are_dpo_with_that_reference(fn, clip, eps, k):
    pc, pr, rc, rr = refs_batch(3, 16, seed=14)
    one_hot = [1.0 if j == k else 0.0 for j in range(3)]
    ours = fn(pc, pr, rc, rr, beta=0.2, weights=one_hot, clip_eps=eps, clip=clip)
    ref = L.dpo(pc, pr, rc[k], rr[k], beta=0.2)
    torch.testing.assert_close(ours.losses, ref.losses, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("clip", ["adaptive", "fixed", "none"])
def test_virtual_reference_lies_between_the_clipped_references(clip):
    _, _, rc, rr = refs_batch(4, 256, seed=15, spread=20.0)
    for weights in ("adaptive", [0.7, 0.1, 0.1, 0.1]):
        vc, vr = L.virtual_reference(rc, rr, weights=weights, clip_eps=0.3, clip=clip)
        cc, cr = L.ctro_clip(rc, rr, 0.3, clip)
        for v, c in ((vc, cc), (vr, cr)):
            assert bool((v >= c.min(0).values - 1e-9).all()) and bool((v <= c.max(0).values + 1e-9).all())
            assert bool((v > c.min(0).values + 1e-6).any())  # not trivially the minimum


def test_zero_weights_and_infinite_log_probs_give_no_nan():
    pc = torch.tensor([-10.0, -12.0], requires_grad=True)
    pr = torch.tensor([-11.0, -9.0], requires_grad=True)
    rc = torch.tensor([[-10.5, -11.0], [-float("inf"), -11.0]])
    rr = torch.tensor([[-10.0, -10.0], [-9.0, -10.0]])
    # α_1 = 0 for a reference that gives −inf: the term is dropped, never −inf + inf
    out = L.mrpo(pc, pr, rc, rr, weights=[1.0, 0.0], clip="none")
    out.loss.backward()
    assert (
        torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    )
    torch.testing.assert_close(out.losses, L.dpo(pc, pr, rc[0], rr[0]).losses)
    # adaptive: pair 2 has m_0 = −1, m_1 = −1 ... and a pair whose margins are all zero falls back to uniform
    flat_c = torch.tensor([[-5.0], [-7.0]])
    alpha = L.arwc_weights(flat_c, flat_c.clone())
    torch.testing.assert_close(alpha, torch.full((2, 1), 0.5))
    out = L.mrpo(torch.tensor([-4.0], requires_grad=True), torch.tensor([-6.0]), flat_c, flat_c.clone())
    assert torch.isfinite(out.loss)


def test_gradient_reaches_only_the_policy():
    pc, pr, rc, rr = refs_batch(3, 8, seed=16)
    leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    for fn in (L.mrpo, L.mdpo):
        for weights in ("adaptive", w):
            for t in leaves:
                t.grad = None
            fn(*leaves, weights=weights).loss.backward()
            assert leaves[2].grad is None and leaves[3].grad is None and w.grad is None
            assert torch.isfinite(leaves[0].grad).all() and leaves[0].grad.abs().sum() > 0


def test_fixed_weights_are_normalised_and_validated():
    pc, pr, rc, rr = refs_batch(2, 8, seed=17)
    a = L.mrpo(pc, pr, rc, rr, weights=[2.0, 6.0])
    b = L.mrpo(pc, pr, rc, rr, weights=[0.25, 0.75])
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="K = 2"):
        L.mrpo(pc, pr, rc, rr, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        L.mrpo(pc, pr, rc, rr, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="clip"):
        L.mrpo(pc, pr, rc, rr, clip="soft")


def test_float32_agrees_with_float64_and_batch_order_is_irrelevant():
    pc, pr, rc, rr = refs_batch(3, 24, seed=18)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    for fn in (L.mrpo, L.mdpo):
        out64 = fn(pc, pr, rc, rr)
        out32 = fn(pc.float(), pr.float(), rc.float(), rr.float())
        torch.testing.assert_close(out32.losses.double(), out64.losses, rtol=1e-4, atol=1e-5)
        outp = fn(pc[perm], pr[perm], rc[:, perm], rr[:, perm])
        torch.testing.assert_close(outp.losses, out64.losses[perm], rtol=0, atol=0)


# -- per-pair weights, the released code's pairing, validation weights -----------------------------


def released_code_loss(pc, pr, rc, rr, beta=0.1, eps=0.1, swap=True):
    """Transliteration (written from its description) of the MRPO authors' released two-reference loss.

    Per pair: margins of both references from the unclipped log-probs; the weight computed from the
    second reference's margin multiplies the primary reference's term (``swap=True``, as released);
    the second reference is clipped into the adaptive CTRO band around the primary; the virtual
    reference is the weighted harmonic mix in probability space; then DPO's sigmoid loss.
    ``swap=False`` attaches each weight to its own reference, as the paper states.
    """
    out = []
    for i in range(len(pc)):
        c1, r1, c2, r2 = float(rc[0, i]), float(rr[0, i]), float(rc[1, i]), float(rr[1, i])
        m1, m2 = abs(c1 - r1), abs(c2 - r2)
        w_from_1, w_from_2 = m1 / (m1 + m2), m2 / (m1 + m2)
        w_primary, w_second = (w_from_2, w_from_1) if swap else (w_from_1, w_from_2)
        bw, bl = abs((c1 + c2) / 2), abs((r1 + r2) / 2)
        eps_w = eps * bw / (bw + bl)
        eps_l = eps - eps_w
        c2 = min(max(c2, c1 - eps_w * abs(c1)), c1 + eps_w * abs(c1))
        r2 = min(max(r2, r1 - eps_l * abs(r1)), r1 + eps_l * abs(r1))
        vc = -math.log(w_primary * math.exp(-c1) + w_second * math.exp(-c2))
        vr = -math.log(w_primary * math.exp(-r1) + w_second * math.exp(-r2))
        z = beta * ((float(pc[i]) - vc) - (float(pr[i]) - vr))
        out.append(-log_sigmoid(z))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_adaptive_released_matches_the_released_code_and_adaptive_is_it_swapped(eps):
    pc, pr, rc, rr = refs_batch(2, 16, seed=21)
    released = L.mrpo(pc, pr, rc, rr, weights="adaptive_released", clip_eps=eps).losses
    adaptive = L.mrpo(pc, pr, rc, rr, weights="adaptive", clip_eps=eps).losses
    torch.testing.assert_close(released, released_code_loss(pc, pr, rc, rr, eps=eps), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(
        adaptive, released_code_loss(pc, pr, rc, rr, eps=eps, swap=False), rtol=1e-12, atol=1e-13
    )
    # the pairing matters: with unequal margins the two differ (wide band so clipping does not hide it)
    assert (released - adaptive).abs().max() > 1e-3
    # ... and the released pairing is exactly adaptive with per-pair weights swapped
    alpha = L.arwc_weights(rc, rr)
    swapped = L.mrpo(pc, pr, rc, rr, weights=alpha.flip(0), clip_eps=eps).losses
    torch.testing.assert_close(swapped, released, rtol=0, atol=1e-14)


def test_adaptive_released_needs_exactly_two_references():
    pc, pr, rc, rr = refs_batch(3, 4, seed=22)
    with pytest.raises(ValueError, match="exactly 2 references"):
        L.mrpo(pc, pr, rc, rr, weights="adaptive_released")


@pytest.mark.parametrize("fn", [L.mrpo, L.mdpo])
def test_per_pair_weights_equal_each_pair_with_its_own_fixed_weights(fn):
    pc, pr, rc, rr = refs_batch(3, 6, seed=23)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    w[1, 2] = 0.0  # a zero weight in one column only
    batched = fn(pc, pr, rc, rr, weights=w).losses
    for i in range(6):
        one = fn(pc[i : i + 1], pr[i : i + 1], rc[:, i : i + 1], rr[:, i : i + 1], weights=w[:, i].tolist())
        torch.testing.assert_close(batched[i : i + 1], one.losses, rtol=1e-13, atol=1e-14)


def test_per_pair_weights_are_validated_per_column():
    pc, pr, rc, rr = refs_batch(2, 4, seed=24)
    with pytest.raises(ValueError, match=r"\[K, B\] = \[2, 4\]"):
        L.mrpo(pc, pr, rc, rr, weights=torch.ones(2, 3))
    bad = torch.ones(2, 4, dtype=torch.float64)
    bad[:, 2] = 0.0
    with pytest.raises(ValueError, match="pair 2"):
        L.mrpo(pc, pr, rc, rr, weights=bad)
    with pytest.raises(ValueError, match="validation"):
        L.mrpo(pc, pr, rc, rr, weights="validation")


def test_validation_weights_are_a_softmax_of_accuracies():
    from preftune.losses.aggregation import validation_weights

    # reference 0 prefers chosen on 4/4 pairs, reference 1 on 2/4 (+ one tie = 2.5/4), reference 2 on 1/4
    rc = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -9.0, -3.0, -4.0], [-9.0, -9.0, -9.0, -1.0]])
    rr = torch.tensor([[-5.0, -5.0, -5.0, -5.0], [-5.0, -5.0, -3.0, -9.0], [-5.0, -5.0, -5.0, -5.0]])
    weights, acc = validation_weights(rc, rr, temperature=0.2)
    assert acc.tolist() == [1.0, 0.625, 0.25]
    e = [math.exp(a / 0.2) for a in (1.0, 0.625, 0.25)]
    assert weights.tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-12)
    hot, _ = validation_weights(rc, rr, temperature=1e-3)
    assert hot.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        validation_weights(rc, rr, temperature=0.0)
