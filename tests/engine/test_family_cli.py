"""Every DPO-family method trains from the command line: `preftune train` on the tiny model, 2 steps.

One run per method (and per modifier), all sharing the session's tiny model; each checks that the
logged loss is finite, that the method's own metrics are present, and that the run wrote its model.
"""

from __future__ import annotations

import math

import pytest
import yaml

from preftune.cli import main
from preftune.data.formatting import DEFAULT_TEMPLATE

from .conftest import metric_rows

# method (with options) -> metrics its log must hold besides loss and grad_norm
RUNS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "robust": ({"method": "robust", "label_smoothing": 0.1}, ("rewards/margins",)),
    "exo_pair": ({"method": "exo_pair", "label_smoothing": 0.001}, ("rewards/margins",)),
    "discopop": ({"method": "discopop", "discopop": {"tau": 0.05}}, ("rewards/margins",)),
    "sigmoid_norm": ({"method": "sigmoid_norm"}, ("rewards/margins",)),
    "nca_pair": ({"method": "nca_pair"}, ("rewards/chosen",)),
    "bco_pair": ({"method": "bco_pair"}, ("rewards/chosen",)),
    "sppo_hard": ({"method": "sppo_hard"}, ("rewards/chosen",)),
    "apo_zero": ({"method": "apo_zero"}, ("rewards/chosen",)),
    "apo_down": ({"method": "apo_down"}, ("rewards/chosen",)),
    "aot": ({"method": "aot"}, ("rewards/margins",)),
    "aot_unpaired": ({"method": "aot_unpaired"}, ("rewards/margins",)),
    "sft": ({"method": "sft"}, ("logps/chosen",)),
    "simpo": ({"method": "simpo", "beta": 2.0, "simpo": {"gamma": 1.0}}, ("rewards/margins",)),
    "orpo": ({"method": "orpo"}, ("rewards/margins",)),
    "mpo": (
        {"method": "dpo+bco_pair+sft", "loss_weights": [0.8, 0.2, 1.0]},
        ("loss/sigmoid", "loss/bco_pair", "loss/sft"),
    ),
    "bco-running-delta": ({"method": "bco_pair", "bco": {"delta": "running"}}, ("bco/delta",)),
    "f_divergence": ({"method": "dpo", "f_divergence": "js_divergence"}, ("rewards/margins",)),
    "ld_alpha": ({"method": "dpo", "ld_alpha": 0.5}, ("rewards/margins",)),
    "wpo": ({"method": "dpo", "wpo": True}, ("wpo/weight",)),
    # second reference: a copy of the policy under another chat template (identical ones are refused)
    "mrpo+robust": ({"method": "mrpo+robust", "references": ["policy", "POLICY_COPY"]}, ("mrpo/alpha_0",)),
    # unpaired: a batch of 4 may hold no desirable (or no undesirable) item, and then no rewards/chosen
    "kto": ({"method": "kto", "unpaired": True}, ("kl",)),
    "apo_zero_unpaired": ({"method": "apo_zero_unpaired", "unpaired": True}, ()),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_cli_trains_every_family_method(name, base_config, unpaired_file, tmp_path):
    overrides, expected = RUNS[name]
    overrides = dict(overrides)
    cfg = base_config()
    if overrides.pop("unpaired", False):
        cfg["data"] = {"train": unpaired_file}
    cfg.pop("eval", None)
    cfg["data"].pop("eval", None)  # 2 steps; held-out metrics are tested elsewhere
    cfg["data"]["max_rows"] = 8  # two batches of 4: all a 2-step run reads
    if "POLICY_COPY" in overrides.get("references", []):
        overrides["references"] = ["policy", {"model": cfg["model"], "chat_template": DEFAULT_TEMPLATE}]
    cfg.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = metric_rows(tmp_path / "run", having="loss")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]), (name, row)
        for key in ("grad_norm", *expected):
            assert key in row and math.isfinite(row[key]), (name, key, row)
    assert (tmp_path / "run" / "final").is_dir() or any((tmp_path / "run").glob("final*"))


def test_bco_running_delta_is_checkpointed_and_resumed(base_config, tmp_path):
    import json

    from preftune.checkpointing import CHECKPOINT_STATE, find_checkpoints

    cfg = base_config(method="bco_pair", bco__delta="running", save_steps=1, save_total_limit=5)
    cfg["data"].pop("eval")
    cfg["data"]["max_rows"] = 8
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0

    def states():
        return [json.loads((p / CHECKPOINT_STATE).read_text()) for p in find_checkpoints(tmp_path / "run")]

    assert [s["loss_state"]["bco_count"] for s in states()] == [1, 2]
    first_delta = states()[-1]["loss_state"]["bco_delta"]
    assert first_delta != 0.0
    # resume for one more step: δ continues from the checkpoint (count 3), not from scratch (count 1)
    assert main(["train", str(path), "resume=true", "max_steps=3"]) == 0
    last = states()[-1]["loss_state"]
    assert last["bco_count"] == 3
    rows = metric_rows(tmp_path / "run", having="bco/delta")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["bco/delta"] == pytest.approx(first_delta, rel=1e-5)


def test_kto_evaluates_held_out_items(base_config, unpaired_file, tmp_path):
    cfg = base_config(method="kto")
    cfg["data"] = {"train": unpaired_file, "eval": unpaired_file, "max_rows": 8}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = metric_rows(tmp_path / "run", having="eval_loss")
    assert [r["step"] for r in rows][0] == 0 and len(rows) == 2  # before training and at the end
    for row in rows:
        assert math.isfinite(row["eval_loss"]) and math.isfinite(row["eval_rewards/chosen"])
