"""Parity of the DPO family with TRL 1.16 on identical inputs, by calling TRL's own loss code.

As in test_losses_trl_parity.py, TRL's ``DPOTrainer.compute_loss`` → ``_compute_loss`` run unbound
on a stand-in ``self`` with exactly the attributes they read, and a stand-in model whose fused LM
head returns given per-token log-probs. Here the per-token log-probs are random (not uniform), the
reference is a second stand-in model (so TRL splits the reference's log-probs for LD-DPO itself),
and the stand-in can also return ``log_sum_sq_probs`` for WPO. SimPO, ORPO and KTO are compared
with TRL's ``CPOTrainer``, ``ORPOTrainer`` and ``KTOTrainer`` the same way.

Loss types of the task that TRL 1.16 lacks: none of the DPOTrainer ones; ``bco_pair`` there has no
running reward shift (δ = 0), so δ ≠ 0 is checked against the float64 re-derivation only.
"""

import importlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import preftune.losses as L
from preftune.losses import family as FAM
from preftune.losses import reference_free as RF

# the module (the package exports the function `kto` under the same name)
KTO = importlib.import_module("preftune.losses.kto")

pytest.importorskip("trl")
DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer
KTOTrainer = pytest.importorskip("trl.trainer.kto_trainer").KTOTrainer
CPOTrainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer
ORPOTrainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer").ORPOTrainer

TOL64 = {"rtol": 1e-12, "atol": 1e-12}
TOL32 = {"rtol": 1e-5, "atol": 1e-6}
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
LOGP_METRICS = ("logps/chosen", "logps/rejected")


class _StandInModel:
    """What TRL's fused LM head returns; per-token log-probs chosen by the test."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # read by accelerate's is_peft_model

    def __init__(self, per_token_logps, log_sum_sq=None, kl_per_token_logps=None):
        self.per_token_logps = per_token_logps
        self.log_sum_sq = log_sum_sq
        self.kl_per_token_logps = kl_per_token_logps

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        if self.kl_per_token_logps is not None and kwargs["input_ids"].shape[1] != lp.shape[1] + 1:
            lp = self.kl_per_token_logps  # KTO's forward on the mismatched (KL) sequences
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
            log_sum_sq_probs=self.log_sum_sq,
            aux_loss=None,
        )


class _StandInDPO(SimpleNamespace):
    compute_loss = DPOTrainer.compute_loss
    _compute_loss = DPOTrainer._compute_loss


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def random_batch(b: int, seed: int, dtype=torch.float64, max_len: int = 30):
    """Per-token log-probs for chosen rows then rejected rows (TRL's layout), policy and reference."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (2 * b,), generator=g)
    t = int(lengths.max()) + 1
    pos = torch.arange(t)
    mask = ((pos >= 1) & (pos <= lengths[:, None])).long()  # position 0 is the prompt
    shift = mask[:, 1:].to(torch.float64)
    ref_tok = -0.2 - 2.5 * torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64)
    pol_tok = ref_tok + 0.3 * torch.randn(2 * b, t - 1, generator=g, dtype=torch.float64)
    lss = -0.1 - 2.0 * torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64)
    # padding tokens get log-prob 0, as a masked fused head returns
    pol_tok, ref_tok, lss = (x * shift for x in (pol_tok, ref_tok, lss))
    return SimpleNamespace(
        b=b,
        mask=mask,
        lengths=lengths,
        pol_tok=pol_tok.to(dtype),
        ref_tok=ref_tok.to(dtype),
        lss=lss.to(dtype),
    )


def trl_dpo(
    batch,
    loss_types,
    beta=0.1,
    *,
    loss_weights=None,
    label_smoothing=0.0,
    f_divergence="reverse_kl",
    f_alpha=0.5,
    ld_alpha=None,
    use_weighting=False,
    discopop_tau=0.05,
):
    """TRL 1.16's DPO loss and logged metrics on the batch (reference from a stand-in ref model)."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    model = _StandInModel(batch.pol_tok, batch.lss if use_weighting else None)
    trainer = _StandInDPO(
        model=model,
        ref_model=_StandInModel(batch.ref_tok),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_alpha,
        loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=discopop_tau, max_length=None, gradient_checkpointing_kwargs=None),
    )
    n, t = batch.mask.shape
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": batch.mask,
    }
    loss = trainer.compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours_inputs(batch):
    """The per-sequence inputs preftune's losses take, from the same per-token log-probs."""
    b = batch.b
    pol, ref = batch.pol_tok.sum(1), batch.ref_tok.sum(1)
    return SimpleNamespace(
        pc=pol[:b], pr=pol[b:], rc=ref[:b], rr=ref[b:], len_c=batch.lengths[:b], len_r=batch.lengths[b:]
    )


