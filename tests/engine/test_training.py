"""End to end on a tiny random model: every method trains, and the engine's invariances hold."""

import math

import pytest
import torch

from preftune.trainer import train

from .conftest import losses_by_step, metric_rows

METHODS = [
    "dpo",
    "ipo",
    "hinge",
    "mallows_theta",
    "mallows_phi",
    "rpo",
    "rpo_uniform",
    "rpo_diagonal",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_single_reference_method_trains_and_saves_a_loadable_model(method, base_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(base_config(method=method))
    losses = losses_by_step(result.metrics_path)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    # final/ is a plain transformers checkpoint: trained weights (not the initial ones) + the tokenizer
    model = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.state_dict().keys() == initial.state_dict().keys()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
    text = "What is 2 plus 2?"
    assert AutoTokenizer.from_pretrained(result.final_model_dir)(text).input_ids == (
        AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    )
    metrics = metric_rows(result.metrics_path)
    assert any("eval_rewards/accuracies" in m for m in metrics)


@pytest.mark.parametrize("method", ["mrpo", "mdpo", "mrpo+mallows_theta+rpo"])
def test_multi_reference_methods_with_a_reference_of_another_tokenizer(
    method, base_config, other_tokenizer_model_dir
):
    # The second reference has a smaller vocabulary: feeding it the policy's token ids would fail.
    cfg = base_config(method=method, references=["policy", str(other_tokenizer_model_dir)])
    result = train(cfg)
    train_rows = metric_rows(result.metrics_path, "loss")
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert f"{method.split('+')[0]}/alpha_1" in train_rows[0]  # the second reference's weight is logged


def test_unpaired_rpo_trains(base_config, unpaired_file):
    result = train(base_config(method="rpo_unpaired", data={"train": unpaired_file}, batch_size=6))
    losses = losses_by_step(result.metrics_path)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())


def test_dpo_margins_grow_while_training(base_config):
    result = train(base_config(batch_size=8, max_steps=24, logging_steps=4, learning_rate=3e-3))
    rows = metric_rows(result.metrics_path, "loss")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.1
    assert rows[-1]["rewards/accuracies"] > 0.6


def test_lora_trains_adapters_and_reference_is_the_base(base_config):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    result = train(
        base_config(
            lora={"enabled": True, "r": 4, "alpha": 8}, max_steps=3, learning_rate=1e-2, save_merged=True
        )
    )
    assert PeftConfig.from_pretrained(result.output_dir / "final-adapter").r == 4
    merged = AutoModelForCausalLM.from_pretrained(result.final_model_dir)  # merged: plain transformers
    assert not hasattr(merged, "peft_config")
    first = metric_rows(result.metrics_path, "loss")[0]  # the first training row (step 0 is an eval row)
    # Before the first update the policy equals the reference (base with adapters off): zero rewards.
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5


@pytest.mark.parametrize(
    "extra",
    [{}, {"lora": {"enabled": True, "r": 4, "dropout": 0.0}}, {"share_prompt": True}],
    ids=["full", "lora", "shared-prompt"],
)
def test_activation_checkpointing_trains_exactly_as_without(base_config, tmp_path, extra):
    from preftune.config import load_config
    from preftune.trainer import Trainer

    cfg = base_config(gradient_checkpointing=True, **extra)
    model = Trainer(load_config(cfg)).run.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    runs = {}
    for on in (False, True):
        runs[on] = train(
            base_config(
                gradient_checkpointing=on, max_steps=3, output_dir=str(tmp_path / f"gc-{on}"), **extra
            )
        )
    a, b = losses_by_step(runs[False].metrics_path), losses_by_step(runs[True].metrics_path)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    assert abs(a[3] - a[1]) > 1e-4  # the runs move


def test_precomputed_and_online_references_give_the_same_losses(
    base_config, other_tokenizer_model_dir, tmp_path
):
    refs = ["policy", str(other_tokenizer_model_dir)]
    pre = train(base_config(method="mrpo", references=refs, max_steps=3, output_dir=str(tmp_path / "pre")))
    online = train(
        base_config(
            method="mrpo",
            references=refs,
            max_steps=3,
            reference_mode="online",
            output_dir=str(tmp_path / "online"),
        )
    )
    a, b = losses_by_step(pre.metrics_path), losses_by_step(online.metrics_path)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_batch_8_accum_1_equals_batch_1_accum_8(base_config, tmp_path):
    big = train(base_config(batch_size=8, grad_accum=1, max_steps=3, output_dir=str(tmp_path / "a")))
    small = train(base_config(batch_size=1, grad_accum=8, max_steps=3, output_dir=str(tmp_path / "b")))
    a, b = losses_by_step(big.metrics_path), losses_by_step(small.metrics_path)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)
    # the trajectories really move: the invariance is not between two constant curves
    assert abs(a[3] - a[1]) > 1e-3


