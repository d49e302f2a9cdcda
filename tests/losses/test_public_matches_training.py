"""Each public loss function and the training path give the same loss, gradients and metrics.

The training path is what the trainer runs for a method name: the registry's :class:`MethodSpec`
turns the config into keywords of :func:`preference_loss` (or, for unpaired methods, of
:func:`unpaired_preference_loss` or the link's own function), with the log-probs length-normalised
where the method asks for it — the steps of ``preftune.method_adapter.LossAdapter``, written out here
so that this test depends only on :mod:`preftune.losses`. The public function is the one of
``preftune.losses`` named after the component (``losses.robust``, ``losses.nca_pair``, ...), called
the way its docstring documents. Parametrized over every registered component, plus the modifiers
(f-divergence, several links, LD-DPO, WPO) and every TRL loss type of :func:`dpo_family_loss`: any
copy of a formula that drifts from the other path fails here.
"""

from __future__ import annotations

import pytest
import torch

import preftune.losses as L
from preftune.losses.family import LOSS_TYPES

B, K, BETA = 6, 3, 0.3
#: The config values the training path reads (non-default ones, so that each option is exercised).
CONFIG = {
    "discopop.tau": 0.2,
    "bco.delta": 0.15,
    "simpo.gamma": 0.7,
    "rpo.tau": 0.4,
    "rpo.diagonal_weight": 0.7,
    "mrpo.weights": "adaptive",
    "mrpo.clip_eps": 0.2,
    "mrpo.clip": "adaptive",
    "kto.desirable_weight": 1.3,
    "kto.undesirable_weight": 0.8,
}
#: label_smoothing per component that takes one (exo_pair needs ε in (0, 1)).
EPS = {"dpo": 0.1, "robust": 0.1, "exo_pair": 0.05, "aot": 0.05, "aot_unpaired": 0.05, "mallows_phi": 0.1}
EPS.update(simpo=0.1)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    refs_c = -5 - 30 * torch.rand(K, B, generator=g, dtype=torch.float64)
    refs_r = -5 - 30 * torch.rand(K, B, generator=g, dtype=torch.float64)
    return {
        "policy_chosen": refs_c[0] + 4 * torch.randn(B, generator=g, dtype=torch.float64),
        "policy_rejected": refs_r[0] + 4 * torch.randn(B, generator=g, dtype=torch.float64),
        "refs_chosen": refs_c,
        "refs_rejected": refs_r,
        "chosen_lengths": torch.randint(2, 20, (B,), generator=g).double(),
        "rejected_lengths": torch.randint(2, 20, (B,), generator=g).double(),
        "c": 0.5 + torch.rand(B, generator=g, dtype=torch.float64),
        "embeddings": torch.randn(B, 8, generator=g, dtype=torch.float64),
        "labels": torch.tensor([True, False, True, True, False, False]),
        "tails_chosen": -3 * torch.rand(K, B, generator=g, dtype=torch.float64),
        "tails_rejected": -3 * torch.rand(K, B, generator=g, dtype=torch.float64),
        "wpo_chosen": -10 * torch.rand(B, generator=g, dtype=torch.float64),
        "wpo_rejected": -10 * torch.rand(B, generator=g, dtype=torch.float64),
    }


def _refs(x, spec):
    """``[K, B]`` for a multi-reference method, else the primary reference ``[B]``."""
    if spec.multi_reference:
        return x["refs_chosen"], x["refs_rejected"]
    return x["refs_chosen"][0], x["refs_rejected"][0]


def _training(method, x, policy_chosen, policy_rejected, **modifiers):
    """The loss the trainer computes for ``method`` (LossAdapter's steps, without the trainer)."""
    spec = L.resolve_method(method)
    kwargs = dict(beta=BETA, label_smoothing=EPS.get(spec.link.name, 0.0), reference_free=spec.reference_free)
    kwargs.update(spec.option_kwargs(CONFIG.get), **spec.loss_kwargs)
    lengths_c, lengths_r = x["chosen_lengths"], x["rejected_lengths"]
    refs_c, refs_r = _refs(x, spec)
    if spec.unpaired:  # the items are the chosen responses, labelled
        return _training_unpaired(spec, kwargs, x, policy_chosen)
    ld_alpha = modifiers.pop("ld_alpha", None)
    if ld_alpha is not None:  # LD-DPO: every log-prob desensitised beyond the pair's shared length
        policy_chosen = L.ld_logps(policy_chosen, x["tails_chosen"][0], ld_alpha)
        policy_rejected = L.ld_logps(policy_rejected, x["tails_rejected"][0], ld_alpha)
        refs_c = L.ld_logps(refs_c, x["tails_chosen"][0], ld_alpha)
        refs_r = L.ld_logps(refs_r, x["tails_rejected"][0], ld_alpha)
    if modifiers.pop("wpo", False):
        kwargs["pair_weights"] = L.wpo_weights(x["wpo_chosen"], x["wpo_rejected"], lengths_c, lengths_r)
    if spec.length_normalize or spec.reference_free:
        policy_chosen, policy_rejected = policy_chosen / lengths_c, policy_rejected / lengths_r
        refs_c, refs_r = refs_c / lengths_c, refs_r / lengths_r
    step = spec.step_kwargs({"c": x["c"], "embeddings": x["embeddings"]})
    refs = (None, None) if spec.reference_free else (refs_c, refs_r)
    kwargs.update(modifiers)
    return L.preference_loss(
        policy_chosen, policy_rejected, *refs, chosen_lengths=lengths_c, **step, **kwargs
    )