def assert_metrics(ours, trl_metrics, names=REWARD_METRICS + LOGP_METRICS, rel=1e-10, abs_=1e-10):
    for name in names:
        # TRL averages the accuracy flags in float32 (`.float()`), whatever the input dtype
        tol = {"rel": 1e-6, "abs": 1e-7} if name == "rewards/accuracies" else {"rel": rel, "abs": abs_}
        # TRL's accuracy is the strict comparison (ties count 0); ours counts ties 1/2
        ours_name = "rewards/accuracies_strict" if name == "rewards/accuracies" else name
        assert ours.metrics[ours_name].item() == pytest.approx(trl_metrics[name], **tol), name


def tol64(loss_type):
    """float64 tolerance; TRL's exo_pair takes log ε of a float32 tensor (relative error ~1e-8)."""
    return {"rtol": 1e-7, "atol": 1e-9} if loss_type == "exo_pair" else TOL64


# label smoothing each TRL loss type is checked with (exo_pair needs ε > 0; others read none)
EPS = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.mark.parametrize("loss_type", FAM.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_every_trl_loss_type_matches_in_float64(loss_type, beta):
    batch = random_batch(12, seed=101)
    x = ours_inputs(batch)
    eps = EPS.get(loss_type, 0.0)
    trl_loss, trl_metrics = trl_dpo(batch, loss_type, beta, label_smoothing=eps)
    ours = FAM.dpo_family_loss(
        x.pc, x.pr, x.rc, x.rr, loss_types=loss_type, beta=beta, label_smoothing=eps,
        chosen_lengths=x.len_c, rejected_lengths=x.len_r,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, trl_loss, **tol64(loss_type))
    assert_metrics(ours, trl_metrics)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "discopop", "sigmoid_norm", "apo_down", "sft"])
def test_float32_inputs_match_trl_to_float32_precision(loss_type):
    batch = random_batch(16, seed=102, dtype=torch.float32)
    x = ours_inputs(batch)
    eps = EPS.get(loss_type, 0.0)
    trl_loss, _ = trl_dpo(batch, loss_type, 0.3, label_smoothing=eps)
    ours = FAM.dpo_family_loss(
        x.pc, x.pr, x.rc, x.rr, loss_types=loss_type, beta=0.3, label_smoothing=eps,
        chosen_lengths=x.len_c, rejected_lengths=x.len_r,
    )  # fmt: skip
    assert ours.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, trl_loss, **TOL32)