def test_resumed_run_equals_uninterrupted_run(base_config, tmp_path, monkeypatch):
    from preftune import trainer as trainer_mod

    # LoRA dropout draws random numbers every step: the RNG state must be restored too.
    common = dict(
        max_steps=6,
        save_steps=3,
        lora={"enabled": True, "r": 4, "dropout": 0.3},
        learning_rate=1e-2,
        lr_scheduler="linear",
    )
    full = train(base_config(output_dir=str(tmp_path / "full"), **common))

    crash_dir = tmp_path / "crash"
    real_checkpoint = trainer_mod.Trainer._checkpoint

    def checkpoint_then_crash(self, step, optimizer, scheduler):
        real_checkpoint(self, step, optimizer, scheduler)
        if step == 3:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")

    monkeypatch.setattr(trainer_mod.Trainer, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(base_config(output_dir=str(crash_dir), **common))
    monkeypatch.setattr(trainer_mod.Trainer, "_checkpoint", real_checkpoint)
    assert (crash_dir / "checkpoint-3").is_dir() and not (crash_dir / "final").exists()

    resumed = train(base_config(output_dir=str(crash_dir), resume=True, **common))
    a, b = losses_by_step(full.metrics_path), losses_by_step(resumed.metrics_path)
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_reference_cache_is_reused_and_invalidated(base_config, tiny_model_dir, tmp_path, pair_files):
    import shutil

    from preftune.testing import save_tiny_model

    cache = tmp_path / "cache" / "references"

    def entries():
        return set(p.name for p in cache.glob("*.safetensors"))

    train(base_config(output_dir=str(tmp_path / "r1")))
    first = entries()
    assert len(first) == 2  # train and eval splits
    train(base_config(output_dir=str(tmp_path / "r2")))
    assert entries() == first  # same inputs: reused

    train(base_config(output_dir=str(tmp_path / "r3"), max_length=33))
    after_length = entries()
    assert len(after_length) == 4  # max_length changed the token ids, so new entries

    shorter = tmp_path / "short.jsonl"
    shorter.write_text("".join(open(pair_files[0]).readlines()[:-1]))
    train(base_config(output_dir=str(tmp_path / "r4"), data={"train": str(shorter), "eval": pair_files[1]}))
    after_data = entries()
    assert len(after_data) == 5  # train data changed; eval unchanged and reused

    model_copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model_copy)
    train(base_config(output_dir=str(tmp_path / "r5"), model=str(model_copy)))
    assert entries() == after_data  # identical weights in another folder: same fingerprint
    save_tiny_model(model_copy, seed=123)  # same tokenizer, different weights
    train(base_config(output_dir=str(tmp_path / "r6"), model=str(model_copy)))
    assert len(entries()) == 7


