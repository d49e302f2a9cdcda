"""What the trainer supplies to the DPO family's modifiers, checked against direct computations.

WPO's aligned sums and LD-DPO's tails from the chunked scorer (fused and autograd heads, plain and
shared-prompt rows) against full logits; KTO's mismatched items; BCO's running δ in the adapter's
state; the reference cache key for tails.
"""

from __future__ import annotations

import pytest
import torch

from preftune import losses as L
from preftune.config import load_config
from preftune.data.collate import collate_sequences, collate_shared_prompt_pairs
from preftune.method_adapter import LossAdapter, SideScores
from preftune.references import ModelView
from preftune.scoring import score_batch
from preftune.testing import tiny_llama

from .test_scoring import random_batch


def _full_logits_reference(model, prompts, comps, tail_from):
    """Per sequence, from the model's own logits: Σ log p, Σ[log p − log Σ p²], Σ_{rank > tail_from} log p."""
    logps, wpo, tails = [], [], []
    for p, c, k in zip(prompts, comps, tail_from):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1)
        pos = range(len(p) - 1, len(p) + len(c) - 1)  # positions predicting completion tokens
        tok = torch.stack([logp[t, ids[0, t + 1]] for t in pos])
        sq = torch.stack([torch.logsumexp(2 * logp[t], -1) for t in pos])
        logps.append(tok.sum())
        wpo.append((tok - sq).sum())
        tails.append(tok[k:].sum())
    return torch.stack(logps), torch.stack(wpo), torch.stack(tails)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [0, 5])
def test_wpo_sums_and_ld_tails_equal_the_full_logit_computation(fused, chunk, monkeypatch):
    model = tiny_llama(300, seed=3).eval()
    prompts, comps = random_batch(300)
    tail_from = [min(len(c), 3) - 1 for c in comps]  # includes 0 (whole completion is tail)
    if not fused:  # force the autograd path: a head that is not a plain nn.Linear
        monkeypatch.setattr("preftune.scoring._fusable", lambda head: False)
    batch = collate_sequences(prompts, comps, pad_token_id=0)
    got = score_batch(model, **batch, chunk_tokens=chunk, with_wpo=True, tail_from=torch.tensor(tail_from))
    want_logps, want_wpo, want_tail = _full_logits_reference(model, prompts, comps, tail_from)
    torch.testing.assert_close(got.logps.double(), want_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.wpo.double(), want_wpo, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.tail.double(), want_tail, atol=1e-4, rtol=1e-5)
    assert not got.wpo.requires_grad


def test_tails_carry_gradient_and_match_on_shared_prompt_rows():
    model = tiny_llama(300, seed=4).eval()
    prompts, comps = random_batch(300, seed=1, n=6)
    prompts = prompts[:3]
    chosen, rejected = comps[:3], comps[3:]
    shared = [min(len(a), len(b)) for a, b in zip(chosen, rejected)]
    plain = score_batch(
        model,
        **collate_sequences(prompts * 2, chosen + rejected, pad_token_id=0),
        tail_from=torch.tensor(shared * 2),
    )
    rows = collate_shared_prompt_pairs(prompts, chosen, rejected, 0, "cpu")
    got = score_batch(model, **rows, tail_from=torch.tensor(shared * 2))
    torch.testing.assert_close(got.tail, plain.tail, atol=1e-5, rtol=1e-5)
    # the shorter response of each pair has no tail
    for i, (a, b) in enumerate(zip(chosen, rejected)):
        short = i if len(a) <= len(b) else i + 3
        assert float(plain.tail[short].detach()) == 0.0
    plain.tail.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_kto_mismatched_side_rotates_completions_by_one():
    class Item:
        def __init__(self, i):
            self.prompt_ids, self.completion_ids = [i], [100 + i]

    view = ModelView("policy", None, None, tokenized={"train": [Item(i) for i in range(4)]})
    prompts, comps = view.sequences("train", "kl")
    assert prompts == [[0], [1], [2], [3]] and comps == [[103], [100], [101], [102]]
    assert view.sequences("train", "kl", [2, 0]) == ([[2], [0]], [[101], [103]])


def _adapter(**cfg):
    return LossAdapter.from_config(load_config({"beta": 0.5, **cfg}))


def test_kto_adapter_uses_the_mismatched_items_for_its_reference_point():
    g = torch.Generator().manual_seed(0)
    pol = -torch.rand(6, generator=g, dtype=torch.float64) * 10
    ref = -torch.rand(1, 6, generator=g, dtype=torch.float64) * 10
    kl_p = -torch.rand(6, generator=g, dtype=torch.float64) * 10
    kl_r = kl_p[None] - 0.3  # mean log-ratio 0.3 > 0
    labels = torch.tensor([True, False, True, True, False, False])
    lengths = {"completion": torch.full((6,), 4), "kl": torch.full((6,), 4)}
    adapter = _adapter(method="kto", kto={"desirable_weight": 1.2})
    got = adapter(
        SideScores({"completion": pol, "kl": kl_p}, lengths),
        SideScores({"completion": ref, "kl": kl_r}),
        labels=labels,
    )
    want = L.kto(pol, ref[0], labels, kl_p, kl_r[0], beta=0.5, desirable_weight=1.2)
    torch.testing.assert_close(got.losses, want.losses)
    assert float(got.metrics["kl"]) == pytest.approx(0.3)


