"""Checkpoints: pickle-free state files that load back exactly, and nothing in a checkpoint runs code."""

from __future__ import annotations

import copy
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from preftune import statefile
from preftune.checkpointing import TrainingError, load_checkpoint
from preftune.trainer import train

from .conftest import losses_by_step


def _same(a, b) -> bool:
    """Exact equality of nested state, types included (a tuple is not a list, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def test_nested_state_round_trips_exactly(tmp_path):
    state = {
        "ints": (1, -(2**40), True, None),
        0: [1.5, float("inf"), float("nan"), "text"],
        "tensors": {
            "bf16": torch.randn(3, 2).bfloat16(),
            "scalar": torch.tensor(3.0),
            "long": torch.arange(4),
        },
        "numpy": (np.arange(5, dtype=np.uint32), np.float64(0.25)),
        "empty": ({}, [], ()),
    }
    statefile.save_state(state, tmp_path, "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    assert _same(statefile.load_state(tmp_path, "s"), state)
    assert not _same({"a": (1,)}, {"a": [1]})  # the comparison itself tells tuples from lists


def test_values_that_are_not_data_are_refused(tmp_path):
    with pytest.raises(statefile.StateFileError, match=r"state\['f'\].*function"):
        statefile.save_state({"f": print}, tmp_path, "s")


def _tiny_step_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _step(model, optimizer, scheduler, seed):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_adamw_and_scheduler_state_round_trip_and_continue_identically(tmp_path, fused):
    from transformers import get_scheduler

    def make():
        model = _tiny_step_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), fused=fused or None)
        sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
        return model, opt, sched

    model, opt, sched = make()
    for s in range(3):
        _step(model, opt, sched, s)
    statefile.save_state(opt.state_dict(), tmp_path, "optimizer")
    statefile.save_state(sched.state_dict(), tmp_path, "scheduler")
    loaded_opt = statefile.load_state(tmp_path, "optimizer")
    assert _same(loaded_opt, opt.state_dict())
    assert loaded_opt["state"][0]["step"].shape == () and loaded_opt["param_groups"][0]["betas"] == (
        0.8,
        0.99,
    )
    assert _same(statefile.load_state(tmp_path, "scheduler"), sched.state_dict())

    model2, opt2, sched2 = make()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(loaded_opt)
    sched2.load_state_dict(statefile.load_state(tmp_path, "scheduler"))
    for s in range(3, 6):
        _step(model, opt, sched, s)
        _step(model2, opt2, sched2, s)
        assert sched2.get_last_lr() == sched.get_last_lr()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rng_streams_continue_identically_after_restore(tmp_path):
    from preftune.checkpointing import rng_state as _rng_state
    from preftune.checkpointing import set_rng_state as _set_rng_state

    random.seed(1)
    torch.manual_seed(2)
    np.random.seed(3)
    statefile.save_state(_rng_state(), tmp_path, "rng")

    def draw():
        return random.random(), torch.rand(3).tolist(), np.random.rand(3).tolist(), random.getrandbits(64)

    expected = draw()
    draw()  # move every stream on
    _set_rng_state(statefile.load_state(tmp_path, "rng"))
    assert draw() == expected


class _Trap:
    """Unpickling this creates ``marker``: what a crafted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, names=("rng", "optimizer")):
    for name in names:
        torch.save({"state": _Trap(marker)}, path / f"{name}.pt")
    # the trap works: plain unpickling would create the marker
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Trap(probe)))
    assert probe.exists()
    probe.unlink()


def test_resume_never_unpickles_files_planted_in_a_checkpoint(base_config, tmp_path):
    common = dict(max_steps=4, save_steps=2, output_dir=str(tmp_path / "run"))
    full = train(base_config(output_dir=str(tmp_path / "full"), max_steps=4))
    train(base_config(**{**common, "max_steps": 2}))  # stops after checkpoint-2
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert statefile.exists(ckpt, "rng") and not list(ckpt.glob("*.pt"))
    marker = tmp_path / "pwned"
    _plant(ckpt, marker)
    resumed = train(base_config(resume=True, **common))
    assert not marker.exists()
    a, b = losses_by_step(full.metrics_path), losses_by_step(resumed.metrics_path)
    assert a == pytest.approx(b, abs=1e-6)