def _training_unpaired(spec, kwargs, x, policy):
    labels, ref = x["labels"], x["refs_chosen"][0]
    if spec.takes == "unpaired":  # KTO-style: the link's own function, with its options
        point = {"reference_point": 0.4} if "mismatched" in spec.needs else {}  # KTO's, from mismatched items
        return spec.link.impl(policy, ref, labels, beta=BETA, **point, **kwargs["link_options"])
    kwargs = {k: v for k, v in kwargs.items() if k != "link_options"}
    chosen, rejected = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    emb, lengths = x["embeddings"], x["chosen_lengths"]
    return L.unpaired_preference_loss(
        policy[chosen],
        ref[chosen],
        emb[chosen],
        policy[rejected],
        ref[rejected],
        emb[rejected],
        chosen_lengths=lengths[chosen],
        **kwargs,
    )


def _public(name, x, policy_chosen, policy_rejected):
    """``losses.<name>`` called as documented, on the raw (summed) log-probs."""
    spec = L.resolve_method(name)
    fn = getattr(L, name)
    refs_c, refs_r = _refs(x, spec)
    lengths = {"chosen_lengths": x["chosen_lengths"], "rejected_lengths": x["rejected_lengths"]}
    eps = {"label_smoothing": EPS[spec.link.name]} if spec.link.name in EPS else {}
    if name in ("ipo",):  # the caller normalises (documented), as the trainer does
        lc, lr = x["chosen_lengths"], x["rejected_lengths"]
        return fn(policy_chosen / lc, policy_rejected / lr, refs_c / lc, refs_r / lr, beta=BETA)
    if name in ("simpo", "orpo"):
        gamma = {"gamma": CONFIG["simpo.gamma"]} if name == "simpo" else {}
        return fn(policy_chosen, policy_rejected, beta=BETA, **lengths, **gamma, **eps)
    if name in ("kto", "apo_zero_unpaired"):
        weights = {"desirable_weight": 1.3, "undesirable_weight": 0.8}
        extra = {"reference_point": 0.4} if name == "kto" else {}
        return fn(policy_chosen, refs_c, x["labels"], beta=BETA, **weights, **extra)
    if name == "rpo_unpaired":
        labels, ref, emb = x["labels"], refs_c, x["embeddings"]
        return fn(policy_chosen[labels], ref[labels], emb[labels], policy_chosen[~labels], ref[~labels],
                  emb[~labels], beta=BETA, tau=CONFIG["rpo.tau"], chosen_lengths=x["chosen_lengths"][labels], **eps)  # fmt: skip
    own = {
        "discopop": {"tau": CONFIG["discopop.tau"]},
        "bco_pair": {"delta": CONFIG["bco.delta"]},
        "sigmoid_norm": lengths,
        "sft": {"chosen_lengths": x["chosen_lengths"]},
        "mallows_theta": {"neg_log_dispersion": x["c"]},
        "mallows_phi": {"dispersion": torch.exp(-x["c"])},
        "rpo": {"prompt_embeddings": x["embeddings"], "tau": CONFIG["rpo.tau"]},
        "rpo_diagonal": {"diagonal_weight": CONFIG["rpo.diagonal_weight"]},
        "mrpo": {"clip_eps": CONFIG["mrpo.clip_eps"]},
        "mdpo": {"clip_eps": CONFIG["mrpo.clip_eps"]},
    }.get(name, {})
    return fn(policy_chosen, policy_rejected, refs_c, refs_r, beta=BETA, **own, **eps)


def _policy(x):
    return x["policy_chosen"].clone().requires_grad_(True), x["policy_rejected"].clone().requires_grad_(True)


