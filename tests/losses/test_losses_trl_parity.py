"""Parity with TRL 1.16's DPO loss on identical inputs, by calling TRL's own code.

TRL 1.16 has no standalone ``dpo_loss``: the loss lives inside ``DPOTrainer.compute_loss`` (public)
→ ``_compute_loss``, which runs the model and reads a handful of trainer attributes. We call those
methods unbound on a stand-in ``self`` that carries exactly the attributes they read (set as
``DPOTrainer.__init__`` sets them from ``DPOConfig``) and a stand-in model whose "fused LM head"
returns per-token log-probs summing to the per-sequence values under test. With
``precompute_ref_log_probs=True`` the reference log-probs come straight from the inputs.

Label smoothing: TRL 1.16's ``sigmoid`` loss ignores ``label_smoothing`` (it now only feeds
``robust``, ``exo_pair`` and ``aot``). Conservative DPO, our ``label_smoothing``, is checked against
TRL two ways: its ``aot`` loss on one pair at a time (sorting a single element is the identity, and
what remains is ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``), and ``(1−ε)·sigmoid + ε·sigmoid(swapped)``.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import preftune.losses as L

trl = pytest.importorskip("trl")
DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer


class _StandInModel:
    """Returns what TRL's fused LM head returns; only ``log_probs`` matters for the loss."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
        )


class _StandInTrainer(SimpleNamespace):
    compute_loss = DPOTrainer.compute_loss
    _compute_loss = DPOTrainer._compute_loss


def trl_dpo_loss(pc, pr, rc, rr, len_c, len_r, loss_type, beta, label_smoothing=0.0):
    """TRL's loss and logged metrics for per-sequence log-probs with the given completion lengths."""
    b = pc.shape[0]
    lengths = torch.cat([len_c, len_r])
    t = int(lengths.max()) + 1
    pos = torch.arange(t)
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()  # position 0 is the prompt
    per_token = completion_mask[:, 1:].to(pc.dtype) * (torch.cat([pc, pr]) / lengths)[:, None]
    model = _StandInModel(per_token)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = _StandInTrainer(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05, max_length=None),
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trainer.compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_inputs(b: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rc = -5 - 60 * torch.rand(b, generator=g, dtype=torch.float64)
    rr = -5 - 60 * torch.rand(b, generator=g, dtype=torch.float64)
    pc = rc + 6 * torch.randn(b, generator=g, dtype=torch.float64)
    pr = rr + 6 * torch.randn(b, generator=g, dtype=torch.float64)
    len_c = torch.randint(1, 40, (b,), generator=g)
    len_r = torch.randint(1, 40, (b,), generator=g)
    return [t.to(dtype) for t in (pc, pr, rc, rr)] + [len_c, len_r]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_hinge_match_trl_with_metrics(dtype, beta):
    pc, pr, rc, rr, len_c, len_r = random_inputs(16, seed=61, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for loss_type, ours_fn in (("sigmoid", L.dpo), ("hinge", L.hinge)):
        trl_loss, trl_metrics = trl_dpo_loss(pc, pr, rc, rr, len_c, len_r, loss_type, beta)
        ours = ours_fn(pc, pr, rc, rr, beta=beta)
        torch.testing.assert_close(ours.loss, trl_loss.to(ours.loss.dtype), **tol)
        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            # TRL's accuracy is the strict comparison (ties count 0); ours counts ties 1/2
            ours_name = "rewards/accuracies_strict" if name == "rewards/accuracies" else name
            got = ours.metrics[ours_name].item()
            assert got == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_trl_on_length_normalised_log_probs(beta):
    pc, pr, rc, rr, len_c, len_r = random_inputs(16, seed=62)
    trl_loss, _ = trl_dpo_loss(pc, pr, rc, rr, len_c, len_r, "ipo", beta)
    ours = L.ipo(pc / len_c, pr / len_r, rc / len_c, rr / len_r, beta=beta)
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-12, atol=1e-12)
    # without length normalisation the two differ: the test is sensitive to it
    assert abs(L.ipo(pc, pr, rc, rr, beta=beta).loss.item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_dpo_matches_trl(eps):
    pc, pr, rc, rr, len_c, len_r = random_inputs(12, seed=63)
    beta = 0.2
    ours = L.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    # TRL's cDPO formula in `aot`, one pair at a time
    per_pair = torch.stack(
        [
            trl_dpo_loss(
                pc[i : i + 1],
                pr[i : i + 1],
                rc[i : i + 1],
                rr[i : i + 1],
                len_c[i : i + 1],
                len_r[i : i + 1],
                "aot",
                beta,
                eps,
            )[0]
            for i in range(12)
        ]
    )
    torch.testing.assert_close(ours.losses, per_pair, rtol=1e-12, atol=1e-12)
    # and as a mixture of TRL's sigmoid loss on the pairs and on the swapped pairs
    straight, _ = trl_dpo_loss(pc, pr, rc, rr, len_c, len_r, "sigmoid", beta)
    swapped, _ = trl_dpo_loss(pr, pc, rr, rc, len_r, len_c, "sigmoid", beta)
    torch.testing.assert_close(ours.loss, (1 - eps) * straight + eps * swapped, rtol=1e-12, atol=1e-12)
    # TRL's sigmoid loss itself ignores label_smoothing (documented in docs/methods.md)
    ignored, _ = trl_dpo_loss(pc, pr, rc, rr, len_c, len_r, "sigmoid", beta, eps)
    torch.testing.assert_close(ignored, straight)
