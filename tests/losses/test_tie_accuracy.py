"""``rewards/accuracies`` counts ties as 1/2; ``rewards/accuracies_strict`` is TRL's strict ``>``."""

import pytest
import torch

from preftune import losses as L
from preftune.losses.output import TIE_TOLERANCE, preference_accuracy


def test_ties_count_half_and_strict_counts_them_zero():
    chosen = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rejected = torch.tensor([0.0, 1.0, TIE_TOLERANCE / 10, -TIE_TOLERANCE / 10])
    assert preference_accuracy(chosen, rejected).item() == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    # strict: the tiny positive difference is a win, the tiny negative one a loss
    assert preference_accuracy(chosen, rejected, strict=True).item() == pytest.approx(2 / 4)
    # just outside the tolerance a difference is a win again
    assert preference_accuracy(torch.tensor([2 * TIE_TOLERANCE]), torch.tensor([0.0])).item() == 1.0


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge"])
def test_policy_equal_to_reference_reads_one_half(method):
    g = torch.Generator().manual_seed(0)
    ref_c, ref_r = -50 - 10 * torch.rand(8, generator=g), -50 - 10 * torch.rand(8, generator=g)
    # float noise of a second forward pass of the same weights: a few ulps of the summed log-probs
    noise = 1e-5 * torch.randn(2, 8, generator=g)
    out = getattr(L, method)(ref_c + noise[0], ref_r + noise[1], ref_c, ref_r, beta=0.1)
    assert out.metrics["rewards/accuracies"].item() == 0.5
    # the strict number is decided by the noise: here it is not 0.5 (the bug the tie rule fixes)
    assert out.metrics["rewards/accuracies_strict"].item() != 0.5


def test_unpaired_all_pairs_accuracy_counts_ties():
    pc = torch.tensor([-10.0, -12.0])
    pr = torch.tensor([-11.0, -13.0])
    emb = torch.eye(2)
    out = L.unpaired_preference_loss(pc, pc.clone(), emb, pr, pr.clone(), emb, beta=0.1)
    assert out.metrics["rewards/accuracies"].item() == 0.5
    assert out.metrics["rewards/accuracies_strict"].item() == 0.0
