"""What a run leaves on disk matches what the docs say: LoRA checkpoints hold what trains (also in the
sharded format), a resumed run ends with the final folders a fresh run would write (no stale
``final/``), the tokenizer is written once per run (not per checkpoint) yet every model folder that
transformers loads finds one, and a bad model path stops the run before any weights load and before
the run directory exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from preftune import cli
from preftune import trainer as trainer_module
from preftune.trainer import train

from .conftest import losses_by_step

LORA = {"enabled": True, "r": 4, "alpha": 8}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def tied_model_dir(tied_head_model_dir):
    return tied_head_model_dir


@pytest.fixture
def config(base_config, tied_model_dir, tmp_path):
    """A run of the tied-head model (its head is frozen under LoRA, and outweighs the adapters)."""

    def make(name, **overrides):
        return base_config(model=str(tied_model_dir), output_dir=str(tmp_path / name), **overrides)

    return make


def safetensors_of(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_close(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    for k, e in expected.items():
        diff = float((actual[k].float() - e.float()).norm())
        assert diff <= rel * float(e.float().norm()) + 1e-12, (k, diff)


def dcp_tensors(checkpoint, prefix: str = "model.") -> dict[str, int]:
    """Name -> bytes of each tensor a torch.distributed.checkpoint directory holds under ``prefix``."""
    import math

    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    return {
        k: math.prod(m.size) * m.properties.dtype.itemsize
        for k, m in metadata.state_dict_metadata.items()
        if k.startswith(prefix) and hasattr(m, "size")
    }


# ------------------------------------------------------------------------------------- checkpoints


def test_sharded_lora_checkpoint_holds_only_what_trains_and_resumes_exactly(config, tied_model_dir):
    """parallelism=fsdp writes torch.distributed.checkpoint files (here on one process, the format a
    2-process run writes: test_fsdp_trainer.py). With LoRA on a tied head they held the frozen
    ``lm_head.weight`` too (113 MB of SmolLM2 in float32); now the same tensors as the safetensors
    format's adapter, about the same bytes. Resuming from one gives the uninterrupted run's losses."""
    from transformers import AutoConfig

    plain = train(config("ddp", lora=LORA, max_steps=3))
    sharded = train(config("fsdp", lora=LORA, max_steps=3, parallelism="fsdp"))
    ddp_ckpt, fsdp_ckpt = plain.output_dir / "checkpoint-3", sharded.output_dir / "checkpoint-3"
    adapter = safetensors_of(ddp_ckpt / "model")
    tensors = dcp_tensors(fsdp_ckpt)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), [
        k for k in tensors if "lora" not in k
    ]
    assert len(tensors) == len(adapter)  # the adapter's tensors, no more
    assert sum(tensors.values()) == sum(t.numel() * t.element_size() for t in adapter.values())

    tied = AutoConfig.from_pretrained(tied_model_dir)
    head_bytes = tied.vocab_size * tied.hidden_size * 4
    fsdp_bytes = sum(f.stat().st_size for f in fsdp_ckpt.glob("*.distcp"))  # model + optimizer
    ddp_bytes = sum(f.stat().st_size for f in ddp_ckpt.rglob("*.safetensors") if f.parent.name == "model")
    ddp_bytes += (ddp_ckpt / "optimizer.safetensors").stat().st_size
    # the same payload as the safetensors format (plus DCP's per-tensor framing), not the head
    assert fsdp_bytes < ddp_bytes + head_bytes / 4, (fsdp_bytes, ddp_bytes, head_bytes)

    # the same run to step 2, resumed to 3 from its sharded checkpoint: the uninterrupted losses
    short = config("fsdp", lora=LORA, max_steps=2, parallelism="fsdp")
    short["output_dir"] += "-resumed"
    train(short)
    resumed = train({**short, "max_steps": 3, "resume": True})
    a, b = losses_by_step(sharded.metrics_path), losses_by_step(resumed.metrics_path)
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in a), (a, b)
    assert_close(
        safetensors_of(resumed.output_dir / "final-adapter"),
        safetensors_of(sharded.output_dir / "final-adapter"),
    )


# ------------------------------------------------------------------------------------- final folders


@pytest.mark.parametrize(
    "parallelism, save_merged",
    [("fsdp", False), ("ddp", True)],
    ids=["fsdp-format-adapter-only", "ddp-merged-again"],
)
def test_resuming_to_a_later_step_ends_with_what_a_fresh_run_writes(config, parallelism, save_merged):
    """A LoRA run that saved a merged final/ at step 2, resumed to step 3: its final folders are the
    ones a fresh 3-step run writes, holding the same weights (the constant schedule makes the
    2 + 1 steps the 3 steps): a merged final/ is rewritten, or removed when this run saves the adapter
    alone, never left holding step 2 beside a step-3 adapter."""
    common = dict(lora=LORA, parallelism=parallelism)
    fresh = train(config("fresh", max_steps=3, save_merged=save_merged, **common))
    cfg = config("resumed", max_steps=2, save_merged=True, **common)
    train(cfg)
    run = Path(cfg["output_dir"])
    step2_merged = safetensors_of(run / "final")
    resumed = train({**cfg, "max_steps": 3, "save_merged": save_merged, "resume": True})

    assert sorted(p.name for p in run.glob("final*")) == sorted(
        p.name for p in fresh.output_dir.glob("final*")
    )
    assert (run / "final").is_dir() == save_merged
    assert_close(safetensors_of(run / "final-adapter"), safetensors_of(fresh.output_dir / "final-adapter"))
    if save_merged:
        merged = safetensors_of(run / "final")
        assert_close(merged, safetensors_of(fresh.output_dir / "final"))
        assert any(not torch.equal(merged[k], step2_merged[k]) for k in merged)  # not step 2's
    for card in run.glob("final*/README.md"):
        assert "3 optimizer steps" in card.read_text(), card
    assert json.loads((run / "run_state.json").read_text())["final_step"] == 3
    assert resumed.steps == 3


def test_a_resume_stopped_before_its_final_save_is_not_taken_for_finished(config, monkeypatch):
    """Resumed from step 2 to 3 and stopped after checkpoint-3 but before the final save: final/ and
    final-adapter/ still hold step 2. Rerunning is not "already finished": it saves step 3's."""
    cfg = config("stopped", lora=LORA, max_steps=2, save_merged=True)
    train(cfg)
    later = {**cfg, "max_steps": 3, "resume": True}

    def stop(self, scorer):
        raise KeyboardInterrupt("stopped before the final save")

    monkeypatch.setattr(trainer_module.Trainer, "_save_final", stop)
    with pytest.raises(KeyboardInterrupt):
        train(later)
    monkeypatch.undo()
    run = Path(cfg["output_dir"])
    assert (run / "checkpoint-3").is_dir() and (run / "final").is_dir()  # step 2's final folders
    train(later)
    fresh = train(config("stopped-fresh", lora=LORA, max_steps=3, save_merged=True))
    assert_close(safetensors_of(run / "final"), safetensors_of(fresh.output_dir / "final"))
    assert_close(safetensors_of(run / "final-adapter"), safetensors_of(fresh.output_dir / "final-adapter"))


