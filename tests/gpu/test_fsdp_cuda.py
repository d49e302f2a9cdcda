"""FSDP2 on the device with one process (NCCL on a GPU): the sharded step equals the plain one.

preftune's engine pieces as the trainer uses them under ``parallelism: fsdp`` (``shard_policy`` with
the scorer as root, ``clip_grad_norm_`` over DTensors, ``full_state_dict``), on a world of one process,
against the same model unsharded: fp32 losses and weights agree to 1e-4 relative (the CPU's FSDP
tests ask 1e-5; on CUDA the two graphs may reduce in another order, and a wrong gradient or clipping
norm moves weights by far more than either); bf16 mixed precision
(bf16 compute, fp32 reduction) runs and stays near the fp32 losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from preftune import distributed as D
from preftune.data.collate import collate_sequences
from preftune.losses import dpo
from preftune.step import PolicyScorer, make_optimizer
from preftune.testing import tiny_llama

pytestmark = pytest.mark.gpu

STEPS = 3


@pytest.fixture(scope="module")
def one_process_group(device, tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def _batches(device, n=STEPS, pairs=2, vocab=256):
    g = torch.Generator().manual_seed(5)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    out = []
    for _ in range(n):
        prompts = [ids(6), ids(9)][:pairs]
        chosen, rejected = [ids(5), ids(7)][:pairs], [ids(8), ids(4)][:pairs]
        refs = -torch.rand(2, pairs, generator=g) * 40
        out.append((collate_sequences(prompts * 2, chosen + rejected, 0, device), refs.to(device)))
    return out


def _train(root, params, batches, clip) -> list[float]:
    opt = make_optimizer(params, lr=1e-2, device=next(iter(params)).device)
    losses = []
    for batch, refs in batches:
        logps = root(**batch).logps
        n = refs.shape[1]
        loss = dpo(logps[:n], logps[n:], refs[0], refs[1], beta=0.1).loss
        loss.backward()
        clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_one_process_fsdp2_on_the_device_trains_as_the_plain_model(one_process_group, device):
    batches = _batches(device)
    plain = PolicyScorer(tiny_llama(256, seed=3).to(device))
    plain_params = list(plain.parameters())
    want = _train(plain, plain_params, batches, torch.nn.utils.clip_grad_norm_)

    root = D.shard_policy(PolicyScorer(tiny_llama(256, seed=3).to(device)))
    params = list(root.parameters())
    assert all(type(p).__name__ == "DTensor" for p in params)
    got = _train(root, params, batches, D.clip_grad_norm_)
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(want[-1] - want[0]) > 1e-4  # the weights moved

    full = D.full_state_dict(root)
    ref = {k.removeprefix("model."): v for k, v in plain.state_dict().items()}
    for k, v in ref.items():
        key = k if k in full else f"model.{k}"
        assert key in full, (k, sorted(full)[:4])
        diff = float((full[key].double().cpu() - v.double().cpu()).norm())
        assert diff <= 1e-4 * float(v.double().norm()) + 1e-12, (k, diff)


def test_one_process_fsdp2_with_bf16_mixed_precision_runs_near_fp32(one_process_group, device):
    batches = _batches(device)
    fp32 = D.shard_policy(PolicyScorer(tiny_llama(256, seed=4).to(device)))
    want = _train(fp32, list(fp32.parameters()), batches, D.clip_grad_norm_)
    policy = D.mixed_precision_policy("bf16", device)
    assert (policy is not None) == (device.type == "cuda")  # bf16 compute on a GPU; none on the CPU
    mixed = D.shard_policy(PolicyScorer(tiny_llama(256, seed=4).to(device)), mp_policy=policy)
    got = _train(mixed, list(mixed.parameters()), batches, D.clip_grad_norm_)
    assert all(torch.isfinite(torch.tensor(got)))
    assert got == pytest.approx(want, rel=2e-2, abs=2e-2)