def _assert_same(public, training, policy, *, metrics=True):
    """Same loss, per-pair losses, gradients (w.r.t. both policy tensors) and shared metrics.

    ``metrics=False`` where the public function takes summed log-probs and the trainer hands the
    pipeline length-normalised ones: the ``logps/*`` and ``rewards/*`` they log are then of different
    quantities (the trainer's are of ā).
    """
    torch.testing.assert_close(public.loss, training.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(public.losses, training.losses, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(public, policy), _grads(training, policy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if not metrics:
        return
    shared = set(public.metrics) & set(training.metrics)
    assert "rewards/margins" in shared
    for key in shared:
        torch.testing.assert_close(public.metrics[key], training.metrics[key], rtol=1e-12, atol=1e-12)


def _grads(out, policy):
    wrt = [p for p in policy if p is not None]
    grads = torch.autograd.grad(out.loss, wrt, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wrt, grads, strict=True)]


@pytest.mark.parametrize("name", list(L.COMPONENTS))
def test_each_public_loss_function_is_the_training_path(name):
    assert callable(getattr(L, name, None)), f"component {name!r} has no public function losses.{name}"
    x = _inputs()
    policy = _policy(x)
    public = _public(name, x, *policy)
    training = _training(name, x, *policy)
    _assert_same(public, training, policy, metrics=name != "sigmoid_norm")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_family_loss_of_each_trl_type_is_the_training_path(loss_type):
    """``dpo_family_loss(loss_types=t)`` against the method whose link has TRL's name ``t``."""
    x = _inputs(seed=1)
    policy = _policy(x)
    name = next(c.name for c in L.COMPONENTS.values() if c.slot == "link" and c.value == loss_type)
    options = {"discopop_tau": CONFIG["discopop.tau"], "bco_delta": CONFIG["bco.delta"]}
    public = L.dpo_family_loss(
        *policy,
        x["refs_chosen"][0],
        x["refs_rejected"][0],
        loss_types=loss_type,
        beta=BETA,
        label_smoothing=EPS.get(name, 0.0),
        chosen_lengths=x["chosen_lengths"],
        rejected_lengths=x["rejected_lengths"],
        **options,
    )
    summed = not L.resolve_method(name).length_normalize
    _assert_same(public, _training(name, x, *policy), policy, metrics=summed)


MODIFIED = [
    ("f_dpo", "robust", {"divergence": "js_divergence", "alpha": 0.5, "loss_types": "robust"}),
    ("f_dpo", "hinge", {"divergence": "alpha_divergence", "alpha": 0.3, "loss_types": "hinge"}),
    ("f_dpo", "dpo", {"divergence": "forward_kl", "alpha": 0.5}),
    ("mpo", "dpo+bco_pair+sft", {}),
    ("ld_dpo", "dpo", {"ld_alpha": 0.4}),
    ("ld_dpo", "apo_zero", {"ld_alpha": 0.0, "loss_types": "apo_zero"}),
    ("wpo", "nca_pair", {}),
    ("wpo", "discopop", {}),
]


@pytest.mark.parametrize(("function", "method", "kwargs"), MODIFIED, ids=[f"{f}-{m}" for f, m, _ in MODIFIED])
def test_modifiers_of_the_public_functions_are_the_training_path(function, method, kwargs):
    x = _inputs(seed=2)
    policy = _policy(x)
    refs = x["refs_chosen"][0], x["refs_rejected"][0]
    eps = EPS.get(method.split("+")[0], 0.0)  # the training path smooths the first link, as the config
    lengths = {"chosen_lengths": x["chosen_lengths"]}
    if function == "f_dpo":
        public = L.f_dpo(*policy, *refs, beta=BETA, label_smoothing=eps, **kwargs)
        training = _training(method, x, *policy, f_divergence=kwargs["divergence"], f_alpha=kwargs["alpha"])
    elif function == "mpo":
        weights = (0.8, 0.2, 1.0)
        public = L.mpo(
            *policy, *refs, beta=BETA, label_smoothing=eps, bco_delta=CONFIG["bco.delta"], **lengths
        )
        training = _training(method, x, *policy, loss_weights=weights)
    elif function == "ld_dpo":
        tails = {
            "policy_chosen_tail": x["tails_chosen"][0],
            "policy_rejected_tail": x["tails_rejected"][0],
            "ref_chosen_tail": x["tails_chosen"][0],
            "ref_rejected_tail": x["tails_rejected"][0],
        }
        public = L.ld_dpo(*policy, *refs, beta=BETA, label_smoothing=eps, **tails, **kwargs)
        training = _training(method, x, *policy, ld_alpha=kwargs["ld_alpha"])
    else:  # WPO: the same pair weights on both paths
        omega = L.wpo_weights(x["wpo_chosen"], x["wpo_rejected"], x["chosen_lengths"], x["rejected_lengths"])
        options = {"discopop_tau": CONFIG["discopop.tau"]}
        public = L.dpo_family_loss(
            *policy, *refs, loss_types=method, beta=BETA, pair_weights=omega, **options
        )
        training = _training(method, x, *policy, wpo=True)
    _assert_same(public, training, policy)
