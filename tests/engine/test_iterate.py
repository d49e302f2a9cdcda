"""preftune iterate on tiny models: the rounds with each judge, the pairs, references per round,
resume after a kill, two processes against one, and the settings refused before any model loads."""

import json
import sys
from pathlib import Path

import pytest
import torch

from preftune.iterate import loop, training
from preftune.iterate.pairs import build_pairs

from .conftest import free_port, launch_processes, metric_rows, process_logs, rank_env, write_jsonl

JUDGE_FN = """
def score(prompt, completion, row):
    return float(sum(c in "aeiou" for c in completion.lower()))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompts (chat, with a regex answer), held-out prompts, a python judge, a tiny reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from preftune.testing import tiny_tokenizer

    d = tmp_path_factory.mktemp("iterate-files")
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} plus {2 * i + 1}?"}], "answer": "[ae]"}
        for i in range(6)
    ]
    prompts = write_jsonl(d / "prompts.jsonl", rows)
    held_out = write_jsonl(d / "held-out.jsonl", rows[:3])
    (d / "judge_fn.py").write_text(JUDGE_FN)
    tok = tiny_tokenizer()
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
        )
    )
    rm.save_pretrained(d / "reward-model")
    tok.save_pretrained(d / "reward-model")
    return {
        "prompts": prompts,
        "held_out": held_out,
        "judge_fn": f"{d / 'judge_fn.py'}:score",
        "reward_model": str(d / "reward-model"),
        "rows": rows,
    }


JUDGES = {
    "verifier": lambda f: {"kind": "verifier", "match": "regex"},
    "reward_model": lambda f: {"kind": "reward_model", "model": f["reward_model"], "batch_size": 4},
    "python": lambda f: {"kind": "python", "function": f["judge_fn"]},
}


def iterate_config(model_dir, files, out: Path, judge: dict, **rounds) -> dict:
    return {
        "model": str(model_dir),
        "batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "precision": "fp32",
        "output_dir": str(out / "run"),
        "cache_dir": str(out / "cache"),
        "progress": False,
        "report_to": [],
        "rounds": {
            "count": 2,
            "prompts": files["prompts"],
            "samples_per_prompt": 3,
            "max_new_tokens": 5,
            "batch_size": 2,
            "temperature": 1.5,
            "judge": judge,
            "eval_prompts": files["held_out"],
            **rounds,
        },
    }


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check_round(run: Path, r: int, row: dict) -> None:
    """Every pair's texts are samples of round r for that prompt, chosen scored above rejected;
    tied prompts are skipped and counted."""
    samples = read_jsonl(run / f"round-{r}" / "samples.jsonl")
    by_prompt: dict[int, dict[str, float]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], {})[s["completion"]] = s["score"]
    pairs = read_jsonl(run / f"round-{r}" / "pairs.jsonl")
    assert pairs, "no pairs: the test needs judges whose scores differ"
    for p in pairs:
        texts = by_prompt[p["prompt_index"]]
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert chosen in texts and rejected in texts  # samples of this round, not rows of a data file
        assert texts[chosen] == p["chosen_score"] > p["rejected_score"] == texts[rejected]
    tied = [i for i, t in by_prompt.items() if len(set(t.values())) == 1]
    assert row["skipped_tied"] == len(tied)
    assert {p["prompt_index"] for p in pairs} == set(by_prompt) - set(tied)
    assert row["pairs"] == len(pairs) == len(by_prompt) - len(tied)  # best_worst: one per usable prompt
    assert row["usable_fraction"] == pytest.approx(1 - len(tied) / len(by_prompt))


@pytest.mark.parametrize("judge", list(JUDGES))
def test_two_rounds_with_each_judge(tiny_model_dir, files, pair_files, tmp_path, judge):
    cfg = iterate_config(tiny_model_dir, files, tmp_path, JUDGES[judge](files))
    if judge == "reward_model":
        cfg["data"] = {"eval": pair_files[1]}  # held-out preference metrics after each round
    result = loop.iterate(cfg)
    run = tmp_path / "run"
    rows = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "held_out_score" in rows[0] and "held_out_score" in rows[2]
    for r in (1, 2):
        check_round(run, r, rows[r])
        assert rows[r]["samples"] == 6 * 3 and rows[r]["train_steps"] == 2
        assert len(metric_rows(run / f"round-{r}" / "train", "loss")) == 2  # the round's own run
    if judge == "verifier":
        assert "pass_at_3" in rows[1] and "held_out_answer_match" in rows[1]
    if judge == "reward_model":
        assert all(0 <= rows[r]["eval_rewards/accuracies"] <= 1 for r in (1, 2))
    # the rounds chain: round 2 sampled from round 1's model, final/ is round 2's model
    assert rows[2]["model"] == str(run / "round-2" / "train" / "final")
    assert result.final_model_dir == run / "final"
    final, last = weights(run / "final"), weights(run / "round-2" / "train" / "final")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    first = weights(run / "round-1" / "train" / "final")
    assert any(not torch.equal(first[k], last[k]) for k in first)
    # pairs.jsonl is preftune's data format
    from preftune.data import load_examples

    assert len(load_examples(str(run / "round-1" / "pairs.jsonl"))) == rows[1]["pairs"]
    if judge == "python":  # preftune report RUN plots every rounds.jsonl metric against the round
        from preftune.cli import main

        assert main(["report", str(run)]) == 0
        assert (run / "rounds.png").stat().st_size > 0 and "| round |" in (run / "rounds.md").read_text()


def test_pair_modes_and_ties():
    def group(i, scores):
        return [
            {"prompt": "p", "completion": f"t{i}-{j}", "score": s, "prompt_index": i, "sample": j}
            for j, s in enumerate(scores)
        ]

    groups = [group(0, [0, 1, 1, 0]), group(1, [1, 1, 1, 1]), group(2, [0.2, 0.9, 0.5, 0.1])]
    rows, stats = build_pairs(groups, "best_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("t0-1", "t0-0"), ("t2-1", "t2-3")]
    assert stats["skipped_tied"] == 1 and stats["usable_fraction"] == pytest.approx(2 / 3)
    assert stats["margin_mean"] == pytest.approx((1 + 0.8) / 2)
    rows, stats = build_pairs(groups, "all", max_pairs_per_prompt=2)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("t0-1", "t0-0"),
        ("t0-1", "t0-3"),
        ("t2-1", "t2-3"),
        ("t2-1", "t2-0"),
    ]
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    rows, stats = build_pairs(groups, "unpaired", threshold=0.5)
    assert len(rows) == 12 and [r["label"] for r in rows[8:]] == [False, True, True, False]
    assert stats["usable_prompts"] == 2 and stats["tied_prompts"] == 1
    chat = [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "completion": "a",
            "score": 1,
            "prompt_index": 0,
            "sample": 0,
        }
    ]
    chat.append({**chat[0], "completion": "b", "score": 0, "sample": 1})
    rows, _ = build_pairs([chat], "best_worst")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "a"}]


def test_reference_both_scores_the_previous_round(tiny_model_dir, files, tmp_path):
    """Round 2 of `reference: both` has references [initial, round 1's model]: its second
    reference's log-probs are round 1's model's, not the initial model's."""
    from preftune.config import load_config
    from preftune.models.loading import load_causal_lm
    from preftune.scoring import score_dataset
    from preftune.trainer import Trainer

    cfg = iterate_config(
        tiny_model_dir, files, tmp_path, JUDGES["python"](files), reference="both", eval_prompts=None
    )
    cfg["method"] = "mrpo"
    loop.iterate(cfg)
    run = tmp_path / "run"
    full = loop.load_iterate_config(cfg)
    round2 = training.round_train_config(full, 2)
    assert [r["model"] for r in round2["references"]] == [str(tiny_model_dir), "policy"]
    assert round2["model"] == str(run / "round-1" / "train" / "final")
    round2.update(output_dir=str(tmp_path / "check"), resume=False, overwrite_output_dir=True)
    trainer = Trainer(load_config(round2))
    refs = trainer.reference_logps("train")["chosen"]  # [K=2, N]
    prompts, chosen = trainer.run.data.views[1].sequences("train", "chosen")
    expected = {}
    for name, path in (("initial", tiny_model_dir), ("round1", run / "round-1" / "train" / "final")):
        model, tok = load_causal_lm(str(path))
        with torch.no_grad():
            expected[name] = score_dataset(model, prompts, chosen, pad_token_id=tok.pad_token_id).logps
    torch.testing.assert_close(refs[1].double(), expected["round1"].double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(refs[0].double(), expected["initial"].double(), rtol=1e-4, atol=1e-4)
    assert (expected["round1"] - expected["initial"]).abs().max() > 1e-3  # the two references differ


def test_kill_during_round_two_sampling_then_resume(tiny_model_dir, files, tmp_path, monkeypatch, capsys):
    import preftune.generation as generation

    judge = JUDGES["verifier"](files)
    whole = loop.iterate(iterate_config(tiny_model_dir, files, tmp_path / "a", judge))
    cfg = iterate_config(tiny_model_dir, files, tmp_path / "b", judge)
    real, calls = generation.sample_batch, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # round 1 has 3 batches: round 2's second batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.iterate(cfg)
    monkeypatch.setattr(generation, "sample_batch", real)
    round2 = tmp_path / "b" / "run" / "round-2"
    assert not (round2 / "samples.jsonl").exists()
    with open(round2 / "samples.part-0.jsonl", "a") as f:
        f.write('{"batch": 1, "samples": [["cut sho')  # a kill in the middle of a write
    drawn = []
    monkeypatch.setattr(generation, "sample_batch", lambda *a, **k: drawn.append(1) or real(*a, **k))
    cfg["resume"] = True
    resumed = loop.iterate(cfg)
    assert len(drawn) == 2  # round 1 is not redone; round 2's first batch is not drawn again
    for r in (1, 2):
        a = read_jsonl(tmp_path / "a" / "run" / f"round-{r}" / "samples.jsonl")
        b = read_jsonl(tmp_path / "b" / "run" / f"round-{r}" / "samples.jsonl")
        assert a == b
    wa, wb = weights(whole.final_model_dir), weights(resumed.final_model_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    capsys.readouterr()
    again = loop.iterate(cfg)
    assert again.already_finished and "already finished" in capsys.readouterr().out


def test_round_training_resumes_from_its_checkpoint(tiny_model_dir, files, tmp_path):
    cfg = loop.load_iterate_config(iterate_config(tiny_model_dir, files, tmp_path, JUDGES["python"](files)))
    train_dir = tmp_path / "run" / "round-1" / "train"
    assert training.round_train_config(cfg, 1)["resume"] is False
    (train_dir / "checkpoint-1").mkdir(parents=True)
    assert training.round_train_config(cfg, 1)["resume"] is True


@pytest.mark.distributed
def test_two_processes_sample_and_train_like_one(tiny_model_dir, files, tmp_path):
    import yaml

    judge = JUDGES["verifier"](files)
    # seed 13: both rounds give at least one global batch (4) of pairs, so both rounds train
    one = iterate_config(tiny_model_dir, files, tmp_path / "one", judge, eval_prompts=None, seed=13)
    one.update(batch_size=4, learning_rate=1e-2)
    loop.iterate(one)
    two = {**one, "batch_size": 2, "output_dir": str(tmp_path / "two" / "run")}
    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump(two))
    port = free_port()
    argv = [sys.executable, "-m", "preftune", "iterate", str(spec)]
    commands = [(argv, rank_env(r, 2, port, ACCELERATE_USE_CPU="1")) for r in range(2)]
    codes, _ = launch_processes(commands, tmp_path, "iterate", timeout=400)
    assert codes == [0, 0], process_logs(tmp_path, "iterate", 2)
    parts = sorted(p.name for p in (tmp_path / "two" / "run" / "round-1").glob("samples.part-*"))
    assert parts == ["samples.part-0.jsonl", "samples.part-1.jsonl"]  # both ranks sampled
    for r in (1, 2):
        a = read_jsonl(tmp_path / "one" / "run" / f"round-{r}" / "samples.jsonl")
        b = read_jsonl(tmp_path / "two" / "run" / f"round-{r}" / "samples.jsonl")
        assert a == b
        la = metric_rows(tmp_path / "one" / "run" / f"round-{r}" / "train", "loss")
        lb = metric_rows(tmp_path / "two" / "run" / f"round-{r}" / "train", "loss")
        assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2]
        for x, y in zip(la, lb):
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)


BAD = {
    "verifier without answers": (
        lambda f, d: {"kind": "verifier"},
        lambda f, d: write_jsonl(d / "no-answer.jsonl", [{"prompt": "What is 1 plus 1?"}]),
        "has no 'answer'",
    ),
    "reward model path missing": (
        lambda f, d: {"kind": "reward_model", "model": str(d / "nowhere")},
        lambda f, d: f["prompts"],
        "does not exist",
    ),
    "unknown judge kind": (lambda f, d: {"kind": "oracle"}, lambda f, d: f["prompts"], "is not one of"),
    "python function missing": (
        lambda f, d: {"kind": "python", "function": "no_such_module_xyz:score"},
        lambda f, d: f["prompts"],
        "cannot import",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_judge_settings_fail_before_any_model_loads(
    tiny_model_dir, files, tmp_path, monkeypatch, capsys, case
):
    import yaml

    import preftune.models.loading as loading
    from preftune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    judge, prompts, message = BAD[case]
    cfg = iterate_config(
        tiny_model_dir, files, tmp_path, judge(files, tmp_path), prompts=prompts(files, tmp_path)
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["iterate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("preftune iterate: error:"), err
    assert not (tmp_path / "run").exists()


def test_a_misspelt_policy_path_fails_before_anything_loads_or_is_written(
    files, tmp_path, monkeypatch, capsys
):
    import yaml

    import preftune.models.loading as loading
    from preftune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", no_model)
    cfg = iterate_config(tmp_path / "no-such-policy", files, tmp_path, JUDGES["python"](files))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["iterate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune iterate: error: model: ") and "does not exist" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_reference_both_needs_a_multi_reference_method(tiny_model_dir, files, tmp_path):
    from preftune.config import ConfigError

    cfg = iterate_config(tiny_model_dir, files, tmp_path, JUDGES["python"](files), reference="both")
    with pytest.raises(ConfigError, match="rounds.reference: both .* 'dpo' takes one"):
        loop.load_iterate_config(cfg)
    with pytest.raises(ConfigError, match="rounds.pairs: method 'kto'"):
        loop.load_iterate_config(
            {**cfg, "method": "kto", "rounds": {**cfg["rounds"], "reference": "initial"}}
        )


def test_config_documents_every_rounds_key():
    import dataclasses

    from preftune.config import JudgeConfig, RoundsConfig, describe

    text = describe()
    for f in dataclasses.fields(RoundsConfig):
        assert f"rounds.{f.name}" in text
    for f in dataclasses.fields(JudgeConfig):
        assert f"rounds.judge.{f.name} (default" in text


def test_vllm_engine_without_vllm_is_one_line(tiny_model_dir, files, tmp_path):
    import importlib.util

    from preftune.config import ConfigError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    cfg = iterate_config(tiny_model_dir, files, tmp_path, JUDGES["python"](files), engine="vllm")
    with pytest.raises(ConfigError, match=r"^rounds.engine: vllm is not installed: pip install vllm"):
        loop.load_iterate_config(cfg)


def test_a_full_disk_while_sampling_is_one_line_and_resume_continues(
    tiny_model_dir, files, tmp_path, monkeypatch, capsys
):
    import errno

    import yaml

    import preftune.iterate.sampling as sampling
    from preftune.cli import main

    cfg = iterate_config(tiny_model_dir, files, tmp_path, JUDGES["verifier"](files))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def full_disk(file, mode="r", *args, **kwargs):  # round 2's samples cannot be written
        if "round-2" in str(file) and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(sampling, "open", full_disk, raising=False)
    assert main(["iterate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("preftune iterate: error: "), err
    part = tmp_path / "run" / "round-2" / "samples.part-0.jsonl"
    assert f"could not write {part}: No space left on device" in err and "free on the filesystem" in err, err
    # iterate keeps stages, not checkpoints: the hint says resume=true continues at the stage reached
    assert "rerun with resume=true: the finished stages in" in err and str(tmp_path / "run") in err, err
    assert "no complete checkpoint" not in err, err
    monkeypatch.delattr(sampling, "open")  # the disk has room again
    assert (tmp_path / "run" / "round-1" / "round.json").is_file()
    assert main(["iterate", str(path), "resume=true"]) == 0
    assert (tmp_path / "run" / "round-2" / "round.json").is_file()