# ------------------------------------------------------------------------------------- the tokenizer


def test_the_tokenizer_is_written_once_per_run_and_every_model_folder_finds_one(
    config, tied_model_dir, capsys
):
    """checkpoint-N/ carries no tokenizer files (the run's tokenizer/ holds them, once); final/ keeps
    its own copy, so plain transformers loads it; a resumed run and ``preftune eval --checkpoint``
    (a full model's checkpoint-N/model) still find the tokenizer."""
    from transformers import AutoTokenizer

    from preftune.held_out import evaluate_run

    cfg = config("tokenizer", max_steps=2, save_steps=1, save_total_limit=0)
    result = train(cfg)
    run = result.output_dir
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        names = {p.name for p in (run / checkpoint).rglob("*")}
        assert not names & set(TOKENIZER_FILES), (checkpoint, names & set(TOKENIZER_FILES))
    original = AutoTokenizer.from_pretrained(tied_model_dir)
    for where in (run / "tokenizer", run / "final"):
        assert AutoTokenizer.from_pretrained(where).get_vocab() == original.get_vocab(), where

    resumed = train({**cfg, "max_steps": 3, "resume": True})
    assert resumed.steps == 3 and not {p.name for p in (run / "checkpoint-3").rglob("*")} & set(
        TOKENIZER_FILES
    )
    metrics = evaluate_run(run, checkpoint=str(run / "checkpoint-1"))
    assert metrics["eval_n"] > 0 and "eval_loss" in metrics