def test_old_format_files_load_only_as_plain_tensors(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from preftune.checkpointing import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=2)

    # an old checkpoint with plain tensors in its .pt files still loads
    for name, state in (("optimizer", opt.state_dict()), ("scheduler", sched.state_dict())):
        torch.save(state, ckpt / f"{name}.pt")
        for p in statefile.paths(ckpt, name):
            p.unlink()
    assert load_checkpoint(ckpt, model, opt, sched)["step"] == 1

    # one whose rng.pt would run code is refused, naming the file, and the code never runs
    for p in statefile.paths(ckpt, "rng"):
        p.unlink()
    marker = tmp_path / "pwned"
    _plant(ckpt, marker, names=("rng",))
    with pytest.raises(TrainingError, match=r"rng\.pt: refusing") as err:
        load_checkpoint(ckpt, model, opt, sched)
    assert "\n" not in str(err.value)
    assert not marker.exists() and not os.path.exists("pwned")


# ------------------------------------------------------------------------------ checkpoint directories


@pytest.fixture
def tiny_parts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, tok, opt, sched


def _train_one_step(model, opt, sched):
    ids = torch.arange(12).view(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path, tiny_parts):
    from preftune.checkpointing import save_checkpoint

    model, tok, opt, sched = tiny_parts
    _train_one_step(model, opt, sched)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state, sched_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    torch.manual_seed(5)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1, "global_batch": 4}, keep=2)
    expected_draw = torch.rand(2)

    _train_one_step(model, opt, sched)  # move everything on, then restore
    torch.rand(7)
    state = load_checkpoint(ckpt, model, opt, sched)
    assert state == {"step": 1, "global_batch": 4}
    assert torch.equal(torch.rand(2), expected_draw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert _same(opt.state_dict(), opt_state) and _same(sched.state_dict(), sched_state)


def test_rotation_keeps_the_newest_n(tmp_path, tiny_parts):
    from preftune.checkpointing import find_checkpoints, save_checkpoint

    model, tok, opt, sched = tiny_parts
    for step in (1, 2, 3, 10, 11):  # 10 sorts before 2 as text: the order must be numeric
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=3)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10", "checkpoint-11"]
    save_checkpoint(tmp_path, 12, model, opt, sched, {"step": 12}, keep=0)  # 0 keeps all
    assert len(find_checkpoints(tmp_path)) == 4


