"""mrpo.weights=validation end to end on tiny models: carved rows, hand-computed weights, composition."""

import json
import math

import pytest
import torch

from preftune.config import ConfigError, load_config
from preftune.trainer import Trainer

from .conftest import metric_rows


def _cfg(base_config, other, **kw):
    return base_config(
        method=kw.pop("method", "mrpo"),
        references=["policy", str(other)],
        mrpo={"weights": "validation", "validation_fraction": 0.25, "validation_temperature": 0.05},
        **kw,
    )


def test_weights_are_the_softmax_of_validation_accuracies_and_validation_rows_are_never_trained(
    base_config, other_tokenizer_model_dir, monkeypatch
):
    trainer = Trainer(load_config(_cfg(base_config, other_tokenizer_model_dir, max_steps=6)))
    view = trainer.run.data.views[0]
    val_rows = {it.row for it in view.tokenized["validation"]}
    train_rows = {it.row for it in view.tokenized["train"]}
    assert len(val_rows) == 8 and len(train_rows) == 24 and not val_rows & train_rows
    # every view lost the same rows (index i is the same pair everywhere)
    for v in trainer.run.data.views:
        assert [it.row for it in v.tokenized["validation"]] == sorted(val_rows)

    # the weights from the validation rows' cached reference log-probs, by hand
    refs = trainer.reference_logps("validation")
    acc = [
        sum(
            1.0 if c > r else 0.5 if c == r else 0.0
            for c, r in zip(refs["chosen"][k].tolist(), refs["rejected"][k].tolist())
        )
        / 8
        for k in range(2)
    ]
    e = [math.exp(a / 0.05) for a in acc]
    assert trainer.run.validation["accuracies"] == pytest.approx(acc, abs=1e-12)
    assert trainer.run.validation["weights"] == pytest.approx([x / sum(e) for x in e], rel=1e-9)
    assert trainer.run.adapter.kwargs["weights"] == trainer.run.validation["weights"]

    # no training batch ever contains a validation row: record every batch the fit loop draws
    seen: set[int] = set()
    original = trainer._micro_batch

    def spy(scorer, split, index, *, grad):
        if split == "train":
            seen.update(view.tokenized["train"][i].row for i in index)
        return original(scorer, split, index, grad=grad)

    monkeypatch.setattr(trainer, "_micro_batch", spy)
    result = trainer.fit()
    assert seen and not seen & val_rows and seen <= train_rows

    state = json.loads((result.output_dir / "run_state.json").read_text())
    assert state["mrpo_validation"]["weights"] == trainer.run.validation["weights"]
    assert sorted(state["mrpo_validation"]["rows"]) == sorted(val_rows)
    rows = metric_rows(result.metrics_path, "loss")
    assert rows[0]["mrpo/alpha_1"] == pytest.approx(trainer.run.validation["weights"][1], rel=1e-5)

    # `preftune eval` scores every held-out row with the weights training fixed: nothing is carved
    # out of the eval data, nothing is recomputed from it
    from preftune.held_out import evaluate_run

    metrics, evaluation = evaluate_run(result.output_dir, keep_trainer=True)
    assert evaluation.run.data.splits == ["eval"] and evaluation.run.validation is None
    assert metrics["eval_n"] == len(view.tokenized["eval"])
    assert evaluation.run.adapter.kwargs["weights"] == trainer.run.validation["weights"]


def test_the_carved_split_depends_on_the_seed_only(base_config, other_tokenizer_model_dir):
    def rows(seed):
        t = Trainer(load_config(_cfg(base_config, other_tokenizer_model_dir, seed=seed)))
        return [it.row for it in t.run.data.views[0].tokenized["validation"]]

    assert rows(1) == rows(1) != rows(2)


@pytest.mark.parametrize("method", ["mrpo+mallows_theta+rpo", "mdpo+mallows_phi"])
def test_validation_weights_compose_with_mallows_and_rpo(method, base_config, other_tokenizer_model_dir):
    trainer = Trainer(load_config(_cfg(base_config, other_tokenizer_model_dir, method=method)))
    result = trainer.fit()
    rows = metric_rows(result.metrics_path, "loss")
    assert all(math.isfinite(r["loss"]) for r in rows)
    prefix = method.split("+")[0]
    # the fixed weights are what the loss used
    assert rows[0][f"{prefix}/alpha_0"] == pytest.approx(trainer.run.validation["weights"][0], rel=1e-5)
    # MallowsPO's calibration saw only the training split; dispersion exists for the validation split
    assert "validation" in trainer.run.inputs.dispersion_c
    if "rpo" in method:
        assert trainer.run.inputs.embeddings["validation"].shape[0] == 8
    assert torch.isfinite(trainer.run.inputs.dispersion_c["train"]).all()


def test_bad_validation_settings_are_one_line_errors(base_config, other_tokenizer_model_dir):
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_config(_cfg(base_config, other_tokenizer_model_dir), ["mrpo.validation_fraction=1.5"])
    with pytest.raises(ConfigError, match="adaptive_released is defined for exactly 2"):
        load_config(
            base_config(method="mrpo", references=["policy", "ref-a", "ref-b"]),
            ["mrpo.weights=adaptive_released"],
        )
