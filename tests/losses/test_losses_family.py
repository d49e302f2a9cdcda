"""The DPO family, SimPO, ORPO and KTO against float64 re-derivations from the papers' formulas.

Every expected value here is computed pair by pair with Python's ``math``, from the formula in the
paper (notation in the comments), independently of the implementation.
"""

import importlib
import math

import pytest
import torch

import preftune.losses as L
from preftune.losses import family as FAM
from preftune.losses import reference_free as RF

# the module (the package exports the function `kto` under the same name)
KTO = importlib.import_module("preftune.losses.kto")

B = 12


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(log_sigmoid(z))


def batch(b: int = B, seed: int = 0, dtype=torch.float64):
    """Summed log-probs (policy near its reference) and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    rc = -5 - 55 * torch.rand(b, generator=g, dtype=torch.float64)
    rr = -5 - 55 * torch.rand(b, generator=g, dtype=torch.float64)
    pc = rc + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + 4 * torch.randn(b, generator=g, dtype=torch.float64)
    len_c = torch.randint(1, 50, (b,), generator=g)
    len_r = torch.randint(1, 50, (b,), generator=g)
    return [t.to(dtype) for t in (pc, pr, rc, rr)] + [len_c, len_r]


def lists(*tensors):
    return [[float(v) for v in t] for t in tensors]


def close(actual, expected, tol=1e-10):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=tol,
        atol=tol,
    )


# ---------------------------------------------------------------------------------------------
# per-pair formulas, written from the papers


def psi(r: float, div: str, alpha: float = 0.5) -> float:
    """f'(e^r) − f'(1): the f-DPO score (arXiv 2309.16240, Table 1), zero where π_θ = π_ref."""
    return f_prime(math.exp(r), div, alpha) - f_prime(1.0, div, alpha)


def f_prime(u: float, div: str, alpha: float) -> float:
    """f'(u) of the f-DPO paper; ``alpha`` is TRL's coefficient, the paper's α is 1 − alpha."""
    if div == "reverse_kl":  # f(u) = u log u, f'(u) = log u + 1
        return math.log(u)
    if div == "forward_kl":  # f(u) = −log u, f'(u) = −1/u
        return -1 / u
    if div == "js_divergence":  # f'(u) = log(2u / (1 + u))
        return math.log(2 * u / (1 + u))
    a = 1 - alpha  # the paper's α: f'(u) = (1 − u^(−a)) / a
    return (1 - u ** (-a)) / a


def pair_loss(kind, rw, rl, beta, *, eps=0.0, tau=0.05, delta=0.0, lw=1, ll=1, div="reverse_kl", alpha=0.5):
    """ℓ for one pair from its unscaled rewards r_w, r_l (and lengths where the loss normalises)."""
    m = psi(rw, div, alpha) - psi(rl, div, alpha)
    z = beta * m
    if kind == "sigmoid":  # DPO, Rafailov et al. Eq. 7; cDPO smoothing
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    if kind == "hinge":
        return max(0.0, 1 - z)
    if kind == "ipo":  # Azar et al. Eq. 17 on per-token averages
        return (psi(rw, div, alpha) / lw - psi(rl, div, alpha) / ll - 1 / (2 * beta)) ** 2
    if kind == "sigmoid_norm":
        return -log_sigmoid(beta * (psi(rw, div, alpha) / lw - psi(rl, div, alpha) / ll))
    if kind == "robust":  # rDPO Eq. (unbiased loss): [(1−ε)ℓ(w≻l) − εℓ(l≻w)] / (1−2ε)
        return ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)
    if kind == "exo_pair":  # KL(p_f ‖ p_rh), p_f = (σ(z), σ(−z)), p_rh = (1−ε, ε)
        qw, ql = sigmoid(z), sigmoid(-z)
        return qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)
    if kind == "discopop":  # LRML: (1 − σ(ρ/τ))·(−log σ(ρ)) + σ(ρ/τ)·exp(−ρ)
        gate = sigmoid(z / tau)
        return (1 - gate) * -log_sigmoid(z) + gate * math.exp(-z)
    if kind == "nca_pair":  # NCA: −log σ(r_w) − ½ Σ_y log σ(−r_y), r = β log π/π_ref
        return -log_sigmoid(beta * rw) - 0.5 * log_sigmoid(-beta * rw) - 0.5 * log_sigmoid(-beta * rl)
    if kind == "bco_pair":  # BCO: −log σ(r_w − δ) − log σ(−(r_l − δ))
        return -log_sigmoid(beta * rw - delta) - log_sigmoid(-(beta * rl - delta))
    if kind == "sppo_hard":  # SPPO Eq. 4.7, P = 1 / 0, η = 1/β
        eta = 1 / beta
        return (rw - eta * (1 - 0.5)) ** 2 + (rl - eta * (0 - 0.5)) ** 2
    if kind == "apo_zero":  # APO Eq. 7
        return (1 - sigmoid(beta * rw)) + sigmoid(beta * rl)
    if kind == "apo_down":  # APO Eq. 8
        return sigmoid(beta * rw) + (1 - sigmoid(beta * (rw - rl)))
    raise AssertionError(kind)


