"""Prompt sharing (one ``prompt | chosen | rejected`` row per pair) trains exactly like two rows."""

import json

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import ConfigError, load_config
from preftune.data.formatting import DEFAULT_TEMPLATE
from preftune.scoring_probe import shared_prompt_support
from preftune.step import shares_prompt
from preftune.testing import tiny_llama
from preftune.trainer import Trainer, train

from .conftest import losses_by_step


def _metrics(path, key):
    return {r["step"]: r[key] for r in map(json.loads, open(path)) if key in r}


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "dpo"},
        {"method": "mrpo+mallows_theta+rpo"},
        {"method": "dpo", "lora": {"enabled": True, "r": 4, "dropout": 0.0}, "save_merged": True},
    ],
    ids=["dpo", "mrpo+mallows_theta+rpo", "dpo-lora"],
)
def test_shared_prompt_training_equals_two_rows_per_pair(base_config, tmp_path, extra):
    runs = {}
    for share in (False, True):
        cfg = base_config(
            share_prompt=share, max_steps=3, output_dir=str(tmp_path / f"share-{share}"), **extra
        )
        if extra["method"].startswith("mrpo"):
            # the same model twice is refused (MRPO would be DPO): the second scores with another template
            cfg["references"] = [
                {"model": cfg["model"]},
                {"model": cfg["model"], "chat_template": DEFAULT_TEMPLATE},
            ]
        runs[share] = train(cfg)
    a, b = runs[False], runs[True]
    la, lb = losses_by_step(a.metrics_path), losses_by_step(b.metrics_path)
    assert la.keys() == lb.keys() == {1, 2, 3}
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), step
    ga, gb = _metrics(a.metrics_path, "grad_norm"), _metrics(b.metrics_path, "grad_norm")
    for step in ga:
        assert gb[step] == pytest.approx(ga[step], rel=1e-4), step
    assert abs(la[3] - la[1]) > 1e-4  # the trajectories move: not two constant curves
    wa = load_file(a.output_dir / "final" / "model.safetensors")
    wb = load_file(b.output_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    # Adam divides by sqrt(v): a weight whose gradient is ~0 can move by a fraction of lr (1e-3) on
    # float rounding alone, so a few elements may differ by ~1e-4; on average they must not.
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4)
        assert (wb[k] - wa[k]).abs().mean() < 1e-6, k


def test_auto_shares_on_cpu_when_prompts_are_a_large_part_of_the_batch(base_config):
    trainer = Trainer(load_config(base_config()))
    assert trainer.run.share_prompt is None  # decided per micro-batch
    long_prompts = [[1] * 30] * 4
    short = [[1] * 10] * 4
    assert shares_prompt(trainer.run.share_prompt, long_prompts, short) is True  # 60 of 160 tokens saved
    assert shares_prompt(trainer.run.share_prompt, short, [[1] * 30] * 4) is False  # 20 of 160
    off = Trainer(load_config(base_config(share_prompt=False)))
    assert shares_prompt(off.run.share_prompt, long_prompts, short) is False
    on = Trainer(load_config(base_config(share_prompt=True)))
    assert shares_prompt(on.run.share_prompt, short, [[1] * 30] * 4) is True


def test_shared_prompt_support_names_what_prevents_it():
    model = tiny_llama(64)
    assert shared_prompt_support(model, 512) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_support(model, 512)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 128
    assert "sliding_window=128" in shared_prompt_support(model, 512)
    assert shared_prompt_support(model, 128) is None  # the window covers every sequence


def test_share_prompt_true_with_unpaired_data_is_a_config_error(base_config, unpaired_file):
    cfg = base_config(method="rpo_unpaired", share_prompt=True)
    cfg["data"] = {"train": unpaired_file}
    with pytest.raises(ConfigError, match="share_prompt"):
        train(cfg)
