"""The composed pipeline (docs/methods.md#one-pipeline-many-methods) against independent float64 computations, and the method registry."""

import math

import pytest
import torch

import preftune.losses as L


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def naive_link(s: float, phi: float) -> float:
    def h(k: float) -> float:
        return -1 / math.log(phi) if k == 0 else k / (1 - phi**k)

    return h(s + 1) - h(s) if s >= 0 else 1 - (h(-s + 1) - h(-s))


def inputs(k: int, b: int, seed: int, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    base_c = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    base_r = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64)
    rc = base_c + 6 * torch.randn(k, b, generator=g, dtype=torch.float64)
    rr = base_r + 6 * torch.randn(k, b, generator=g, dtype=torch.float64)
    pc = rc[0] + 3 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr[0] + 3 * torch.randn(b, generator=g, dtype=torch.float64)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    c = 0.3 + 1.5 * torch.rand(b, generator=g, dtype=torch.float64)
    phi = 0.1 + 0.8 * torch.rand(b, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr, emb, c, phi


def ref_alpha_and_clipped(lc, lr, eps):
    """ARWC weights and the adaptive CTRO radius (docs/methods.md#mrpo) for one pair (adaptive weights, adaptive radius), plain Python."""
    k = len(lc)
    m = [abs(a - b) for a, b in zip(lc, lr)]
    alpha = [x / sum(m) for x in m]
    bw, bl = sum(lc) / k, sum(lr) / k
    ew = eps * abs(bw) / (abs(bw) + abs(bl))
    el = eps - ew

    def clip(vals, e):
        return [vals[0]] + [min(max(v, vals[0] * (1 + e)), vals[0] * (1 - e)) for v in vals[1:]]

    return alpha, clip(lc, ew), clip(lr, el)


def ref_weights(emb, tau):
    rows = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in emb.tolist()]
    w = []
    for a in rows:
        e = [math.exp(-(1 - sum(x * y for x, y in zip(a, b))) / tau) for b in rows]
        w.append([x / sum(e) for x in e])
    return w


@pytest.mark.parametrize("label_smoothing,gamma,sft", [(0.0, 0.0, 0.0), (0.1, 0.5, 0.2)])
def test_mrpo_rpo_mallows_theta_composition(label_smoothing, gamma, sft):
    b, k, beta, tau, eps = 6, 3, 0.2, 0.5, 0.1
    pc, pr, rc, rr, emb, c, _ = inputs(k, b, seed=51)
    lengths = torch.arange(1, b + 1)
    out = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        reference="mrpo",
        pairing="rpo",
        scale=c,
        prompt_embeddings=emb,
        tau=tau,
        clip_eps=eps,
        label_smoothing=label_smoothing,
        gamma=gamma,
        sft_weight=sft,
        chosen_lengths=lengths,
    )
    # independent float64: virtual reference per response, contrast matrix, row-scaled by c_i
    v_c, v_r = [], []
    for i in range(b):
        alpha, cc, cr = ref_alpha_and_clipped(rc[:, i].tolist(), rr[:, i].tolist(), eps)
        v_c.append(-math.log(sum(a * math.exp(-x) for a, x in zip(alpha, cc))))
        v_r.append(-math.log(sum(a * math.exp(-x) for a, x in zip(alpha, cr))))
    w = ref_weights(emb, tau)
    rows = []
    for i in range(b):
        acc = 0.0
        for j in range(b):
            s_ij = (pc[i].item() - v_c[i]) - (pr[j].item() - v_r[j])
            z = beta * c[i].item() * w[i][j] * (s_ij - gamma)
            acc += -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
        rows.append(acc / b + sft * (-pc[i].item() / lengths[i].item()))
    torch.testing.assert_close(out.losses, torch.tensor(rows, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(rows) / b, rel=1e-10)
    # rewards are logged on the diagonal pairs against the virtual reference
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - torch.tensor(v_c, dtype=torch.float64)))