PAIRWISE = [
    "sigmoid",
    "hinge",
    "ipo",
    "sigmoid_norm",
    "robust",
    "exo_pair",
    "discopop",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
]
EPS = {"sigmoid": 0.15, "robust": 0.2, "exo_pair": 1e-3}


def expected_pairwise(kind, pc, pr, rc, rr, lc, lr, beta, **kw):
    return [
        pair_loss(kind, pc[i] - rc[i], pr[i] - rr[i], beta, lw=max(lc[i], 1), ll=max(lr[i], 1), **kw)
        for i in range(len(pc))
    ]


@pytest.mark.parametrize("kind", PAIRWISE)
@pytest.mark.parametrize("beta", [0.1, 0.6])
def test_pairwise_types_match_rederivation(kind, beta):
    pc, pr, rc, rr, lc, lr = batch(seed=1)
    eps = EPS.get(kind, 0.0)
    out = FAM.dpo_family_loss(
        pc,
        pr,
        rc,
        rr,
        loss_types=kind,
        beta=beta,
        label_smoothing=eps,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    expected = expected_pairwise(kind, *lists(pc, pr, rc, rr, lc, lr), beta, eps=eps)
    close(out.losses, expected)
    close(out.loss, sum(expected) / B)
    # metrics: TRL's, β·r whatever the loss
    rw = [beta * (a - b) for a, b in zip(*lists(pc, rc))]
    rl = [beta * (a - b) for a, b in zip(*lists(pr, rr))]
    close(out.chosen_rewards, rw)
    close(out.metrics["rewards/margins"], (sum(rw) - sum(rl)) / B)
    close(out.metrics["rewards/accuracies"], sum(a > b for a, b in zip(rw, rl)) / B)
    for v in out.metrics.values():
        assert v.dim() == 0 and not v.requires_grad


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize(
    "kind", ["sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "discopop"]
)
def test_f_divergences_match_rederivation(div, kind):
    pc, pr, rc, rr, lc, lr = batch(seed=2)
    # keep log-ratios moderate so the forward KL's e^{−r} stays well conditioned for the comparison
    pc, pr = rc + (pc - rc) / 4, rr + (pr - rr) / 4
    eps = EPS.get(kind, 0.0)
    for alpha in (0.2, 0.5, 0.8) if div == "alpha_divergence" else (0.5,):
        out = FAM.dpo_family_loss(
            pc, pr, rc, rr, loss_types=kind, beta=0.3, label_smoothing=eps, f_divergence=div, f_alpha=alpha,
            chosen_lengths=lc, rejected_lengths=lr,
        )  # fmt: skip
        expected = expected_pairwise(kind, *lists(pc, pr, rc, rr, lc, lr), 0.3, eps=eps, div=div, alpha=alpha)
        close(out.losses, expected)


def test_bco_reward_shift_and_its_running_mean():
    pc, pr, rc, rr, lc, lr = batch(seed=3)
    delta, count, history = 0.0, 0, []
    for step in range(4):
        shift = 0.5 * step
        out = L.bco_pair(pc + shift, pr, rc, rr, beta=0.2, delta=delta)
        expected = expected_pairwise("bco_pair", *lists(pc + shift, pr, rc, rr, lc, lr), 0.2, delta=delta)
        close(out.losses, expected)
        if step:
            close(out.metrics["bco/delta"], delta)
        delta_t, count = L.bco_running_delta(delta, count, out.chosen_rewards, out.rejected_rewards)
        rewards = [float(v) for v in out.chosen_rewards] + [float(v) for v in out.rejected_rewards]
        history.append(sum(rewards) / len(rewards))
        delta = float(delta_t)
        close(delta, sum(history) / len(history))  # equal-weight mean of the batch means so far
    assert count == 4 and not delta_t.requires_grad


def test_aot_sorts_over_the_batch():
    pc, pr, rc, rr, lc, lr = batch(seed=4)
    beta, eps = 0.4, 0.1
    pcl, prl, rcl, rrl = lists(pc, pr, rc, rr)
    # paired AOT: sort the policy's and the reference's chosen−rejected log-ratios separately
    u = sorted(a - b for a, b in zip(pcl, prl))
    v = sorted(a - b for a, b in zip(rcl, rrl))
    expected = [
        -(1 - eps) * log_sigmoid(beta * (a - b)) - eps * log_sigmoid(-beta * (a - b)) for a, b in zip(u, v)
    ]
    close(L.aot(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses, expected)
    # unpaired AOT: sort r_w and r_l separately
    sw = sorted(a - b for a, b in zip(pcl, rcl))
    sl = sorted(a - b for a, b in zip(prl, rrl))
    expected = [-log_sigmoid(beta * (a - b)) for a, b in zip(sw, sl)]
    close(L.aot_unpaired(pc, pr, rc, rr, beta=beta).losses, expected)
    # the batch is coupled: AOT is not the mean of per-pair DPO losses
    assert (
        abs(L.aot(pc, pr, rc, rr, beta=beta).loss.item() - L.dpo(pc, pr, rc, rr, beta=beta).loss.item())
        > 1e-3
    )


def test_sft_type_is_the_batch_token_mean():
    pc, pr, rc, rr, lc, lr = batch(seed=5)
    out = L.sft(pc, pr, rc, rr, chosen_lengths=lc)
    expected = -sum(float(v) for v in pc) / sum(int(n) for n in lc)
    close(out.loss, expected)
    close(out.losses, [expected] * B)


def test_loss_weights_and_pair_weights_combine_per_pair():
    pc, pr, rc, rr, lc, lr = batch(seed=6)
    types, weights = ["sigmoid", "bco_pair", "sft", "apo_down"], [0.8, 0.2, 1.0, 0.3]
    omega = 0.2 + torch.rand(B, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = FAM.dpo_family_loss(
        pc,
        pr,
        rc,
        rr,
        loss_types=types,
        loss_weights=weights,
        beta=0.1,
        chosen_lengths=lc,
        pair_weights=omega,
    )
    cols = lists(pc, pr, rc, rr, lc, lr)
    sft = -sum(cols[0]) / sum(cols[4])
    expected = []
    for i in range(B):
        total = 0.0
        for t, w in zip(types, weights):
            ell = sft if t == "sft" else pair_loss(t, cols[0][i] - cols[2][i], cols[1][i] - cols[3][i], 0.1)
            total += w * float(omega[i]) * ell
        expected.append(total)
    close(out.losses, expected)
    close(out.loss, sum(expected) / B)
    close(out.metrics["wpo/weight"], float(omega.mean()))
    close(out.metrics["loss/bco_pair"], sum(float(omega[i]) * pair_loss("bco_pair", cols[0][i] - cols[2][i],
                                                                       cols[1][i] - cols[3][i], 0.1)
                                            for i in range(B)) / B)  # fmt: skip


def test_mpo_is_the_weighted_sum():
    pc, pr, rc, rr, lc, lr = batch(seed=7)
    parts = [
        FAM.dpo_family_loss(pc, pr, rc, rr, loss_types=t, chosen_lengths=lc).loss
        for t in ("sigmoid", "bco_pair", "sft")
    ]
    close(FAM.mpo(pc, pr, rc, rr, chosen_lengths=lc).loss, 0.8 * parts[0] + 0.2 * parts[1] + 1.0 * parts[2])


# ---------------------------------------------------------------------------------------------
# LD-DPO and WPO inputs


def token_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = 9
    lengths = torch.randint(1, t, (n,), generator=g)
    start = torch.randint(0, 2, (n,), generator=g)  # some rows start with a prompt token
    pos = torch.arange(t)
    mask = ((pos >= start[:, None]) & (pos < start[:, None] + lengths[:, None])).long()
    tok = -3 * torch.rand(n, t, generator=g, dtype=torch.float64) + 5 * (1 - mask)  # junk off the mask
    return tok, mask, lengths


def test_shared_length_split_by_loops():
    tok, mask, lengths = token_batch(10, seed=8)
    shared = torch.randint(0, 9, (10,), generator=torch.Generator().manual_seed(1))
    prefix, tail = L.shared_length_split(tok, mask, shared)
    for i in range(10):
        seen, pre, rest = 0, 0.0, 0.0
        for j in range(tok.shape[1]):
            if mask[i, j]:
                seen += 1
                if seen <= shared[i]:
                    pre += float(tok[i, j])
                else:
                    rest += float(tok[i, j])
        close(prefix[i], pre)
        close(tail[i], rest)


def test_ld_dpo_matches_its_definition_and_alpha_one_is_dpo():
    pc, pr, rc, rr, lc, lr = batch(seed=9)
    g = torch.Generator().manual_seed(2)
    # tails: a fraction of the longer response's log-prob, 0 for the shorter one
    frac = torch.rand(B, generator=g, dtype=torch.float64)
    longer_c = lc > lr
    tails = [torch.where(longer_c, frac * x, 0 * x) for x in (pc, rc)]
    tails += [torch.where(~longer_c, frac * x, 0 * x) for x in (pr, rr)]
    kw = dict(policy_chosen_tail=tails[0], ref_chosen_tail=tails[1], policy_rejected_tail=tails[2],
              ref_rejected_tail=tails[3])  # fmt: skip
    beta, alpha = 0.2, 0.35
    out = L.ld_dpo(pc, pr, rc, rr, beta=beta, ld_alpha=alpha, **kw)
    cols = lists(pc, pr, rc, rr, *tails)
    expected = []
    for i in range(B):
        # log π̂(y) = prefix + α·tail = (full − tail) + α·tail
        hat = [
            cols[k][i] - cols[4 + k2][i] + alpha * cols[4 + k2][i]
            for k, k2 in ((0, 0), (2, 1), (1, 2), (3, 3))
        ]
        expected.append(-log_sigmoid(beta * ((hat[0] - hat[1]) - (hat[2] - hat[3]))))
    close(out.losses, expected)
    close(out.metrics["logps/chosen"], sum(hat_c for hat_c in [cols[0][i] - (1 - alpha) * cols[4][i]
                                                             for i in range(B)]) / B)  # fmt: skip
    close(
        L.ld_dpo(pc, pr, rc, rr, beta=beta, ld_alpha=1.0, **kw).losses,
        L.dpo(pc, pr, rc, rr, beta=beta).losses,
    )
    with pytest.raises(ValueError, match="ld_alpha"):
        L.ld_dpo(pc, pr, rc, rr, ld_alpha=1.5, **kw)


def test_wpo_weights_by_loops():
    tok, mask, lengths = token_batch(8, seed=10)
    logits = torch.randn(8, tok.shape[1], 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lss = L.log_sum_sq_probs(logits)
    for i in range(8):
        for j in range(tok.shape[1]):
            z = [float(v) for v in logits[i, j]]
            norm = sum(math.exp(v) for v in z)
            close(lss[i, j], math.log(sum((math.exp(v) / norm) ** 2 for v in z)))
    aligned = L.wpo_aligned_logps(tok, mask, lss)
    w = L.wpo_weights(aligned[:4], aligned[4:], lengths[:4], lengths[4:])
    for i in range(4):
        per_seq = []
        for k in (i, 4 + i):
            terms = [float(tok[k, j]) - float(lss[k, j]) for j in range(tok.shape[1]) if mask[k, j]]
            # w(x, y) = exp((1/|y|) Σ_t log[π(y_t) / Σ_v π(v)²])
            per_seq.append(math.exp(sum(terms) / len(terms)))
        close(w[i], per_seq[0] * per_seq[1])
    assert not w.requires_grad
    # without alignment: exp of the mean log-prob
    plain = L.wpo_weights(
        aligned[:4] * 0 - 6.0, aligned[4:] * 0 - 3.0, torch.full((4,), 3), torch.full((4,), 1)
    )
    close(plain, [math.exp(-2.0 - 3.0)] * 4)


# ---------------------------------------------------------------------------------------------
# SimPO, ORPO, KTO


@pytest.mark.parametrize(
    "beta,gamma,eps,lam", [(2.0, 1.0, 0.0, 0.0), (2.5, 1.4, 0.1, 0.0), (0.5, 0.3, 0.0, 0.7)]
)
def test_simpo_matches_rederivation(beta, gamma, eps, lam):
    pc, pr, _, _, lc, lr = batch(seed=11)
    out = RF.simpo(pc, pr, None, None, beta=beta, gamma=gamma, label_smoothing=eps, sft_weight=lam,
                   chosen_lengths=lc, rejected_lengths=lr)  # fmt: skip
    expected = []
    for a, b, n, m in zip(*lists(pc, pr, lc, lr)):
        # SimPO Eq. 6: −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)
        z = beta / n * a - beta / m * b - gamma
        expected.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) + lam * (-a / n))
    close(out.losses, expected)
    close(out.metrics["rewards/chosen"], sum(beta * a / n for a, n in zip(*lists(pc, lc))) / B)


def test_orpo_matches_rederivation():
    pc, pr, _, _, lc, lr = batch(seed=12)
    lam = 0.25
    out = RF.orpo(pc, pr, beta=lam, chosen_lengths=lc, rejected_lengths=lr)
    expected, ratios = [], []
    for a, b, n, m in zip(*lists(pc, pr, lc, lr)):
        pw, pl = math.exp(a / n), math.exp(b / m)  # P_θ(y|x), length-normalised
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        ratios.append(log_sigmoid(log_or))
        expected.append(-a / n + lam * -log_sigmoid(log_or))  # L_SFT + λ·L_OR
    close(out.losses, expected)
    close(out.metrics["log_odds_ratio"], sum(ratios) / B)
    # λ = 0 is the SFT term alone
    close(RF.orpo(pc, pr, beta=0.0, chosen_lengths=lc, rejected_lengths=lr).losses, [-a / n for a, n in
                                                                                   zip(*lists(pc, lc))])  # fmt: skip


def kto_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = -5 - 40 * torch.rand(n, generator=g, dtype=torch.float64)
    pol = ref + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.rand(n, generator=g) < 0.5
    labels[0], labels[1] = True, False
    kl_ref = -5 - 40 * torch.rand(n, generator=g, dtype=torch.float64)
    kl_pol = kl_ref + 2 + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    return pol, ref, labels, kl_pol, kl_ref


@pytest.mark.parametrize("lam_d,lam_u", [(1.0, 1.0), (1.33, 0.6)])
def test_kto_matches_rederivation(lam_d, lam_u):
    pol, ref, labels, kl_pol, kl_ref = kto_batch(14, seed=13)
    beta = 0.1
    out = KTO.kto(
        pol, ref, labels, kl_pol, kl_ref, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u
    )
    # z_ref = max(0, mean over mismatched pairs of log π_θ(y'|x)/π_ref(y'|x))
    z = max(0.0, sum(a - b for a, b in zip(*lists(kl_pol, kl_ref))) / 14)
    assert z > 0
    expected = []
    for p, r, d in zip(*lists(pol, ref), labels.tolist()):
        v = lam_d * sigmoid(beta * (p - r - z)) if d else lam_u * sigmoid(beta * (z - (p - r)))
        expected.append((lam_d if d else lam_u) - v)  # λ_y − v(x, y)
    close(out.losses, expected)
    close(out.metrics["kl"], z)
    close(out.chosen_rewards, [beta * (p - r) for p, r, d in zip(*lists(pol, ref), labels.tolist()) if d])


def test_kto_reference_point_is_clamped_and_detached():
    pol, ref, labels, kl_pol, kl_ref = kto_batch(10, seed=14)
    kl_pol = kl_pol.clone().requires_grad_(True)
    low = KTO.kto(pol, ref, labels, kl_ref - 5.0, kl_ref)  # mean log-ratio −5 → z = 0
    close(low.metrics["kl"], 0.0)
    # with z = 0, KTO is the unpaired APO-zero: 1 − σ(β r) and 1 − σ(−β r) = σ(β r)
    close(low.losses, KTO.apo_zero_unpaired(pol, ref, labels).losses)
    pol = pol.clone().requires_grad_(True)
    KTO.kto(pol, ref, labels, kl_pol, kl_ref).loss.backward()
    assert kl_pol.grad is None and pol.grad is not None


# ---------------------------------------------------------------------------------------------
# reductions


def test_reductions_to_dpo():
    pc, pr, rc, rr, lc, lr = batch(seed=15)
    beta = 0.3
    dpo = L.dpo(pc, pr, rc, rr, beta=beta)
    close(L.robust(pc, pr, rc, rr, beta=beta, label_smoothing=0.0).losses, dpo.losses)
    close(FAM.f_dpo(pc, pr, rc, rr, beta=beta, divergence="reverse_kl").losses, dpo.losses)
    close(FAM.f_dpo(pc, pr, rc, rr, beta=beta, divergence="alpha_divergence", alpha=1.0).losses, dpo.losses)
    close(FAM.dpo_family_loss(pc, pr, rc, rr, loss_types=["sigmoid"], loss_weights=[1.0], beta=beta).losses,
          dpo.losses)  # fmt: skip
    close(FAM.dpo_family_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2).losses,
          L.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=0.2).losses)  # fmt: skip
    # AOT on one pair: sorting one element is the identity
    for i in range(3):
        s = slice(i, i + 1)
        close(L.aot(pc[s], pr[s], rc[s], rr[s], beta=beta).losses, dpo.losses[s])
        close(L.aot_unpaired(pc[s], pr[s], rc[s], rr[s], beta=beta).losses, dpo.losses[s])
    # DiscoPOP: τ → 0 is −log σ(ρ) below 0 and e^{−ρ} above
    z = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(*lists(pc, pr, rc, rr))]
    close(L.discopop(pc, pr, rc, rr, beta=beta, tau=1e-6).losses,
          [-log_sigmoid(v) if v < 0 else math.exp(-v) for v in z])  # fmt: skip
    # IPO with lengths 1 is preftune's IPO
    ones = torch.ones(B)
    close(FAM.dpo_family_loss(pc, pr, rc, rr, loss_types="ipo", beta=beta, chosen_lengths=ones,
                              rejected_lengths=ones).losses, L.ipo(pc, pr, rc, rr, beta=beta).losses)  # fmt: skip


