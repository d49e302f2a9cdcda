"""The MallowsPO synthetic experiments (experiments/mallows_bandit): the exact Mallows sampler, and a
reduced run whose qualitative findings must match the full run recorded in RESULTS.md.

The bandit findings asserted here are what the full run shows (see RESULTS.md), not the paper's
claims: with Adam, MallowsPO spends *more* of a fixed KL budget at high dispersion than DPO (more mass
on one arm there, and more utility); with SGD it leaves high-dispersion contexts near the reference
at equal beta. A flipped dispersion scale or a wrong phi in the link reverses these (checked below).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from experiments.mallows_bandit import bandit, mallows  # noqa: E402
from experiments.mallows_bandit import run as mb_run  # noqa: E402
from preftune import losses as L  # noqa: E402

LOW, MID, HIGH = 0, 1, 2  # indices of phi = 0.1, 0.5, 0.9
MALLOWS = ("mallows_theta_true", "mallows_phi_true")


# ----------------------------------------------------------------------------------------------
# Sampler


@pytest.mark.parametrize("phi", [0.2, 0.7])
def test_repeated_insertion_matches_brute_force(phi):
    n, size = 5, 60000
    exact = mallows.brute_force_pairwise(n, phi)
    pos = mallows.sample_positions(n, phi, size, np.random.default_rng(1))
    empirical = (pos[:, :, None] < pos[:, None, :]).mean(axis=0)
    se = np.sqrt(exact * (1 - exact) / size) + 1e-12
    assert np.all(np.abs(empirical - exact) < 5 * se + 1e-12)
    # Kendall distances follow phi ** d / Z: compare the mean with the exact one
    kendall = mallows.kendall_from_positions(pos)
    perms_pos = np.argsort(np.array(list(__import__("itertools").permutations(range(n)))), axis=1)
    d = mallows.kendall_from_positions(perms_pos).astype(float)
    w = phi**d / (phi**d).sum()
    assert abs(kendall.mean() - (w * d).sum()) < 5 * np.sqrt((w * d**2).sum() / size)


def test_brute_force_pairwise_is_the_mallows_link():
    """The pairwise probability of items s apart is g_phi(s) for every i (docs/methods.md#mallows_phi) -
    ties the sampler's target to preftune's link."""
    n = 6
    for phi in (0.1, 0.5, 0.9):
        exact = mallows.brute_force_pairwise(n, phi)
        for s in range(1, n):
            g = float(
                L.mallows_link(
                    torch.tensor(float(s), dtype=torch.float64), torch.tensor(phi, dtype=torch.float64)
                )
            )
            for i in range(n - s):
                assert exact[i, i + s] == pytest.approx(g, abs=1e-9)


def test_draw_pairs_uses_the_sampled_order():
    winner, loser = mallows.draw_pairs(10, 0.0, 500, np.random.default_rng(0))  # phi = 0: identity
    assert np.all(winner < loser)
    winner, loser = mallows.draw_pairs(10, 1.0, 20000, np.random.default_rng(0))  # uniform rankings
    assert abs((winner < loser).mean() - 0.5) < 0.02


# ----------------------------------------------------------------------------------------------
# Reduced run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mallows_bandit")
    return mb_run.main(["--quick", "--out", str(out), "--no-plots", "--quiet"])


def _matched(results, optimizer, method, metric, level):
    """Seed-mean of a metric at the headline matched total KL (middle of the common range)."""
    target = results["bandit"]["runs"][optimizer]["matched"]["targets"][1]
    return target["methods"][method][metric]["mean"][level]


def _final(results, optimizer, method, beta, metric, level=None):
    finals = results["bandit"]["runs"][optimizer]["methods"][method][str(beta)]["final"]
    return float(np.mean([f[metric] if level is None else f[metric][level] for f in finals]))


def test_quick_sampler_check_agrees_with_link(quick):
    assert quick["sampler_check"]["max_z"] < 5.0


def test_quick_estimator_tracks_dispersion(quick):
    by_noise = {e["noise"]: e for e in quick["estimator"]["per_noise"]}
    assert by_noise[0.0]["spearman_pairs"]["min"] > 0.95
    assert by_noise[0.25]["spearman_pairs"]["min"] > 0.4
    for e in by_noise.values():
        assert e["mean_c_auto"]["mean"] == pytest.approx(1.0, abs=1e-6)  # phi_star: auto
    # in the bandit, the estimated c follows the true -log phi level by level
    c_est = quick["bandit"]["c_by_level"]["c_est"]
    assert c_est[LOW] > c_est[MID] > c_est[HIGH] > 0


def test_quick_population_optimum(quick):
    """Infinite data: MallowsPO-phi recovers beta * log-ratio = rank gap at every dispersion;
    DPO's policy flattens as phi -> 1; MallowsPO-theta is nearly dispersion-invariant."""
    pop = quick["population_optimum"]
    k, beta = quick["settings"]["num_arms"], pop["beta"]
    phi_opt = pop["methods"]["mallows_phi_true"]
    assert np.allclose(phi_opt["logit_gap_top_bottom"], (k - 1) / beta, atol=1e-3)
    dpo = pop["methods"]["dpo"]
    assert dpo["p_top"][LOW] > dpo["p_top"][MID] > dpo["p_top"][HIGH]
    assert dpo["logit_gap_top_bottom"][HIGH] < 1.0 < 9.0 < dpo["logit_gap_top_bottom"][LOW]
    theta = pop["methods"]["mallows_theta_true"]["logit_gap_top_bottom"]
    assert min(theta) > 0.6 * (k - 1) / beta and max(theta) < 1.1 * (k - 1) / beta
    # the link's jump at 0 makes "every pair tied" the lowest expected MallowsPO-phi loss at phi = 0.9
    assert phi_opt["loss_at_reference"][HIGH] < phi_opt["loss_at_optimum"][HIGH]
    assert phi_opt["loss_at_reference"][LOW] > phi_opt["loss_at_optimum"][LOW]


def test_quick_adam_mallows_spends_kl_at_high_dispersion(quick):
    """Adam, equal total KL: MallowsPO moves the high-dispersion contexts much more than DPO (more
    KL there, more mass on one arm, higher utility) and the low-dispersion ones less. This is the
    opposite of 'MallowsPO keeps more mass off the top arm where people disagree'."""
    for m in MALLOWS:
        assert _matched(quick, "adam", m, "kl", HIGH) > _matched(quick, "adam", "dpo", "kl", HIGH) + 0.4
        assert (
            _matched(quick, "adam", m, "p_max", HIGH) > _matched(quick, "adam", "dpo", "p_max", HIGH) + 0.15
        )
        assert (
            _matched(quick, "adam", m, "utility", HIGH)
            > _matched(quick, "adam", "dpo", "utility", HIGH) + 0.07
        )
        assert _matched(quick, "adam", m, "p_top", LOW) < _matched(quick, "adam", "dpo", "p_top", LOW) - 0.1
        # at equal beta as well
        assert (
            _final(quick, "adam", m, 0.3, "p_max", HIGH)
            > _final(quick, "adam", "dpo", 0.3, "p_max", HIGH) + 0.1
        )


def test_quick_sgd_mallows_leaves_high_dispersion_alone(quick):
    """SGD: at equal beta DPO piles mass on one arm at phi = 0.9 while MallowsPO barely moves there;
    at equal total KL MallowsPO shifts budget from low to mid dispersion (more utility at phi = 0.5)."""
    for m in MALLOWS:
        assert (
            _final(quick, "sgd", m, 0.3, "p_max", HIGH)
            < _final(quick, "sgd", "dpo", 0.3, "p_max", HIGH) - 0.08
        )
        assert _final(quick, "sgd", m, 0.3, "kl", HIGH) < 0.15
        assert _matched(quick, "sgd", m, "kl", MID) > _matched(quick, "sgd", "dpo", "kl", MID) + 0.08
        assert (
            _matched(quick, "sgd", m, "utility", MID) > _matched(quick, "sgd", "dpo", "utility", MID) + 0.02
        )


def test_quick_heldout_accuracy_is_method_independent(quick):
    """Every method learns the same ordering; held-out accuracy differs by < 0.02 at equal KL."""
    for opt in ("adam", "sgd"):
        for level in (LOW, MID, HIGH):
            accs = [_matched(quick, opt, m, "heldout_acc", level) for m in ("dpo", *MALLOWS)]
            assert max(accs) - min(accs) < 0.02


# ----------------------------------------------------------------------------------------------
# The findings can fail: a flipped dispersion scale or a wrong phi reverses them.


def test_flipped_dispersion_reverses_the_allocation():
    cfg = replace(bandit.BanditConfig(contexts_per_level=2, steps=150), lr=0.1)
    data = bandit.make_data(cfg, 0)
    disp = bandit.dispersion_inputs(data, L)
    flipped = dict(disp)
    inverse = 1.0 / disp["c_true"]
    flipped["c_true"] = inverse / inverse.mean()  # high dispersion gets the largest c
    flipped["phi_true"] = 1.0 - disp["phi_true"]  # phi 0.9 <-> 0.1

    def kl_high(d, method):
        return bandit.train(data, d, method, 1.0, cfg, 0, L)["final"]["kl"][HIGH]

    dpo = kl_high(disp, "dpo")
    for method in MALLOWS:
        assert kl_high(disp, method) > dpo > kl_high(flipped, method)