def _pairs(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    policy = {s: -torch.rand(b, generator=g, dtype=torch.float64) * 20 for s in ("chosen", "rejected")}
    refs = {s: -torch.rand(1, b, generator=g, dtype=torch.float64) * 20 for s in ("chosen", "rejected")}
    lengths = {s: torch.randint(2, 9, (b,), generator=g) for s in ("chosen", "rejected")}
    return policy, lengths, refs


def test_bco_running_delta_updates_while_training_and_round_trips():
    adapter = _adapter(method="bco_pair", bco={"delta": "running"})
    policy, lengths, refs = _pairs()
    out1 = adapter(SideScores(policy, lengths), SideScores(refs))
    r = 0.5 * torch.cat([policy["chosen"] - refs["chosen"][0], policy["rejected"] - refs["rejected"][0]])
    assert adapter.state["bco_count"] == 1 and adapter.state["bco_delta"] == pytest.approx(float(r.mean()))
    want = L.bco_pair(policy["chosen"], policy["rejected"], refs["chosen"], refs["rejected"], 0.5, r.mean())
    torch.testing.assert_close(out1.losses, want.losses)
    with torch.no_grad():  # evaluation leaves δ alone
        adapter(SideScores(policy, lengths), SideScores(refs))
    assert adapter.state["bco_count"] == 1
    policy2, _, refs2 = _pairs(seed=1)
    adapter(SideScores(policy2, lengths), SideScores(refs2))
    r2 = 0.5 * torch.cat([policy2["chosen"] - refs2["chosen"][0], policy2["rejected"] - refs2["rejected"][0]])
    assert adapter.state["bco_delta"] == pytest.approx(float((r.mean() + r2.mean()) / 2))
    fresh = _adapter(method="bco_pair", bco={"delta": "running"})
    fresh.load_state_dict(adapter.state_dict())
    assert fresh.state == adapter.state


def test_ld_alpha_and_wpo_in_the_adapter_equal_the_family_functions():
    policy, lengths, refs = _pairs(seed=3)
    tails = {f"{s}_tail": v * 0.4 for s, v in policy.items()}
    ref_tails = {f"{s}_tail": v * 0.3 for s, v in refs.items()}
    got = _adapter(method="dpo", ld_alpha=0.25)(
        SideScores(policy, lengths, tail={s: tails[f"{s}_tail"] for s in policy}),
        SideScores(refs, tail={s: ref_tails[f"{s}_tail"] for s in refs}),
    )
    want = L.ld_dpo(
        policy["chosen"],
        policy["rejected"],
        refs["chosen"],
        refs["rejected"],
        beta=0.5,
        ld_alpha=0.25,
        policy_chosen_tail=tails["chosen_tail"],
        policy_rejected_tail=tails["rejected_tail"],
        ref_chosen_tail=ref_tails["chosen_tail"],
        ref_rejected_tail=ref_tails["rejected_tail"],
    )
    torch.testing.assert_close(got.losses, want.losses)

    aligned = {f"{s}_wpo": v - 1.0 for s, v in policy.items()}
    got = _adapter(method="dpo", wpo=True)(
        SideScores(policy, lengths, wpo={s: aligned[f"{s}_wpo"] for s in policy}), SideScores(refs)
    )
    weights = L.wpo_weights(
        aligned["chosen_wpo"], aligned["rejected_wpo"], lengths["chosen"], lengths["rejected"]
    )
    want = L.dpo_family_loss(
        policy["chosen"], policy["rejected"], refs["chosen"], refs["rejected"], beta=0.5, pair_weights=weights
    )
    torch.testing.assert_close(got.losses, want.losses)
    assert float(got.metrics["wpo/weight"]) == pytest.approx(float(weights.mean()))


def test_reference_tails_get_their_own_cache_entry(tiny_model_dir, tmp_path):
    from preftune.config import load_config as load
    from preftune.trainer import Trainer

    rows = [
        {"prompt": "Q: 1+1?", "chosen": " 2 is right", "rejected": " 3"},
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5 or so"},
    ]
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {
        "model": str(tiny_model_dir),
        "data": {"train": str(data)},
        "batch_size": 2,
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "report_to": [],
    }
    plain = Trainer(load(base)).run.references
    ld = Trainer(load({**base, "ld_alpha": 0.5, "overwrite_output_dir": True})).run.references
    assert "chosen_tail" not in plain.scores["train"]
    tail = ld.scores["train"]["chosen_tail"]
    assert tail.shape == (1, 2)
    # pair 0: chosen is longer than rejected, so it has a (negative) tail; pair 1's chosen is shorter
    assert float(tail[0, 0]) < 0 and float(tail[0, 1]) == 0.0
    torch.testing.assert_close(ld.scores["train"]["chosen_logps"], plain.scores["train"]["chosen_logps"])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) >= 2  # two entries, not one overwritten