@pytest.mark.parametrize("n", [1, 7, 40])
def test_sigmoid_norm_with_equal_lengths_is_dpo_with_beta_over_length(n):
    pc, pr, rc, rr, _, _ = batch(seed=16)
    lengths = torch.full((B,), n)
    out = L.sigmoid_norm(pc, pr, rc, rr, beta=0.5, chosen_lengths=lengths, rejected_lengths=lengths)
    close(out.losses, L.dpo(pc, pr, rc, rr, beta=0.5 / n).losses)


def test_single_type_in_a_list_with_weight_one_is_that_type():
    pc, pr, rc, rr, lc, lr = batch(seed=17)
    for kind in ("nca_pair", "apo_zero", "sppo_hard", "discopop"):
        a = FAM.dpo_family_loss(pc, pr, rc, rr, loss_types=[kind], loss_weights=[1.0])
        b = getattr(L, kind)(pc, pr, rc, rr)
        close(a.losses, b.losses)
        close(a.loss, b.loss)


def test_simpo_with_zero_margin_is_reference_free_length_normalised_dpo():
    pc, pr, _, _, lc, lr = batch(seed=18)
    out = RF.simpo(pc, pr, beta=2.0, gamma=0.0, chosen_lengths=lc, rejected_lengths=lr)
    ref = L.dpo(pc / lc, pr / lr, None, None, beta=2.0, reference_free=True)
    close(out.losses, ref.losses)
    close(out.chosen_rewards, ref.chosen_rewards)
    # and γ is SimPO's: preftune's gamma (log-prob units) is γ/β
    close(RF.simpo(pc, pr, beta=2.0, gamma=0.8, chosen_lengths=lc, rejected_lengths=lr).losses,
          L.dpo(pc / lc, pr / lr, None, None, beta=2.0, reference_free=True, gamma=0.4).losses)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# gradients, dtypes, numerics, errors