def test_named_wrappers_match_trl():
    batch = random_batch(10, seed=103)
    x = ours_inputs(batch)
    args = (x.pc, x.pr, x.rc, x.rr)
    cases = [
        (L.robust(*args, beta=0.2, label_smoothing=0.3), "robust", {"label_smoothing": 0.3}),
        (L.exo_pair(*args, beta=0.2, label_smoothing=0.01), "exo_pair", {"label_smoothing": 0.01}),
        (L.nca_pair(*args, beta=0.2), "nca_pair", {}),
        (L.bco_pair(*args, beta=0.2), "bco_pair", {}),
        (L.sppo_hard(*args, beta=0.2), "sppo_hard", {}),
        (L.aot(*args, beta=0.2, label_smoothing=0.05), "aot", {"label_smoothing": 0.05}),
        (L.aot_unpaired(*args, beta=0.2), "aot_unpaired", {}),
        (L.apo_zero(*args, beta=0.2), "apo_zero", {}),
        (L.apo_down(*args, beta=0.2), "apo_down", {}),
        (L.discopop(*args, beta=0.2, tau=0.2), "discopop", {"discopop_tau": 0.2}),
        (
            L.sigmoid_norm(*args, beta=0.2, chosen_lengths=x.len_c, rejected_lengths=x.len_r),
            "sigmoid_norm",
            {},
        ),
        (L.sft(*args, beta=0.2, chosen_lengths=x.len_c), "sft", {}),
    ]
    for ours, loss_type, kwargs in cases:
        trl_loss, _ = trl_dpo(batch, loss_type, 0.2, **kwargs)
        torch.testing.assert_close(ours.loss, trl_loss, **tol64(loss_type), msg=loss_type)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm"]
)
def test_f_divergences_match_trl(divergence, loss_type):
    # TRL's alpha_divergence only runs in float16/bfloat16/float32 (its clamp table has no float64)
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64
    batch = random_batch(12, seed=104, dtype=dtype)
    x = ours_inputs(batch)
    eps = EPS.get(loss_type, 0.0)
    for alpha in (0.3, 0.5, 0.9) if divergence == "alpha_divergence" else (0.5,):
        trl_loss, trl_metrics = trl_dpo(
            batch, loss_type, 0.25, label_smoothing=eps, f_divergence=divergence, f_alpha=alpha
        )
        ours = FAM.dpo_family_loss(
            x.pc, x.pr, x.rc, x.rr, loss_types=loss_type, beta=0.25, label_smoothing=eps,
            f_divergence=divergence, f_alpha=alpha, chosen_lengths=x.len_c, rejected_lengths=x.len_r,
        )  # fmt: skip
        torch.testing.assert_close(
            ours.loss, trl_loss, **(tol64(loss_type) if dtype == torch.float64 else TOL32)
        )
        assert_metrics(ours, trl_metrics, rel=1e-5, abs_=1e-6)


def test_f_dpo_wrapper_matches_trl_and_rejects_non_margin_losses():
    batch = random_batch(8, seed=105)
    x = ours_inputs(batch)
    trl_loss, _ = trl_dpo(batch, "sigmoid", 0.1, f_divergence="js_divergence")
    torch.testing.assert_close(
        FAM.f_dpo(x.pc, x.pr, x.rc, x.rr, divergence="js_divergence").loss, trl_loss, **TOL64
    )
    with pytest.raises(ValueError, match="f_divergence"):
        FAM.dpo_family_loss(x.pc, x.pr, x.rc, x.rr, loss_types="nca_pair", f_divergence="forward_kl")


@pytest.mark.parametrize(
    "types,weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["sigmoid", "sft"], [1.0, 0.5]),
        (["apo_zero", "ipo", "nca_pair", "sppo_hard"], [0.3, 0.1, 2.0, 0.05]),
        (["robust"], None),
    ],
)
def test_weighted_sums_match_trl(types, weights):
    batch = random_batch(12, seed=106)
    x = ours_inputs(batch)
    eps = 0.1 if "robust" in types else 0.0
    trl_loss, trl_metrics = trl_dpo(batch, types, 0.15, loss_weights=weights, label_smoothing=eps)
    ours = FAM.dpo_family_loss(
        x.pc, x.pr, x.rc, x.rr, loss_types=types, loss_weights=weights, beta=0.15, label_smoothing=eps,
        chosen_lengths=x.len_c, rejected_lengths=x.len_r,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    assert_metrics(ours, trl_metrics)
    if types[0] == "sigmoid" and len(types) == 3:
        mpo = FAM.mpo(x.pc, x.pr, x.rc, x.rr, beta=0.15, chosen_lengths=x.len_c)
        torch.testing.assert_close(mpo.loss, trl_loss, **TOL64)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "bco_pair"])
