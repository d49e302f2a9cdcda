"""Our DPO training run matches TRL 1.16's ``DPOTrainer`` step for step on the same model and data.

Both sides train the tiny random Llama (no dropout) in float32 on the CPU from the same weights, with
the same AdamW (betas, eps, no weight decay), constant learning rate without warm-up, the same
``max_grad_norm`` and β. Data order cannot differ: the whole dataset is one batch, so every step sees
every pair (only the order of the terms inside the batch mean can differ). TRL gets the rows exactly
as a user would pass them (conversational or plain text) and tokenizes them itself; the first test
checks that its token ids equal ours. Tolerances and measured differences: docs/parity.md.
"""

from __future__ import annotations

import pytest
import torch

from preftune.data import load_examples, tokenize_dataset
from preftune.trainer import train

from .conftest import arithmetic_rows, metric_rows, write_jsonl

pytest.importorskip("trl", reason="TRL is a dev dependency, needed only for parity tests")

STEPS = 4
LR = 1e-2  # large enough that 4 steps move the loss from log 2 to ~0.45: a real trajectory
# Per-step logged values (loss, rewards/margins, grad_norm): measured differences in docs/parity.md.
LOSS_ATOL = 1e-5
LOSS_RTOL = 1e-6  # IPO's loss is ~25 here: float32 rounding of its terms is ~1e-5 absolute
GRAD_NORM_RTOL = 1e-4
# Final weights: AdamW divides by sqrt(v), which amplifies float rounding in the few coordinates whose
# gradient is ~0; measured max |diff| <= 1e-4 while every tensor moved by ~4e-2 (see docs/parity.md).
WEIGHT_MAX_ATOL = 1e-3
WEIGHT_MEAN_ATOL = 1e-6


def plain_rows(n: int, seed: int = 0) -> list[dict]:
    """The arithmetic pairs as plain text; one prompt ends in a space so tokens merge across the boundary."""
    rows = []
    for i, row in enumerate(arithmetic_rows(n, seed)):
        question = row["prompt"][0]["content"]
        prompt = f"Question: {question}\nAnswer:" + (" " if i == 0 else "")
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen if i == 0 else " " + chosen,
                "rejected": rejected if i == 0 else " " + rejected,
            }
        )
    return rows


DATASETS = {"chat": lambda: arithmetic_rows(8), "plain": lambda: plain_rows(8)}