def _gradcheck(fn, *tensors):
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64():
    pc, pr, rc, rr, lc, lr = batch(6, seed=19)
    pc, pr = rc + (pc - rc) / 4, rr + (pr - rr) / 4
    _gradcheck(lambda a, b: L.discopop(a, b, rc, rr, beta=0.2, tau=0.5).loss, pc, pr)
    _gradcheck(lambda a, b: L.exo_pair(a, b, rc, rr, beta=0.2, label_smoothing=0.01).loss, pc, pr)
    _gradcheck(lambda a, b: L.robust(a, b, rc, rr, beta=0.2, label_smoothing=0.2).loss, pc, pr)
    _gradcheck(
        lambda a, b: FAM.dpo_family_loss(a, b, rc, rr, loss_types=["sigmoid_norm", "sft"], f_divergence="js_divergence",
                                         chosen_lengths=lc, rejected_lengths=lr).loss, pc, pr,
    )  # fmt: skip
    _gradcheck(lambda a, b: L.aot(a, b, rc, rr, beta=0.2).loss, pc, pr)
    _gradcheck(lambda a, b: L.nca_pair(a, b, rc, rr, beta=0.2).loss, pc, pr)
    _gradcheck(
        lambda a, b: RF.simpo(a, b, beta=2.0, gamma=0.5, chosen_lengths=lc, rejected_lengths=lr).loss, pc, pr
    )
    short = torch.full((6,), 4)
    _gradcheck(lambda a, b: RF.orpo(a, b, beta=0.5, chosen_lengths=short, rejected_lengths=short).loss,
               -0.3 - torch.rand(6, dtype=torch.float64) * 4, -0.3 - torch.rand(6, dtype=torch.float64) * 4)  # fmt: skip
    pol, ref, labels, kl_pol, kl_ref = kto_batch(8, seed=20)
    _gradcheck(lambda p: KTO.kto(p, ref, labels, kl_pol, kl_ref, desirable_weight=1.3).loss, pol)