def test_ld_alpha_matches_trl_with_tails_from_shared_length_split(ld_alpha, loss_type):
    batch = random_batch(12, seed=107)
    b = batch.b
    trl_loss, trl_metrics = trl_dpo(batch, loss_type, 0.2, ld_alpha=ld_alpha)
    # what the scorer provides: full sums and the sums beyond each pair's shared length
    shift = batch.mask[:, 1:]
    shared = torch.minimum(batch.lengths[:b], batch.lengths[b:]).repeat(2)
    pol_prefix, pol_tail = L.shared_length_split(batch.pol_tok, shift, shared)
    ref_prefix, ref_tail = L.shared_length_split(batch.ref_tok, shift, shared)
    pol, ref = pol_prefix + pol_tail, ref_prefix + ref_tail
    torch.testing.assert_close(pol, batch.pol_tok.sum(1), **TOL64)
    ours = L.ld_dpo(
        pol[:b], pol[b:], ref[:b], ref[b:], beta=0.2, ld_alpha=ld_alpha, loss_types=loss_type,
        policy_chosen_tail=pol_tail[:b], policy_rejected_tail=pol_tail[b:],
        ref_chosen_tail=ref_tail[:b], ref_rejected_tail=ref_tail[b:],
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    assert_metrics(ours, trl_metrics)  # TRL logs the LD-weighted log-probs; so do we


# TRL 1.16 crashes on use_weighting with "sft" (it scales an expanded tensor in place), so sft under
# WPO weights is covered by the float64 re-derivation only.
@pytest.mark.parametrize(
    "loss_types", [["sigmoid"], ["ipo"], ["sigmoid", "bco_pair", "apo_down"], ["discopop"]]
)
def test_wpo_weighting_matches_trl_use_weighting(loss_types):
    batch = random_batch(12, seed=108)
    b = batch.b
    x = ours_inputs(batch)
    weights = [0.8, 0.2, 1.0][: len(loss_types)]
    trl_loss, _ = trl_dpo(batch, loss_types, 0.1, loss_weights=weights, use_weighting=True)
    aligned = L.wpo_aligned_logps(batch.pol_tok, batch.mask[:, 1:], batch.lss)
    omega = L.wpo_weights(aligned[:b], aligned[b:], x.len_c, x.len_r)
    ours = FAM.dpo_family_loss(
        x.pc, x.pr, x.rc, x.rr, loss_types=loss_types, loss_weights=weights, beta=0.1, pair_weights=omega,
        chosen_lengths=x.len_c, rejected_lengths=x.len_r,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    # the weighting changes the loss: the comparison is sensitive to it
    unweighted, _ = trl_dpo(batch, loss_types, 0.1, loss_weights=weights)
    assert abs(unweighted.item() - trl_loss.item()) > 1e-3


# --------------------------------------------------------------------------------------------------
# SimPO (CPOTrainer), ORPO (ORPOTrainer), KTO (KTOTrainer)


class _StandInCPO(SimpleNamespace):
    cpo_loss = CPOTrainer.cpo_loss
    get_batch_loss_metrics = CPOTrainer.get_batch_loss_metrics


class _StandInORPO(SimpleNamespace):
    odds_ratio_loss = ORPOTrainer.odds_ratio_loss
    get_batch_loss_metrics = ORPOTrainer.get_batch_loss_metrics


def _forward_returning(avg_c, avg_r, nll):
    """A stand-in ``concatenated_forward``: TRL's trainers get the averaged log-probs we give them."""
    logits = torch.zeros(1, 1, 1, dtype=avg_c.dtype)
    return lambda model, batch: (avg_c, avg_r, logits, logits, nll)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, eps):
    x = ours_inputs(random_batch(12, seed=109))
    avg_c, avg_r = x.pc / x.len_c, x.pr / x.len_r
    trainer = _StandInCPO(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps, cpo_alpha=0.0,
        aux_loss_enabled=False, accelerator=_accelerator(),
        concatenated_forward=_forward_returning(avg_c, avg_r, torch.tensor(0.0, dtype=torch.float64)),
    )  # fmt: skip
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(None, {})
    ours = RF.simpo(
        x.pc,
        x.pr,
        beta=beta,
        gamma=gamma,
        label_smoothing=eps,
        chosen_lengths=x.len_c,
        rejected_lengths=x.len_r,
    )
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    assert_metrics(ours, trl_metrics)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_orpo_trainer(beta):
    # short responses: probabilities far from 0; float32, as TRL computes the odds ratio in float32 always
    x = ours_inputs(random_batch(12, seed=110, dtype=torch.float32, max_len=6))
    avg_c, avg_r = x.pc / x.len_c, x.pr / x.len_r
    ours = RF.orpo(x.pc, x.pr, beta=beta, chosen_lengths=x.len_c, rejected_lengths=x.len_r)
    # TRL's NLL comes from the model; we hand it the value of our default SFT term
    trainer = _StandInORPO(
        beta=beta, aux_loss_enabled=False, accelerator=_accelerator(),
        concatenated_forward=_forward_returning(avg_c, avg_r, ours.metrics["nll_loss"].clone()),
    )  # fmt: skip
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(None, {})
    torch.testing.assert_close(ours.loss, trl_loss, **TOL32)
    names = REWARD_METRICS + LOGP_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    assert_metrics(ours, trl_metrics, names=names, rel=1e-5, abs_=1e-6)
    # and a pooled NLL passed in is used as given
    pooled = RF.orpo(
        x.pc, x.pr, beta=beta, chosen_lengths=x.len_c, rejected_lengths=x.len_r, nll=torch.tensor(2.5)
    )
    assert pooled.loss.item() == pytest.approx(2.5 - beta * ours.metrics["log_odds_ratio"].item(), rel=1e-6)


class _StandInKTO(SimpleNamespace):
    compute_loss = KTOTrainer.compute_loss
    _compute_loss = KTOTrainer._compute_loss
    _compute_kl_logps = KTOTrainer._compute_kl_logps


def trl_kto(batch, labels, loss_type, beta, lam_d, lam_u):
    """TRL's KTO loss on N = 2b items, with the mismatched (KL) items given by TRL's rotation by one."""
    n, t = batch.mask.shape
    rot = torch.roll(torch.arange(n), 1)  # (x_i, y_{i-1}); the same prompts, shifted completions
    calculate_kl = loss_type == "kto"
    kl_pol, kl_ref = batch.pol_tok[rot] + 0.05, batch.ref_tok[rot]  # scored under another prompt
    model = _StandInModel(batch.pol_tok, kl_per_token_logps=kl_pol)
    trainer = _StandInKTO(
        model=model, accelerator=_accelerator(), calculate_KL=calculate_kl, precompute_ref_logps=True,
        loss_type=loss_type, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1, args=SimpleNamespace(max_length=None),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": batch.mask,
        "label": labels,
        "ref_logps": batch.ref_tok.sum(1),
    }
    if calculate_kl:
        inputs.update(
            KL_input_ids=torch.zeros(n, t + 2, dtype=torch.long),  # a different width marks the KL forward
            KL_attention_mask=torch.ones(n, t + 2, dtype=torch.long),
            KL_completion_mask=torch.ones(n, t + 2, dtype=torch.long),
            ref_KL_logps=kl_ref.sum(1),
        )
        # the stand-in returns [n, t-1] log-probs; TRL keeps the last t+1 positions and sums them all
    loss = trainer.compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}, kl_pol.sum(1), kl_ref.sum(1)


