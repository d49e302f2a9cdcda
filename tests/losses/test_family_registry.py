"""The DPO family through the registry: each registered link computes its tested function, composes
where it should (reductions to the single-reference, unscaled, diagonal loss) and is refused, with the
registry's reason, where it cannot.

The pure functions of :mod:`preftune.losses.family` are re-derived from the papers in float64 and
checked against TRL in test_losses_family*.py; here the pipeline is checked against them.
"""

from __future__ import annotations

import pytest
import torch

import preftune.losses as L
from preftune.config import ConfigError, load_config
from preftune.losses.registry import KIND_REFUSALS

B = 6
MARGIN = ["dpo", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm"]
REWARDS = ["nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"]
BATCH = ["aot", "aot_unpaired", "sft"]
FAMILY_TYPE = {"dpo": "sigmoid"}  # component name -> TRL loss type where they differ
EPS = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.05, "aot_unpaired": 0.05}


def _inputs(k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(B, generator=g, dtype=torch.float64) * 20
    pr = -torch.rand(B, generator=g, dtype=torch.float64) * 20
    rc = -torch.rand(k, B, generator=g, dtype=torch.float64) * 20
    rr = -torch.rand(k, B, generator=g, dtype=torch.float64) * 20
    lc = torch.randint(2, 12, (B,), generator=g).double()
    lr = torch.randint(2, 12, (B,), generator=g).double()
    return pc, pr, rc, rr, lc, lr


def _pipeline(name, pc, pr, rc, rr, lc, lr, **kw):
    spec = L.resolve_method(name)
    if spec.length_normalize:  # the trainer's adapter divides log-probs by length for these
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    kw.setdefault("label_smoothing", EPS.get(spec.link.name, 0.0))
    return L.preference_loss(pc, pr, rc, rr, beta=0.3, chosen_lengths=lc, **spec.loss_kwargs, **kw)


@pytest.mark.parametrize("name", [n for n in MARGIN + REWARDS + BATCH if n not in ("dpo",)] + ["dpo"])
def test_each_registered_link_computes_its_family_function(name):
    pc, pr, rc, rr, lc, lr = _inputs()
    got = _pipeline(name, pc, pr, rc, rr, lc, lr)
    want = L.dpo_family_loss(
        pc,
        pr,
        rc,
        rr,
        loss_types=FAMILY_TYPE.get(name, name),
        beta=0.3,
        label_smoothing=EPS.get(name, 0.0),
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loss, want.loss)


def test_simpo_and_orpo_links_compute_their_functions():
    pc, pr, _, _, lc, lr = _inputs(seed=1)
    for name, fn, kw in (
        ("simpo", L.simpo, {"link_options": {"gamma": 0.7}}),
        ("orpo", L.orpo, {}),
    ):
        spec = L.resolve_method(name)
        assert spec.reference_free and spec.length_normalize
        got = L.preference_loss(
            pc / lc, pr / lr, None, None, beta=0.3, reference_free=True, **spec.loss_kwargs, **kw
        )
        extra = {"gamma": 0.7} if name == "simpo" else {}
        want = fn(pc, pr, beta=0.3, chosen_lengths=lc, rejected_lengths=lr, **extra)
        torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)


def test_loss_weights_sum_links_as_mpo():
    pc, pr, rc, rr, lc, lr = _inputs(seed=2)
    got = L.preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.3,
        link=("sigmoid", "bco_pair", "sft"),
        loss_weights=(0.8, 0.2, 1.0),
        chosen_lengths=lc,
    )
    want = L.mpo(pc, pr, rc, rr, beta=0.3, chosen_lengths=lc)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(got.metrics)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "hinge", "robust"])
def test_f_divergence_in_the_pipeline_is_f_dpo(divergence, name):
    pc, pr, rc, rr, lc, lr = _inputs(seed=3)
    got = _pipeline(name, pc, pr, rc, rr, lc, lr, f_divergence=divergence, f_alpha=0.3)
    want = L.f_dpo(
        pc,
        pr,
        rc,
        rr,
        beta=0.3,
        divergence=divergence,
        alpha=0.3,
        loss_types=FAMILY_TYPE.get(name, name),
        label_smoothing=EPS.get(name, 0.0),
    )
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)


def test_robust_with_no_flips_is_dpo_and_sigmoid_norm_with_equal_lengths_is_dpo_at_beta_over_n():
    pc, pr, rc, rr, lc, lr = _inputs(seed=4)
    dpo = L.preference_loss(pc, pr, rc, rr, beta=0.3)
    robust = L.preference_loss(pc, pr, rc, rr, beta=0.3, link="robust", label_smoothing=0.0)
    torch.testing.assert_close(robust.losses, dpo.losses, rtol=0, atol=0)
    n = 5.0
    norm = _pipeline("sigmoid_norm", pc, pr, rc, rr, torch.full((B,), n), torch.full((B,), n))
    torch.testing.assert_close(norm.losses, L.preference_loss(pc, pr, rc, rr, beta=0.3 / n).losses)