def test_gradient_reaches_only_the_policy():
    pc, pr, rc, rr, lc, lr = batch(6, seed=21)
    leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
    omega = torch.rand(6, dtype=torch.float64, requires_grad=True)
    FAM.dpo_family_loss(*leaves, loss_types=["robust", "bco_pair", "apo_down"], label_smoothing=0.1,
                        pair_weights=omega, bco_delta=torch.tensor(0.3, requires_grad=True)).loss.backward()  # fmt: skip
    assert leaves[0].grad is not None and leaves[1].grad is not None
    assert leaves[2].grad is None and leaves[3].grad is None and omega.grad is None


@pytest.mark.parametrize("kind", ["robust", "discopop", "nca_pair", "sigmoid_norm", "aot"])
def test_float32_and_bf16_inputs_compute_in_float32(kind):
    pc, pr, rc, rr, lc, lr = batch(32, seed=22)
    kw = dict(loss_types=kind, label_smoothing=0.1 if kind == "robust" else 0.0, chosen_lengths=lc,
              rejected_lengths=lr)  # fmt: skip
    out64 = FAM.dpo_family_loss(pc, pr, rc, rr, **kw)
    out32 = FAM.dpo_family_loss(*(t.float() for t in (pc, pr, rc, rr)), **kw)
    out16 = FAM.dpo_family_loss(*(t.bfloat16() for t in (pc, pr, rc, rr)), **kw)
    assert out32.loss.dtype == torch.float32 and out16.loss.dtype == torch.float32
    torch.testing.assert_close(out32.losses.double(), out64.losses, rtol=2e-4, atol=2e-5)