@pytest.mark.parametrize("lam_d,lam_u", [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize("seed", [111, 112])
def test_kto_matches_trl_kto_trainer(lam_d, lam_u, seed):
    batch = random_batch(8, seed=seed)
    n = batch.mask.shape[0]
    labels = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.6
    trl_loss, trl_metrics, kl_pol, kl_ref = trl_kto(batch, labels, "kto", 0.1, lam_d, lam_u)
    ours = KTO.kto(
        batch.pol_tok.sum(1), batch.ref_tok.sum(1), labels, kl_pol, kl_ref,
        beta=0.1, desirable_weight=lam_d, undesirable_weight=lam_u,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
    assert_metrics(ours, trl_metrics, names=names)
    assert trl_metrics["kl"] > 0  # the reference point is active, not clamped to 0


def test_apo_zero_unpaired_matches_trl_kto_trainer():
    batch = random_batch(8, seed=113)
    n = batch.mask.shape[0]
    labels = torch.arange(n) % 3 != 0
    trl_loss, trl_metrics, _, _ = trl_kto(batch, labels, "apo_zero_unpaired", 0.3, 1.2, 0.9)
    ours = KTO.apo_zero_unpaired(
        batch.pol_tok.sum(1),
        batch.ref_tok.sum(1),
        labels,
        beta=0.3,
        desirable_weight=1.2,
        undesirable_weight=0.9,
    )
    torch.testing.assert_close(ours.loss, trl_loss, **TOL64)
    assert_metrics(ours, trl_metrics, names=("rewards/chosen", "rewards/rejected", "rewards/margins"))