@pytest.mark.parametrize("link", [n for n in MARGIN + REWARDS if n != "dpo"])
def test_links_with_mrpo_mdpo_scale_and_rpo_reduce_to_the_plain_loss(link):
    pc, pr, rc, rr, lc, lr = _inputs(seed=5)
    plain = _pipeline(link, pc, pr, rc, rr, lc, lr).losses
    same = (rc.expand(3, B), rr.expand(3, B))  # three equal references
    for reference in ("mrpo", "mdpo"):
        for refs in ((rc, rr), same):  # K = 1, or K = 3 equal references
            got = _pipeline(f"{reference}+{link}", pc, pr, *refs, lc, lr).losses
            torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
    if link in MARGIN:  # a scale c ≡ 1 leaves the margin alone
        ones = torch.ones(B, dtype=torch.float64)
        got = _pipeline(f"mallows_theta+{link}", pc, pr, rc, rr, lc, lr, scale=ones).losses
        torch.testing.assert_close(
            got, plain, rtol=0, atol=0
        )  # RPO forms contrasts of margins: its own-pair ablation with w = 1 is the plain loss
        got = _pipeline(f"rpo_diagonal+{link}", pc, pr, rc, rr, lc, lr, diagonal_weight=1.0).losses
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)


REFUSED = [
    ("nca_pair+rpo", KIND_REFUSALS["rewards"]["pairing"]),
    ("sppo_hard+rpo_uniform", KIND_REFUSALS["rewards"]["pairing"]),
    ("apo_zero+mallows_theta", KIND_REFUSALS["rewards"]["scale"]),
    ("aot+mallows_theta", KIND_REFUSALS["batch"]["scale"]),
    ("sft+rpo", KIND_REFUSALS["batch"]["pairing"]),
    ("simpo+mrpo", "uses no reference model"),
    ("orpo+mallows_theta", "odds need probabilities"),
    ("kto+mrpo", "unpaired rows have no pair-level"),
    ("kto+rpo_unpaired", "values each item on its own"),
    ("kto+dpo", KIND_REFUSALS["unpaired"]["loss_weights"]),
]


@pytest.mark.parametrize(("method", "reason"), REFUSED, ids=[m for m, _ in REFUSED])
def test_refused_compositions_give_the_registrys_reason_in_the_config_error(method, reason):
    with pytest.raises(L.MethodError) as err:
        L.resolve_method(method)
    assert reason in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as cfg_err:
        load_config({"method": method})
    assert reason in str(cfg_err.value) and str(cfg_err.value).startswith("method:")


MODIFIER_REFUSED = [
    ({"method": "aot", "wpo": True}, "wpo:", KIND_REFUSALS["batch"]["wpo"]),
    ({"method": "rpo", "ld_alpha": 0.5}, "ld_alpha:", "no shared length"),
    ({"method": "rpo_uniform", "wpo": True}, "wpo:", "two different pairs"),
    (
        {"method": "nca_pair", "f_divergence": "forward_kl"},
        "f_divergence:",
        KIND_REFUSALS["rewards"]["f_divergence"],
    ),
    ({"method": "kto", "ld_alpha": 0.5}, "ld_alpha:", KIND_REFUSALS["unpaired"]["ld_alpha"]),
    ({"method": "ipo", "f_divergence": "js_divergence"}, "f_divergence:", "length-normalises"),
    ({"method": "dpo+sft", "loss_weights": [1.0]}, "loss_weights:", "1 weights for the 2 links"),
    ({"method": "exo_pair"}, "label_smoothing:", "exo_pair needs ε in (0, 1)"),
    ({"method": "simpo", "references": ["policy"]}, "references:", "uses no reference model"),
    ({"method": "dpo", "ld_alpha": 0.5, "reference_mode": "online"}, "ld_alpha:", "precompute"),
]


@pytest.mark.parametrize(
    ("cfg", "key", "reason"), MODIFIER_REFUSED, ids=[str(c) for c, _, _ in MODIFIER_REFUSED]
)
def test_refused_modifiers_are_config_errors_naming_the_key(cfg, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)


def test_reference_free_methods_switch_references_off_and_options_reach_the_links():
    cfg = load_config({"method": "simpo", "simpo": {"gamma": 1.5}})
    assert cfg.reference_free
    spec = L.resolve_method("discopop+mrpo")
    assert spec.option_kwargs(lambda key: {"discopop.tau": 0.2}.get(key, "x"))["link_options"] == {"tau": 0.2}