def test_discopop_stays_finite_where_exp_overflows_in_float32():
    # ρ = −150: e^{−ρ} overflows float32, but its gate σ(ρ/τ) is 0; the loss is −log σ(ρ) = 150
    pc = torch.tensor([-200.0, -10.0])
    out = L.discopop(pc, torch.tensor([-50.0, -10.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(out.losses).all()
    close(out.losses[0].double(), 150.0, tol=1e-5)


def test_bad_inputs_are_rejected():
    pc, pr, rc, rr, lc, lr = batch(4, seed=23)
    with pytest.raises(ValueError, match="unknown loss type"):
        FAM.dpo_family_loss(pc, pr, rc, rr, loss_types="kto_pair")
    with pytest.raises(ValueError, match="loss_weights"):
        FAM.dpo_family_loss(pc, pr, rc, rr, loss_types=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="chosen_lengths"):
        FAM.dpo_family_loss(pc, pr, rc, rr, loss_types="sigmoid_norm")
    with pytest.raises(ValueError, match="robust"):
        L.robust(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        L.exo_pair(pc, pr, rc, rr, label_smoothing=0.0)
    with pytest.raises(ValueError, match="aot"):
        L.aot(pc, pr, rc, rr, pair_weights=torch.ones(4))
    with pytest.raises(ValueError, match="beta"):
        L.nca_pair(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="ref_chosen"):
        L.apo_zero(pc, pr, rc[:3], rr)
    with pytest.raises(ValueError, match="rejected_lengths"):
        RF.simpo(pc, pr, chosen_lengths=lc, rejected_lengths=None)
    with pytest.raises(ValueError, match="< 0"):
        RF.orpo(pc * 0, pr, chosen_lengths=lc, rejected_lengths=lr)
    with pytest.raises(ValueError, match="mismatched"):
        KTO.kto(pc, rc, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        KTO.kto(pc, rc, torch.ones(3, dtype=torch.bool), reference_point=0.0)


def test_empty_batch_gives_zero_without_nan():
    e = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    out = FAM.dpo_family_loss(e, e, e.detach(), e.detach(), loss_types=["sigmoid", "sft"],
                              chosen_lengths=torch.zeros(0))  # fmt: skip
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out = KTO.kto(e, e.detach(), torch.zeros(0, dtype=torch.bool), reference_point=0.0)
    assert out.loss.item() == 0.0