def test_mdpo_rpo_composition_and_mallows_phi_rpo_composition():
    b, k, beta, tau, eps = 5, 2, 0.3, 0.7, 0.2
    pc, pr, rc, rr, emb, c, phi = inputs(k, b, seed=52)
    w = ref_weights(emb, tau)
    md = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        reference="mdpo",
        pairing="rpo",
        prompt_embeddings=emb,
        tau=tau,
        clip_eps=eps,
        scale=c,
    )
    mp = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        pairing="rpo",
        prompt_embeddings=emb,
        tau=tau,
        link="mallows_phi",
        dispersion=phi,
    )
    per = [ref_alpha_and_clipped(rc[:, i].tolist(), rr[:, i].tolist(), eps) for i in range(b)]
    exp_md, exp_mp = [], []
    for i in range(b):
        alpha_i, cc_i, _ = per[i]
        md_row = mp_row = 0.0
        for j in range(b):
            _, _, cr_j = per[j]
            for kk in range(k):  # per-reference contrast, mixed with row i's α
                s = (pc[i].item() - cc_i[kk]) - (pr[j].item() - cr_j[kk])
                md_row += alpha_i[kk] * -log_sigmoid(beta * c[i].item() * w[i][j] * s)
            s0 = (pc[i].item() - rc[0, i].item()) - (pr[j].item() - rr[0, j].item())
            mp_row += -math.log(naive_link(beta * w[i][j] * s0, phi[i].item()))
        exp_md.append(md_row / b)
        exp_mp.append(mp_row / b)
    torch.testing.assert_close(md.losses, torch.tensor(exp_md, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mp.losses, torch.tensor(exp_mp, dtype=torch.float64), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reference", ["single", "mrpo", "mdpo"])
@pytest.mark.parametrize("pairing", ["diagonal", "rpo", "rpo_uniform", "rpo_diagonal"])
@pytest.mark.parametrize("scaled", [False, True])
def test_every_combination_reduces_to_dpo(reference, pairing, scaled):
    """K = 1 (or ε = 0), M = 1 (or τ → 0 for the loss value on the diagonal), c ≡ 1 ⇒ DPO."""
    pc, pr, rc, rr, emb, _, _ = inputs(3, 1, seed=53)
    kw = dict(beta=0.3, reference=reference, pairing=pairing, label_smoothing=0.05)
    if scaled:
        kw["scale"] = torch.ones(1, dtype=torch.float64)
    if pairing == "rpo":
        kw["prompt_embeddings"] = emb
    dpo = L.dpo(pc, pr, rc[0], rr[0], beta=0.3, label_smoothing=0.05).losses
    # one reference
    torch.testing.assert_close(
        L.preference_loss(pc, pr, rc[:1], rr[:1], **kw).losses, dpo, rtol=1e-13, atol=0
    )
    # three references, zero trust-region radius (single uses the primary anyway)
    torch.testing.assert_close(
        L.preference_loss(pc, pr, rc, rr, clip_eps=0.0, **kw).losses, dpo, rtol=1e-12, atol=1e-14
    )


def test_all_registered_methods_run_and_reach_only_the_policy():
    b = 4
    pc, pr, rc, rr, emb, c, phi = inputs(2, b, seed=54)
    for name in L.COMPONENTS:
        spec = L.parse_method(name)
        leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr, emb, c, phi)]
        lpc, lpr, lrc, lrr, lemb, lc, lphi = leaves
        component = L.COMPONENTS[name]
        if spec["takes"] == "unpaired":  # KTO-style: labelled items, one reference point
            labels = torch.tensor([True, False] * b)
            items, ref_items = torch.cat([lpc, lpr]), torch.cat([lrc[0], lrr[0]])
            kl = {"reference_point": 0.1} if "mismatched" in spec["needs"] else {}
            out = component.impl(items, ref_items, labels, beta=0.1, **kl)
        elif spec["unpaired"]:
            out = L.unpaired_preference_loss(lpc, lrc[0], lemb, lpr, lrr[0], lemb, **spec["loss_kwargs"])
        else:
            extra = {"chosen_lengths": torch.full((b,), 3.0)}
            if component.label_smoothing:
                extra["label_smoothing"] = 0.1  # exo_pair needs ε > 0; the others accept it
            if spec["reference_free"]:
                extra["reference_free"] = True
            if spec["scale"] == "mallows_theta":
                extra["scale"] = lc
            if spec["link"] == "mallows_phi":
                extra["dispersion"] = lphi
            if spec["needs_embeddings"]:
                extra["prompt_embeddings"] = lemb
            out = L.preference_loss(lpc, lpr, lrc, lrr, **spec["loss_kwargs"], **extra)
        out.loss.backward()
        assert torch.isfinite(out.loss), name
        assert torch.isfinite(lpc.grad).all() and lpc.grad.abs().sum() > 0, name
        assert all(t.grad is None for t in (lrc, lrr, lemb, lc, lphi)), name
        expected = {"rewards/chosen", "logps/chosen"}
        if spec["takes"] != "unpaired":  # single items have no pair to be accurate about
            expected.add("rewards/accuracies")
        assert expected <= set(out.metrics), name
        assert component.slot in ("reference", "pairing", "scale", "link")
        # float32 and float64 agree for every method
        if not spec["unpaired"]:
            out32 = L.preference_loss(
                pc.float(),
                pr.float(),
                rc.float(),
                rr.float(),
                **spec["loss_kwargs"],
                **{k: v.detach().float() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
            )
            torch.testing.assert_close(out32.loss.double(), out.loss.detach(), rtol=1e-4, atol=1e-5)


def test_parse_method():
    spec = L.parse_method("mrpo+mallows_theta+rpo")
    assert (spec["reference"], spec["pairing"], spec["scale"], spec["link"]) == (
        "mrpo",
        "rpo",
        "mallows_theta",
        "sigmoid",
    )
    assert (
        spec["needs_entropy"]
        and spec["needs_embeddings"]
        and spec["multi_reference"]
        and not spec["unpaired"]
    )
    assert spec["loss_kwargs"] == {"reference": "mrpo", "pairing": "rpo", "link": "sigmoid"}
    assert L.parse_method(" rpo + mallows_theta+mrpo ")["loss_kwargs"] == spec["loss_kwargs"]
    assert L.parse_method(["mdpo", "ipo"])["loss_kwargs"] == {
        "reference": "mdpo",
        "pairing": "diagonal",
        "link": "ipo",
    }
    dpo = L.parse_method("dpo")
    assert dpo["needs"] == frozenset() and dpo["scale"] is None
    assert L.parse_method("mallows_phi")["needs_entropy"]
    assert L.method_needs("rpo_diagonal") == set()
    assert L.method_needs("mdpo+rpo") == {"multi_reference", "embeddings"}
    assert L.method_needs("rpo_unpaired") == {"embeddings", "unpaired"}
    assert L.parse_method("rpo_unpaired+hinge")["loss_kwargs"] == {"pairing": "rpo", "link": "hinge"}
    assert set(L.COMPONENTS) >= {
        "dpo",
        "ipo",
        "hinge",
        "mrpo",
        "mdpo",
        "mallows_theta",
        "mallows_phi",
        "rpo",
        "rpo_uniform",
        "rpo_diagonal",
        "rpo_unpaired",
    }
    assert L.COMPONENTS["rpo_unpaired"].unpaired and not L.COMPONENTS["rpo"].unpaired


@pytest.mark.parametrize(
    "method,names",
    [
        ("mrpo+mdpo", ["mrpo", "mdpo"]),
        ("dpo+dpo", ["dpo"]),
        ("nca_pair+rpo", ["nca_pair", "rpo"]),
        ("aot+mallows_theta", ["aot", "mallows_theta"]),
        ("simpo+mrpo", ["simpo", "mrpo"]),
        ("kto+dpo", ["kto"]),
        ("rpo+rpo_uniform", ["rpo", "rpo_uniform"]),
        ("rpo_diagonal+rpo_unpaired", ["rpo_diagonal", "rpo_unpaired"]),
        ("mallows_theta+mallows_theta", ["mallows_theta"]),
        ("rpo_unpaired+mrpo", ["rpo_unpaired", "mrpo"]),
        ("rpo_unpaired+mallows_theta", ["mallows_theta"]),
    ],
)
def test_parse_method_rejects_conflicts_naming_them(method, names):
    with pytest.raises(ValueError) as err:
        L.parse_method(method)
    for n in names:
        assert repr(n) in str(err.value)


@pytest.mark.parametrize("method", ["dpo+foo", "cpo", "", "dpo++rpo", "DPO"])
def test_parse_method_rejects_unknown_names_listing_valid_ones(method):
    with pytest.raises(ValueError) as err:
        L.parse_method(method)
    for n in ("dpo", "mrpo", "mallows_theta", "rpo_unpaired"):
        assert n in str(err.value)


def test_preference_loss_docstring_names_every_paired_link():
    """The ``link`` argument's documentation lists every registered link the pipeline can run."""
    doc = L.preference_loss.__doc__ or ""
    paired = [c.value for c in L.COMPONENTS.values() if c.slot == "link" and c.takes != "unpaired"]
    assert len(paired) >= 18
    missing = [value for value in paired if f'``"{value}"``' not in doc]
    assert not missing, f"preference_loss's docstring does not name the links {missing}"
