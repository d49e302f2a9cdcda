"""final/ and final-adapter/ carry a README.md model card with what a user needs to reuse the model."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from preftune import __version__
from preftune.config import load_config
from preftune.model_card import base_model_origin, model_card
from preftune.trainer import train

from .conftest import metric_rows


def _card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, text[:300]
    return yaml.safe_load(match.group(1)), match.group(2)


def _table(body: str, header: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose header starts with ``header``: first cell -> other cells."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_full_model_card_holds_the_fields(base_config, pair_files):
    result = train(base_config(max_steps=2))
    front, body = _card(result.final_model_dir)
    assert front["library_name"] == "transformers"
    assert front["tags"][:2] == ["preftune", "dpo"] and "preference-optimization" in front["tags"]
    assert "base_model" not in front  # a local directory is not a Hub id; the body names it
    cfg = load_config(base_config())
    assert f"`{cfg.model}`" in body and f"preftune](https://pypi.org/project/preftune/) {__version__}" in body
    assert "method `dpo`, 2 optimizer steps" in body
    assert "- preftune: " + __version__ in body and "- transformers: " in body
    settings = _table(body, "| setting |")
    assert settings["beta"] == ["`0.1`"] and settings["learning_rate"] == ["`0.001`"]
    data = _table(body, "| key | source |")
    for key, path in (("data.train", pair_files[0]), ("data.eval", pair_files[1])):
        source, digest, rows = data[key]
        assert source == f"`{path}`"
        assert digest == f"`{hashlib.sha256(Path(path).read_bytes()).hexdigest()}`"
    assert data["data.train"][2] == "32" and data["data.eval"][2] == "8"
    results = _table(body, "| metric |")
    evals = {r["step"]: r for r in metric_rows(result.metrics_path, "eval_loss")}
    for key in (
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_initial/rewards/margins",
        "eval_logps/accuracies",
    ):
        before, after, yardstick = results[key]
        assert before == f"{evals[0][key]:.4f}" and after == f"{evals[2][key]:.4f}", key
        assert yardstick, key
    assert "the initial policy" in results["eval_initial/rewards/margins"][2]
    assert results["eval_logps/accuracies"][2].startswith("no reference")


def test_lora_adapter_card_is_a_peft_card_and_mrpo_names_its_yardsticks(
    base_config, other_tokenizer_model_dir
):
    cfg = base_config(
        method="mrpo",
        references=["policy", str(other_tokenizer_model_dir)],
        lora={"enabled": True, "r": 4},
        save_merged=True,
    )
    result = train(cfg)
    run = result.output_dir
    adapter_front, adapter_body = _card(run / "final-adapter")
    merged_front, merged_body = _card(run / "final")
    assert adapter_front["library_name"] == "peft" and merged_front["library_name"] == "transformers"
    assert "lora" in adapter_front["tags"] and "mrpo" in adapter_front["tags"]
    assert (
        "AutoPeftModelForCausalLM" in adapter_body and "AutoModelForCausalLM.from_pretrained" in merged_body
    )
    settings = _table(adapter_body, "| setting |")
    assert settings["mrpo.clip_eps"] == ["`0.1`"] and settings["lora.r"] == ["`4`"]
    results = _table(adapter_body, "| metric |")
    assert "the MRPO virtual reference of the 2 references" in results["eval_rewards/accuracies"][2]
    assert "the initial policy" in results["eval_initial/rewards/accuracies"][2]
    assert "arXiv:2405.16388" in adapter_body  # the method's paper


def test_front_matter_names_a_hub_base_model_and_its_license(base_config, tmp_path):
    assert base_model_origin("smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model_origin("org/model") == ("org/model", None)
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nbase_model: org/base\nlicense: mit\n---\n# x\n")
    assert base_model_origin(str(local)) == ("org/base", "mit")
    cfg = load_config(base_config(model="smollm2-135m-instruct", data={"train": "org/prefs"}))
    run = tmp_path / "run"
    run.mkdir()
    front = yaml.safe_load(model_card(cfg, run, steps=3, adapter=False).split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert front["datasets"] == ["org/prefs"]


@pytest.mark.parametrize("key", ["base_model", "license"])
def test_unknown_fields_are_left_out_not_guessed(key, base_config, tmp_path):
    cfg = load_config(base_config())
    front = yaml.safe_load(model_card(cfg, tmp_path, steps=1, adapter=False).split("---")[1])
    assert key not in front
