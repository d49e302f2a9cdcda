"""Contextual preference bandit with Mallows-distributed preferences, and a tabular softmax policy
trained by preftune's losses.

Each context x has a dispersion phi(x), a central ranking of the arms (drawn at random), true
utilities u = 1 - rank / (K - 1) (1 for the best arm, 0 for the worst), and a tiny reference LM
(tiny_ref.py) whose entropy is tied to phi(x); arm a of context x is a response y_a sampled from
that LM, and its entropy H(y_a) feeds the dispersion estimator. Preference pairs come from
rankings sampled exactly from Mallows(central ranking, phi(x)).

The policy is a table of logits theta[x, a]; the "sequence log-prob" of arm a is
log_softmax(theta[x])[a]. It starts at the reference, so everything it learns comes from the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import mallows, tiny_ref


@dataclass
class BanditConfig:
    num_arms: int = 10
    phi_levels: tuple[float, ...] = (0.1, 0.5, 0.9)
    contexts_per_level: int = 4
    train_pairs_per_context: int = 300
    heldout_pairs_per_context: int = 2000
    reference: str = "uniform"  # "uniform", or "random": fixed logits ~ N(0, 1) per context
    optimizer: str = "adam"  # "adam" or "sgd"; the same for every method
    lr: float = 0.05
    batch_size: int = 128  # 0 = full batch
    steps: int = 300
    eval_every: int = 20
    # dispersion -> reference entropy tie (tiny_ref.entropy_target) for the estimated c
    entropy_kappa: float = 2.0
    entropy_noise: float = 0.1
    vocab_size: int = 32
    response_length: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BanditData:
    phi: np.ndarray  # [X] true dispersion of each context
    level: np.ndarray  # [X] index into cfg.phi_levels
    rank_of_arm: np.ndarray  # [X, K] central rank of each arm (0 = best)
    utility: np.ndarray  # [X, K]
    ref_logp: np.ndarray  # [X, K] reference log-probs of the arms
    arm_entropy: np.ndarray  # [X, K] H(y_a) of arm a's response under context x's tiny reference
    train: dict[str, np.ndarray] = field(default_factory=dict)  # ctx, win, lose (arm ids)
    heldout: dict[str, np.ndarray] = field(default_factory=dict)


def _pairs(phi: np.ndarray, arm_at_rank: np.ndarray, per_context: int, rng: np.random.Generator) -> dict:
    ctx, win, lose = [], [], []
    for x, p in enumerate(phi):
        w, lo = mallows.draw_pairs(arm_at_rank.shape[1], float(p), per_context, rng)
        ctx.append(np.full(per_context, x))
        win.append(arm_at_rank[x, w])
        lose.append(arm_at_rank[x, lo])
    return {"ctx": np.concatenate(ctx), "win": np.concatenate(win), "lose": np.concatenate(lose)}


def make_data(cfg: BanditConfig, seed: int) -> BanditData:
    rng = np.random.default_rng(seed)
    k = cfg.num_arms
    level = np.repeat(np.arange(len(cfg.phi_levels)), cfg.contexts_per_level)
    phi = np.asarray(cfg.phi_levels, dtype=np.float64)[level]
    num_ctx = len(phi)
    arm_at_rank = np.stack([rng.permutation(k) for _ in range(num_ctx)])
    rank_of_arm = np.argsort(arm_at_rank, axis=1)
    utility = 1.0 - rank_of_arm / (k - 1)
    if cfg.reference == "uniform":
        ref_logits = np.zeros((num_ctx, k))
    elif cfg.reference == "random":
        ref_logits = rng.standard_normal((num_ctx, k))
    else:
        raise ValueError(f"unknown reference {cfg.reference!r}")
    ref_logp = ref_logits - np.log(np.exp(ref_logits).sum(axis=1, keepdims=True))
    targets = tiny_ref.entropy_target(phi, cfg.entropy_kappa, cfg.entropy_noise, rng)
    arm_entropy = np.empty((num_ctx, k))
    for x in range(num_ctx):
        lm = tiny_ref.build_tiny_ref(float(targets[x]), cfg.vocab_size, rng)
        arm_entropy[x] = lm.response_entropy(lm.sample(k, cfg.response_length, rng))
    train = _pairs(phi, arm_at_rank, cfg.train_pairs_per_context, rng)
    heldout = _pairs(phi, arm_at_rank, cfg.heldout_pairs_per_context, rng)
    return BanditData(phi, level, rank_of_arm, utility, ref_logp, arm_entropy, train, heldout)


# ----------------------------------------------------------------------------------------------
# Dispersion inputs per training pair, computed with preftune's estimator.


def dispersion_inputs(data: BanditData, losses_module) -> dict[str, np.ndarray]:
    """Per training pair: c_true (-log phi scaled to mean 1 over the training pairs, the same
    normalisation as phi_star auto), c_est (the estimator of docs/methods.md#dispersion, with phi_star
    auto from the tiny reference's entropies), and the matching dispersions phi_true and
    phi_est = exp(-c_est)."""
    L = losses_module
    t = data.train
    neg_log_phi = -np.log(data.phi[t["ctx"]])
    c_true = neg_log_phi / neg_log_phi.mean()
    h_chosen = torch.as_tensor(data.arm_entropy[t["ctx"], t["win"]], dtype=torch.float64)
    h_rejected = torch.as_tensor(data.arm_entropy[t["ctx"], t["lose"]], dtype=torch.float64)
    phi_star = L.calibrate_phi_star(h_chosen, h_rejected)
    c_est = torch.as_tensor(L.neg_log_dispersion(h_chosen, h_rejected, phi_star)).double().numpy()
    return {
        "c_true": c_true,
        "c_est": c_est,
        "phi_true": data.phi[t["ctx"]],
        "phi_est": np.exp(-c_est),
        "phi_star": float(torch.as_tensor(phi_star)),
    }


# ----------------------------------------------------------------------------------------------
# Methods: every loss is preftune's; the experiment only feeds it per-pair tensors.

METHODS = ("dpo", "mallows_theta_true", "mallows_theta_est", "mallows_phi_true", "mallows_phi_est")


def method_loss(L, method: str, pc, pr, rc, rr, beta: float, disp: dict[str, torch.Tensor]):
    if method == "dpo":
        return L.dpo(pc, pr, rc, rr, beta=beta)
    if method == "mallows_theta_true":
        return L.mallows_theta(pc, pr, rc, rr, disp["c_true"], beta=beta)
    if method == "mallows_theta_est":
        return L.mallows_theta(pc, pr, rc, rr, disp["c_est"], beta=beta)
    if method == "mallows_phi_true":
        return L.mallows_phi(pc, pr, rc, rr, disp["phi_true"], beta=beta)
    if method == "mallows_phi_est":
        return L.mallows_phi(pc, pr, rc, rr, disp["phi_est"], beta=beta)
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------------
# Metrics


def policy_metrics(logits: np.ndarray, data: BanditData) -> dict[str, np.ndarray]:
    """Per-context metrics of a tabular policy (arrays of shape [X])."""
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    top_arm = np.argmin(data.rank_of_arm, axis=1)
    reward = logp - data.ref_logp  # implicit reward up to beta: log pi / pi_ref
    h = data.heldout
    diff = reward[h["ctx"], h["win"]] - reward[h["ctx"], h["lose"]]
    correct = (diff > 0) + 0.5 * (diff == 0)
    num_ctx = len(data.phi)
    acc = np.bincount(h["ctx"], weights=correct, minlength=num_ctx) / np.bincount(h["ctx"], minlength=num_ctx)
    return {
        "utility": (p * data.utility).sum(axis=1),
        "kl": (p * (logp - data.ref_logp)).sum(axis=1),
        "p_top": p[np.arange(num_ctx), top_arm],
        "p_max": p.max(axis=1),
        "entropy": -(p * logp).sum(axis=1),
        "heldout_acc": acc,
    }


def aggregate(per_ctx: dict[str, np.ndarray], data: BanditData, num_levels: int) -> dict[str, list[float]]:
    """Average each metric over the contexts of each dispersion level; adds `kl_total`, the KL
    averaged over all contexts (the regularisation budget the comparisons are matched on)."""
    out = {
        name: [float(v[data.level == lv].mean()) for lv in range(num_levels)] for name, v in per_ctx.items()
    }
    out["kl_total"] = float(per_ctx["kl"].mean())
    return out


def bayes_heldout_accuracy(data: BanditData, num_levels: int) -> list[float]:
    """Held-out accuracy of the true central ranking: the ceiling for any policy."""
    h = data.heldout
    correct = data.rank_of_arm[h["ctx"], h["win"]] < data.rank_of_arm[h["ctx"], h["lose"]]
    lv = data.level[h["ctx"]]
    return [float(correct[lv == i].mean()) for i in range(num_levels)]


# ----------------------------------------------------------------------------------------------
# Population optimum: what each objective wants with infinite data, no optimiser involved.


def population_optimum(losses_module, phi_levels, num_arms: int, beta: float, methods) -> dict:
    """Minimise each method's *expected* loss for one context per dispersion level, with the arms in
    central order and a uniform reference: every unordered pair is equally likely and its direction
    follows the exact Mallows pairwise probability P(rank i beats rank j) = g_phi(j - i) (checked
    against the sampler in run.sampler_check). MallowsPO-theta uses c = -log phi scaled to mean 1 over
    the levels, as in the bandit. Returns, per method, per-level metrics of the optimal policy (over
    Delta != 0), and the expected loss there and at the reference (every Delta = 0)."""
    L = losses_module
    k, levels = num_arms, len(phi_levels)
    i, j = np.triu_indices(k, 1)
    # one block of pairs per level; the levels share no parameters, so one joint solve is exact
    lv = np.repeat(np.arange(levels), len(i))
    ii, jj = np.tile(i, levels), np.tile(j, levels)
    phi = torch.as_tensor(np.asarray(phi_levels, dtype=np.float64)[lv])
    gap = torch.as_tensor(jj - ii, dtype=torch.float64)
    p_forward = L.mallows_link(gap, phi)  # P(better item wins)
    neg_log_phi = -torch.log(phi)
    disp = {"c_true": neg_log_phi / neg_log_phi.mean(), "phi_true": phi}
    ref = torch.full_like(gap, -np.log(k))

    def expected_loss(method, logits):
        logp = torch.log_softmax(logits, 1)
        fwd = method_loss(L, method, logp[lv, ii], logp[lv, jj], ref, ref, beta, disp).losses
        bwd = method_loss(L, method, logp[lv, jj], logp[lv, ii], ref, ref, beta, disp).losses
        per_pair = p_forward * fwd + (1 - p_forward) * bwd
        return per_pair, torch.bincount(torch.as_tensor(lv), weights=per_pair) / len(i)

    out = {}
    for method in methods:
        # Start just off the reference: the Mallows link jumps at 0 and an exact tie scores g(0+)
        # for both orientations of a pair, which makes Delta = 0 an isolated spike of the expected
        # loss that a line-search optimiser cannot leave (see RESULTS.md).
        theta = (-1e-3 * torch.arange(k, dtype=torch.float64)).repeat(levels, 1).requires_grad_(True)
        opt = torch.optim.LBFGS(
            [theta],
            lr=1,
            max_iter=300,
            tolerance_grad=1e-10,
            tolerance_change=1e-13,
            line_search_fn="strong_wolfe",
        )

        def closure(method=method, theta=theta, opt=opt):
            opt.zero_grad()
            loss = expected_loss(method, theta)[0].sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            at_opt = expected_loss(method, theta)[1].tolist()
            at_ref = expected_loss(method, torch.zeros(levels, k, dtype=torch.float64))[1].tolist()
            logp = torch.log_softmax(theta, 1).numpy()
        p = np.exp(logp)
        out[method] = {
            "p_top": p[:, 0].tolist(),
            "kl": (p * (logp + np.log(k))).sum(1).tolist(),
            "entropy": (-(p * logp).sum(1)).tolist(),
            "utility": (p * (1 - np.arange(k) / (k - 1))).sum(1).tolist(),
            "logit_gap_top_bottom": (logp[:, 0] - logp[:, -1]).tolist(),
            "loss_at_optimum": at_opt,
            "loss_at_reference": at_ref,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Training


def train(
    data: BanditData,
    disp: dict[str, np.ndarray],
    method: str,
    beta: float,
    cfg: BanditConfig,
    seed: int,
    losses_module,
) -> dict:
    """Train a tabular policy from the reference with one method; returns the metric trajectory
    (per dispersion level, every cfg.eval_every steps) and the final metrics."""
    L = losses_module
    gen = torch.Generator().manual_seed(seed)
    t = data.train
    ctx = torch.as_tensor(t["ctx"])
    win = torch.as_tensor(t["win"])
    lose = torch.as_tensor(t["lose"])
    disp_t = {
        k: torch.as_tensor(v, dtype=torch.float64) for k, v in disp.items() if isinstance(v, np.ndarray)
    }
    ref_logp = torch.as_tensor(data.ref_logp, dtype=torch.float64)
    theta = ref_logp.clone().requires_grad_(True)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD([theta], lr=cfg.lr / beta)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    num_levels = len(cfg.phi_levels)
    n = len(ctx)
    batch_size = n if cfg.batch_size <= 0 else min(cfg.batch_size, n)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    trajectory = {"step": []}

    def record(step: int) -> None:
        m = aggregate(policy_metrics(theta.detach().numpy(), data), data, num_levels)
        trajectory["step"].append(step)
        for k, v in m.items():
            trajectory.setdefault(k, []).append(v)

    record(0)
    for step in range(1, cfg.steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        logp = torch.log_softmax(theta, dim=1)
        c, w, lo = ctx[idx], win[idx], lose[idx]
        out = method_loss(
            L,
            method,
            logp[c, w],
            logp[c, lo],
            ref_logp[c, w],
            ref_logp[c, lo],
            beta,
            {k: v[idx] for k, v in disp_t.items()},
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
    final = {k: v[-1] for k, v in trajectory.items() if k != "step"}
    return {"trajectory": trajectory, "final": final}