def test_the_setup_reads_the_policy_tokenizer_once(config, tied_model_dir, monkeypatch):
    """prepare_run tokenizes the data with the policy's tokenizer before any weights load, then loads
    the policy with that same tokenizer: the tokenizer files are parsed once, not twice."""
    from preftune import prepare_run as prepare_module
    from preftune.models import loading

    calls = []
    real = loading.load_tokenizer

    def counting(model_dir):
        calls.append(Path(model_dir).resolve())
        return real(model_dir)

    monkeypatch.setattr(loading, "load_tokenizer", counting)
    monkeypatch.setattr(prepare_module, "load_tokenizer", counting)
    run = prepare_module.prepare_run(trainer_module.load_config(config("once", max_steps=1)))
    assert calls.count(Path(tied_model_dir).resolve()) == 1, calls
    assert run.tokenizer.get_vocab() == real(tied_model_dir).get_vocab()


def test_lora_final_adapter_keeps_its_tokenizer(config, tied_model_dir):
    from transformers import AutoTokenizer

    run = train(config("adapter-tokenizer", lora=LORA, max_steps=1)).output_dir
    assert AutoTokenizer.from_pretrained(run / "final-adapter").get_vocab() == (
        AutoTokenizer.from_pretrained(tied_model_dir).get_vocab()
    )
    assert not {p.name for p in (run / "checkpoint-1").rglob("*")} & set(TOKENIZER_FILES)


# ------------------------------------------------------------------------------------- bad model paths


def cli_train(tmp_path, capsys, cfg: dict) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = cli.main(["train", str(path)])
    return code, capsys.readouterr().err


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Every ``from_pretrained`` of a causal LM, recorded (the test fails if one happens)."""
    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def record(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    return calls


@pytest.mark.parametrize("where", ["model", "reference"])
def test_a_misspelt_model_path_stops_before_any_weights_load_and_writes_nothing(
    where, base_config, tmp_path, capsys, no_weight_loads
):
    cfg = base_config(output_dir=str(tmp_path / "never-created"))
    if where == "model":
        cfg["model"] = str(tmp_path / "no-such-model")
    else:
        cfg["method"] = "mrpo"
        cfg["references"] = [{"model": "policy"}, {"model": str(tmp_path / "no-such-refrence")}]
    code, err = cli_train(tmp_path, capsys, cfg)
    lines = [line for line in err.splitlines() if line.startswith("preftune ")]
    assert code == 2 and len(lines) == 1, err
    assert no_weight_loads == []  # the policy did not load first
    assert not (tmp_path / "never-created").exists()
    key = "model: " if where == "model" else "references[1]: "
    assert lines[0].startswith("preftune train: error: " + key) and "does not exist" in lines[0], lines[0]


def test_a_bad_input_leaves_an_existing_output_dir_exactly_as_it_was(base_config, tmp_path, capsys):
    from .test_bad_input import snapshot

    out = tmp_path / "kept"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    cfg = base_config(output_dir=str(out), model=str(tmp_path / "no-such-model"))
    assert cli_train(tmp_path, capsys, cfg)[0] == 2
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    shutil.rmtree(out)