def test_reference_free_mode_needs_no_reference(base_config, tmp_path, monkeypatch):
    from preftune import prepare_run as setup_mod

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free run scored a reference")

    monkeypatch.setattr(setup_mod, "precompute_references", no_reference)
    monkeypatch.setattr(setup_mod, "OnlineReferences", no_reference)
    result = train(base_config(reference_free=True, gamma=0.5))
    assert all(math.isfinite(v) for v in losses_by_step(result.metrics_path).values())
    assert not (tmp_path / "cache" / "references").exists()  # nothing scored, nothing cached
    evals = metric_rows(result.metrics_path, "eval_loss")
    # no reference, but the initial policy is still a yardstick: its step-0 scores, kept in the run
    assert [r["eval_initial/rewards/accuracies"] for r in evals][0] == 0.5
    assert evals[-1]["eval_initial/rewards/margins"] != 0.0  # the trained policy moved away from it
    assert (result.output_dir / "held_out_initial.json").is_file()


def test_contrast_scope_decides_whether_a_micro_batch_is_gathered(base_config, monkeypatch):
    """Global scope gathers RPO's per-example tensors over processes, local scope never does; the
    numbers this changes are checked on two real processes in test_distributed.py."""
    from preftune import losses as L
    from preftune import trainer as trainer_mod
    from preftune.config import load_config

    trainer = trainer_mod.Trainer(load_config(base_config(method="rpo")))
    seen = []
    monkeypatch.setattr(
        trainer_mod, "micro_batch_loss", lambda scorer, adapter, batch, **k: seen.append(batch.gather)
    )

    class TwoProcesses:  # the trainer's accelerator, claiming a second process
        num_processes = 2

        def __getattr__(self, name):
            return getattr(real, name)

    real = trainer.run.accelerator
    trainer.run.accelerator = TwoProcesses()
    cases = [
        ("rpo", "global", True),
        ("rpo", "local", True),
        ("dpo", "global", True),
        ("rpo", "global", False),
    ]
    for method, scope, grad in cases:
        trainer.run.spec = L.resolve_method(method)
        trainer.run.cfg.rpo.contrast_scope = scope
        trainer._micro_batch(None, "train", [0, 1], grad=grad)
    assert [g is not None for g in seen] == [True, False, False, False]
    assert seen[0] is trainer.run.accelerator


def test_final_model_matches_the_trained_weights(base_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from preftune.config import load_config
    from preftune.trainer import Trainer

    trainer = Trainer(load_config(base_config(max_steps=2)))
    result = trainer.fit()
    trained = trainer.run.model.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(result.final_model_dir).state_dict()
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in trained.items())  # training moved them


@pytest.mark.parametrize("processes,grad_accum", [(1, 1), (2, 3), (3, 2)])
def test_data_order_splits_each_epochs_permutation_over_steps_micro_batches_and_processes(
    processes, grad_accum
):
    from preftune.step import DataOrder

    n, bs, seed = 50, 2, 7
    per_epoch = n // (bs * grad_accum * processes)
    orders = [DataOrder(n, seed, per_epoch, bs, grad_accum, processes, r) for r in range(processes)]
    for epoch in range(2):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        seen = []
        for pos in range(per_epoch):
            per_rank = [o(epoch * per_epoch + pos) for o in orders]
            assert all(len(mb) == grad_accum and all(len(b) == bs for b in mb) for mb in per_rank)
            # micro-batch m of a step is the m-th slice of the step's share, split rank by rank
            for m in range(grad_accum):
                seen += [i for r in range(processes) for i in per_rank[r][m]]
        g = bs * grad_accum * processes
        assert seen == perm[: per_epoch * g]  # the epoch's permutation in order, nothing twice
    # steps of another epoch, then back: the permutation follows the step, not the call history
    assert orders[0](0) == DataOrder(n, seed, per_epoch, bs, grad_accum, processes, 0)(0)


def test_lora_with_activation_checkpointing_uses_no_deprecated_transformers_api(base_config):
    # transformers 5 renamed gradient_checkpointing_enable / is_gradient_checkpointing (aliases warn a
    # FutureWarning until v6); preftune's own path (load, LoRA, train, save) calls the current names.
    # (TRL 1.16's DPOTrainer still reads model.is_gradient_checkpointing: the parity tests show it.)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(base_config(gradient_checkpointing=True, lora={"enabled": True, "r": 4, "alpha": 8}))
    deprecated = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not deprecated, deprecated