def test_failed_write_leaves_the_old_directory_intact(tmp_path):
    import errno

    from preftune.checkpointing import write_atomically

    target = tmp_path / "checkpoint-2"
    write_atomically(target, lambda d: (d / "weights").write_text("old"))

    def half_written(d):
        (d / "weights").write_text("new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError, match=r"could not write .*checkpoint-2: No space left on device"):
        write_atomically(target, half_written)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no .tmp / .old left behind
    write_atomically(target, lambda d: (d / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new"


# ------------------------------------------------------------------------------ manifests and fallback


def test_manifest_lists_every_file_and_verification_catches_each_kind_of_damage(tmp_path, tiny_parts):
    import json

    from preftune.checkpointing import save_checkpoint, verify_checkpoint

    model, tok, opt, sched = tiny_parts
    _train_one_step(model, opt, sched)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=0)
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and "model/model.safetensors" in listed and "rng.json" in listed
    assert verify_checkpoint(ckpt) is None

    weights = ckpt / "model" / "model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 1  # one bit, same size: only the hash can tell
    weights.write_bytes(bytes(flipped))
    assert verify_checkpoint(ckpt) == "model/model.safetensors does not match its sha256"
    weights.write_bytes(original[:100])
    assert (
        verify_checkpoint(ckpt) == f"model/model.safetensors has 100 bytes, the manifest says {len(original)}"
    )
    weights.write_bytes(original)
    (ckpt / "scheduler.json").unlink()
    assert verify_checkpoint(ckpt) == "scheduler.json is missing"
    (ckpt / "manifest.json").unlink()
    assert "no manifest.json" in verify_checkpoint(ckpt)


def test_resume_selection_falls_back_to_the_newest_intact_checkpoint(tmp_path, tiny_parts):
    from preftune.checkpointing import save_checkpoint, select_resume_checkpoint

    model, tok, opt, sched = tiny_parts
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep=0)
    messages = []
    assert select_resume_checkpoint(tmp_path, messages.append) == tmp_path / "checkpoint-3"
    assert messages == []
    (tmp_path / "checkpoint-3" / "rng.safetensors").unlink()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert select_resume_checkpoint(tmp_path, messages.append) == tmp_path / "checkpoint-1"
    assert messages == [
        "resume: skipping damaged checkpoint-3 (rng.safetensors is missing); "
        "checkpoint-2 (trainer_state.json has 2 bytes, the manifest says "
        f"{len(__import__('json').dumps({'step': 2}, indent=1))}); resuming from checkpoint-1"
    ]
    (tmp_path / "checkpoint-1" / "manifest.json").unlink()
    with pytest.raises(TrainingError, match=r"has no intact checkpoint to resume from: checkpoint-3") as e:
        select_resume_checkpoint(tmp_path, messages.append)
    assert "\n" not in str(e.value) and "checkpoint-1 (no manifest.json" in str(e.value)
    assert select_resume_checkpoint(tmp_path / "empty") is None


def test_no_source_file_loads_pickles():
    """Audit: nothing in preftune unpickles (torch.load only with weights_only=True, no pickle.load)."""
    import re
    from pathlib import Path

    import preftune

    unsafe = []
    for path in Path(preftune.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)|pickle\.loads?\(|Unpickler\(", text):
            if m.group(0).startswith("torch.load(") and "weights_only=True" in m.group(1):
                continue
            unsafe.append(f"{path.name}: {m.group(0)}")
    assert unsafe == []


@pytest.mark.parametrize("sharded", [False, True])
def test_one_interface_writes_and_restores_both_formats(tmp_path, tiny_model_dir, sharded):
    """save_checkpoint/load_checkpoint hold both formats: safetensors, and DCP (sharded=True; one
    process without a process group here), each restoring the weights, the optimizer and the RNG."""
    from transformers import AutoModelForCausalLM

    from preftune.checkpointing import checkpoint_format, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    saved = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep=2, sharded=sharded)
    expected_draw = torch.rand(3)
    assert checkpoint_format(ckpt) == ("fsdp" if sharded else "ddp")

    # resume as the trainer does: new model and optimizer objects (the initial weights, no state)
    resumed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
    assert not torch.equal(resumed.state_dict()["lm_head.weight"], saved["lm_head.weight"])
    with warnings.catch_warnings(record=True) as loading:
        warnings.simplefilter("always")
        assert load_checkpoint(ckpt, resumed, fresh, fresh_sched, sharded=sharded)["step"] == 1
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues from the save
    # one process without a process group is said, not guessed by DCP with a warning each time
    guessed = [str(w.message) for w in caught + loading if "torch.distributed is disabled" in str(w.message)]
    assert not guessed, guessed
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert _same(fresh.state_dict()["state"], opt.state_dict()["state"])


def test_a_resume_at_another_global_batch_says_what_would_work(base_config, tmp_path):
    from preftune.checkpointing import TrainingError, batch_choices

    common = dict(save_steps=2, output_dir=str(tmp_path / "run"))
    train(base_config(max_steps=2, **common))  # checkpoint-2 at global batch 4 (4 x 1 x 1 process)
    with pytest.raises(TrainingError) as refused:
        train(base_config(resume=True, max_steps=4, batch_size=2, **common))
    message = str(refused.value)
    assert "global batch 4, this run has 2 (batch_size 2 x grad_accum 1 x 1 process(es))" in message
    assert message.endswith(
        "on 1 process(es) resume with batch_size=4 grad_accum=1, batch_size=2 grad_accum=2, "
        "batch_size=1 grad_accum=4"
    )
    assert batch_choices(8, 2) == (
        "on 2 process(es) resume with batch_size=4 grad_accum=1, batch_size=2 grad_accum=2, "
        "batch_size=1 grad_accum=4"
    )
    assert batch_choices(4, 3) == "4 pairs cannot be split over 3 processes: resume on 1, 2, 4 process(es)"
    assert batch_choices(64, 1).endswith("batch_size=8 grad_accum=8 ...")
