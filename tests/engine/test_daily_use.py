"""What a user sees and keeps: step-0 evaluation, ties at step 1, disk use of LoRA runs, and
``preftune eval --prompts`` with saved generations (tiny models)."""

import json

import pytest

from preftune.cli import main
from preftune.trainer import train

from .conftest import arithmetic_rows, metric_rows, write_jsonl


def test_eval_before_training_and_ties_at_step_one(base_config):
    result = train(base_config(method="dpo", max_steps=4, eval_steps=2))
    evals = metric_rows(result.metrics_path, "eval_loss")
    assert [r["step"] for r in evals] == [0, 2, 4]  # before training, every eval_steps, the end
    before = evals[0]
    assert before["eval_n"] == 8
    # before training the policy is its reference: every reward is 0 (up to float noise), all ties
    assert before["eval_rewards/accuracies"] == 0.5 and before["eval_initial/rewards/accuracies"] == 0.5
    first = metric_rows(result.metrics_path, "loss")[0]
    assert first["step"] == 1 and first["rewards/accuracies"] == 0.5
    assert "rewards/accuracies_strict" in first


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny model whose weights dominate its tokenizer files, as a real model's do."""
    from preftune.testing import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("wide"), vocab_size=512, seed=0, hidden_size=512, intermediate_size=1024
    )


def test_lora_run_keeps_adapters_only_unless_asked(base_config, wide_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = dict(model=str(wide_model_dir), lora={"enabled": True, "r": 4, "alpha": 8}, max_steps=2)
    lean = train(base_config(output_dir=str(tmp_path / "lean"), **settings))
    # the run as it was saved before: the merged model in final/ too
    merged = train(base_config(output_dir=str(tmp_path / "merged"), save_merged=True, **settings))
    assert not (lean.output_dir / "final").exists() and (lean.output_dir / "final-adapter").is_dir()
    assert lean.final_model_dir == lean.output_dir / "final-adapter"
    lean_size, merged_size = _dir_bytes(lean.output_dir), _dir_bytes(merged.output_dir)
    assert lean_size < 0.10 * merged_size, (lean_size, merged_size)
    # save_merged: a plain transformers model in the dtype of the checkpoint it came from
    model = AutoModelForCausalLM.from_pretrained(merged.final_model_dir)
    base = json.loads((wide_model_dir / "config.json").read_text())
    assert str(model.dtype).removeprefix("torch.") == (base.get("dtype") or base.get("torch_dtype"))


def test_eval_of_an_adapter_run_with_prompts_saves_generations(base_config, tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            base_config(lora={"enabled": True, "r": 4, "alpha": 8}, max_steps=2, learning_rate=1e-2)
        )
    )
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "run"
    assert not (run / "final").exists()
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": r["prompt"], "answer": "answer"} for r in arithmetic_rows(3, 5)],
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--prompts", prompts, "--match", "regex", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    (result,) = run.glob("eval-*[0-9]Z.json")
    record = json.loads(result.read_text())
    gens = run / record["generations"]
    assert gens.is_file() and gens.name.startswith(result.stem)
    lines = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "answer", "output", "correct"} <= set(lines[0])
    # the score is the fraction of saved generations that matched
    assert record["metrics"]["eval_answer_match"] == sum(x["correct"] for x in lines) / 3
    assert record["match"] == "regex" and "--match regex" in out and str(gens) in out
    assert record["n"] == 8 and record["model"].endswith("final-adapter")
    # the adapter was loaded: the trained policy no longer ties with its reference
    assert record["metrics"]["eval_initial/rewards/margins"] != 0.0


def test_eval_rejects_a_bad_prompts_file_before_scoring(base_config, tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(max_steps=1)))
    assert main(["train", str(cfg_path)]) == 0
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "no answer"}\n')
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl, line 2, field 'answer'" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "run").glob("eval-*.json"))
    assert main(["eval", str(tmp_path / "run"), "--prompts", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl: file not found (set by --prompts)" in err and len(err.strip().splitlines()) == 1
    # held-out data is read as the eval split: its errors name data.eval, not data.train
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "data.eval" in err and "data.train" not in err and "missing.jsonl" in err, err