def trl_trainer(model_dir, rows, output_dir, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=len(rows),
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",  # the same torch.optim.AdamW as ours (TRL's default may pick the fused one)
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type="sigmoid",
        max_length=512,
        seed=42,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if "activation_checkpointing" in DPOConfig.__dataclass_fields__:  # transformers >= 5.x's name
        settings["activation_checkpointing"] = settings.pop("gradient_checkpointing")
    settings.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return DPOTrainer(
        model=model,
        args=DPOConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def our_run(model_dir, data_path, tmp_path, batch_size, **overrides):
    cfg = {
        "model": str(model_dir),
        "data": {"train": data_path},
        "batch_size": batch_size,
        "max_steps": STEPS,
        "logging_steps": 1,
        "learning_rate": LR,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": 0.1,
        "max_length": 512,
        "precision": "fp32",
        "seed": 42,
        "output_dir": str(tmp_path / "ours"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "report_to": [],
        **overrides,
    }
    return train(cfg)


def compare(model_dir, rows, tmp_path, *, ours: dict, theirs: dict, metrics=("rewards/margins",)):
    """Train both; return per-step (ours, TRL) rows and the final-weight differences."""
    from transformers import AutoModelForCausalLM

    data_path = write_jsonl(tmp_path / "train.jsonl", rows)
    result = our_run(model_dir, data_path, tmp_path, len(rows), **ours)
    trainer = trl_trainer(model_dir, rows, tmp_path / "trl", **theirs)
    trainer.train()

    mine = metric_rows(result.metrics_path)
    trl_rows = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert [r["step"] for r in mine] == [h["step"] for h in trl_rows] == list(range(1, STEPS + 1))
    for a, b in zip(mine, trl_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL, abs=LOSS_ATOL), (
            a["step"],
            a["loss"],
            b["loss"],
        )
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_NORM_RTOL), a["step"]
        for key in metrics:
            if key == "rewards/accuracies" and a["step"] == 1:
                continue  # at step 1 every reward is 0 up to float noise: the fraction > 0 is noise
            # TRL's accuracy is the strict comparison (ties count 0); ours counts ties 1/2
            ours_key = "rewards/accuracies_strict" if key == "rewards/accuracies" else key
            assert a[ours_key] == pytest.approx(b[key], abs=LOSS_ATOL), (a["step"], key, a[ours_key], b[key])
    assert mine[-1]["loss"] < mine[0]["loss"] - 0.05  # the trajectories really move

    final = dict(AutoModelForCausalLM.from_pretrained(result.final_model_dir).named_parameters())
    initial = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    diffs, moved = [], []
    for name, param in trainer.model.named_parameters():
        diffs.append((param.detach() - final[name].detach()).abs().flatten())
        moved.append((param.detach() - initial[name].detach()).abs().max())
    diffs = torch.cat(diffs)
    return mine, trl_rows, float(diffs.max()), float(diffs.mean()), float(min(moved))


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_trl_tokenizes_our_data_to_the_same_ids(kind, tiny_model_dir, tmp_path):
    rows = DATASETS[kind]()
    trainer = trl_trainer(tiny_model_dir, rows, tmp_path / "trl")
    theirs = trainer.train_dataset.to_list()  # what TRL trains on, after its own _prepare_dataset
    data_path = write_jsonl(tmp_path / "train.jsonl", rows)
    mine, report = tokenize_dataset(
        load_examples(data_path), trainer.processing_class, max_length=512, progress=False
    )
    assert report.truncated == 0 and not report.skipped
    assert [(m.prompt_ids, m.chosen_ids, m.rejected_ids) for m in mine] == [
        (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs
    ]


@pytest.mark.parametrize(
    ("kind", "ours", "theirs", "metrics"),
    [
        # DPO; TRL's reference is its default frozen copy of the model, ours is precomputed and cached
        ("chat", {"method": "dpo"}, {"loss_type": "sigmoid"}, ("rewards/margins", "rewards/accuracies")),
        # IPO on length-normalised log-probs; references the other way round (ours online, TRL's
        # precomputed). Rewards are not compared: TRL logs them unnormalised, we log what the loss used.
        (
            "plain",
            {"method": "ipo", "reference_mode": "online"},
            {"loss_type": "ipo", "precompute_ref_log_probs": True},
            (),
        ),
    ],
    ids=["dpo-chat", "ipo-plain"],
)
def test_training_trajectory_matches_trl(kind, ours, theirs, metrics, tiny_model_dir, tmp_path):
    mine, _, max_diff, mean_diff, min_moved = compare(
        tiny_model_dir, DATASETS[kind](), tmp_path, ours=ours, theirs=theirs, metrics=metrics
    )
    assert min_moved > 1e-2  # every tensor moved: the weight comparison is not vacuous
    assert max_diff < WEIGHT_MAX_ATOL and mean_diff < WEIGHT_MEAN_ATOL, (max_diff, mean_diff)


def test_conservative_dpo_matches_trl_aot_on_one_pair(tiny_model_dir, tmp_path):
    # TRL 1.16's `sigmoid` loss ignores label_smoothing; its `aot` loss applies the conservative-DPO
    # formula to the batch-sorted log-ratios, which for a single pair is exactly our label-smoothed DPO.
    mine, _, max_diff, mean_diff, _ = compare(
        tiny_model_dir,
        arithmetic_rows(1, seed=3),
        tmp_path,
        ours={"label_smoothing": 0.2},
        theirs={"loss_type": "aot", "label_smoothing": 0.2},
        metrics=("rewards/margins",),
    )
    assert max_diff < WEIGHT_MAX_ATOL and mean_diff < WEIGHT_MEAN_ATOL, (max_diff, mean_diff)
