"""``preftune train`` with ``parallelism: fsdp`` on two CPU processes (gloo), against one process and DDP.

The 2-process trainings run in worker processes launched as torchrun would (the environment only),
except the resumed run, which is two real ``torchrun --nnodes 2`` launchers on localhost (one
process each, ``python -m preftune train``), and the accelerate run (``accelerate launch``, marked
slow). The global batch is 4 pairs everywhere: one process 1 x 4, DDP 2 x 2, FSDP 2 x 1 x 2
micro-batches (accumulation without reduction until the last micro-batch), except global-scope RPO,
whose contrast spans one micro-batch (FSDP 2 x 2 there). Gradient clipping is active at every step,
so a wrong global norm over the shards would change the weights. DDP of full DPO and global RPO
against one process is test_distributed.py's. The worker side is this file run as a script:
``python test_fsdp_trainer.py CONFIGS.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve()
WORLD = 2
STEPS = 3
TIMEOUT_S = 20  # dist_timeout_s of the failing run: the other rank must end within it
RUNS = {  # max_grad_norm below every step's gradient norm
    "dpo_full": {"method": "dpo", "max_grad_norm": 0.5},
    "dpo_lora": {  # save_merged: final/ holds the merged weights compared across runs
        "method": "dpo",
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "max_grad_norm": 0.05,
        "save_merged": True,
        "save_steps": 1,  # checkpoint-2 to resume from (the model: a tied head, frozen under LoRA)
    },
    "lora_online": {  # the LoRA base (adapters disabled) scored every step through the sharded root
        "method": "dpo",
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "reference_mode": "online",
        "max_grad_norm": 0.05,
        "save_merged": True,
    },
    # references: the policy, another tokenizer's model. adam_eps 1e-5 (mean |grad| is ~3e-4): with the
    # default 1e-8, one weight of layers.1.mlp.up_proj has a first-step gradient of -1e-7 (a near
    # cancellation, 3000x below the mean), which Adam turns into a full lr-sized step; the float32
    # rounding of 2 x 2 pairs against 1 x 4 then moves that one element by up to 1e-3 of lr and carried
    # 94% of the tensor's difference (7.7e-6 .. 1.43e-5 relative across torch 2.11/2.13). With 1e-5 no
    # element is that ill-conditioned: the largest difference is 1.3e-6 relative, 7x below the tolerance.
    "mrpo": {"method": "mrpo", "max_grad_norm": 0.5, "adam_eps": 1e-5},
    "rpo_global": {"method": "rpo", "rpo": {"contrast_scope": "global"}, "max_grad_norm": 0.2},
}
FAIL_ENV = "PREFTUNE_TEST_FAIL_AT"  # "RANK:STEP": that rank raises in the middle of that step


# --------------------------------------------------------------------------------------------------
# Worker side


def worker(spec: str) -> None:
    from preftune.distributed import end_process_group
    from preftune.trainer import Trainer, train

    fail = os.environ.get(FAIL_ENV)
    if fail:
        fail_rank, fail_step = (int(x) for x in fail.split(":"))
        micro_batch = Trainer._micro_batch

        def failing(self, *args, **kwargs):
            if self.stage == f"step {fail_step}" and self.run.accelerator.process_index == fail_rank:
                raise RuntimeError(f"rank {fail_rank} fails mid-step on purpose")
            return micro_batch(self, *args, **kwargs)

        Trainer._micro_batch = failing
    for cfg in json.loads(Path(spec).read_text()):
        train(cfg)
    end_process_group()  # as `preftune train` does at its end


# --------------------------------------------------------------------------------------------------
# Test side


@pytest.fixture(scope="module")
def setup(tiny_model_dir, other_tokenizer_model_dir, tied_head_model_dir, tmp_path_factory):
    from .conftest import arithmetic_rows, write_jsonl

    root = tmp_path_factory.mktemp("fsdp-trainer")
    train_file = write_jsonl(root / "train.jsonl", arithmetic_rows(8))
    eval_file = write_jsonl(root / "eval.jsonl", arithmetic_rows(3, 1))

    def config(name: str, run: str, world: int, parallelism: str = "ddp", **overrides) -> dict:
        cfg = {
            "model": str(tiny_model_dir),
            "data": {"train": train_file, "eval": eval_file},
            "batch_size": 4 // world,
            "max_steps": STEPS,  # 2 steps per epoch: the third starts a new epoch's order
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "lr_scheduler": "linear",
            "precision": "fp32",
            "parallelism": parallelism,
            "output_dir": str(root / name),
            "cache_dir": str(root / "cache"),
            "progress": False,
            "report_to": [],
            **RUNS[run],
        }
        if run == "dpo_lora":  # as SmolLM2: the head is the embedding, frozen and not in a checkpoint
            cfg["model"] = str(tied_head_model_dir)
        if run == "mrpo":
            cfg["references"] = [{"model": "policy"}, {"model": str(other_tokenizer_model_dir)}]
        if parallelism == "fsdp" and world > 1 and run != "rpo_global":
            cfg.update(batch_size=1, grad_accum=2)
        if run == "dpo_full" and parallelism == "fsdp":
            cfg["gradient_checkpointing"] = True  # composes with sharding (same numbers)
        cfg.update(overrides)
        return cfg

    return root, config


def launch_workers(configs: list[dict], root: Path, name: str, timeout: float = 300, env=None):
    from .conftest import free_port, launch_processes, rank_env

    spec = root / f"{name}.json"
    spec.write_text(json.dumps(configs))
    port = free_port()
    commands = [
        (
            [sys.executable, str(HERE), str(spec)],
            rank_env(r, WORLD, port, ACCELERATE_USE_CPU="1", **(env or {})),
        )
        for r in range(WORLD)
    ]
    return launch_processes(commands, root, name, timeout)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_same_weights(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    for k, e in expected.items():
        diff = float((actual[k].float() - e.float()).norm())
        assert diff <= rel * float(e.float().norm()) + 1e-12, (k, diff, float(e.norm()))


def assert_same_trajectory(actual: list[dict], expected: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for a, e in zip(actual, expected):
        assert a["loss"] == pytest.approx(e["loss"], rel=rel), (a["step"], e["loss"], a["loss"])
        assert a["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4), (a["step"], e, a)


@pytest.fixture(scope="module")
def trajectories(setup):
    """metrics and final weights of every run: one process here, DDP and FSDP in one 2-process launch."""
    from preftune.trainer import train

    from .conftest import metric_rows, process_logs

    root, config = setup
    # DDP of dpo_full and rpo_global against one process: test_distributed.py
    kinds = {
        "dpo_full": ("fsdp",),
        "dpo_lora": ("ddp", "fsdp"),
        "lora_online": ("fsdp",),
        "mrpo": ("ddp", "fsdp"),
        "rpo_global": ("fsdp",),
    }
    configs = [config(f"{p}-{run}", run, WORLD, p) for run in RUNS for p in kinds[run]]
    codes, _ = launch_workers(configs, root, "trajectories")
    assert codes == [0, 0], process_logs(root, "trajectories", WORLD)
    out = {}
    for run in RUNS:
        train(config(f"one-{run}", run, 1))
        for kind in ("one", *kinds[run]):
            out[kind, run] = (
                metric_rows(root / f"{kind}-{run}", "loss"),
                final_weights(root / f"{kind}-{run}"),
            )
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_one_process_ddp_and_fsdp_train_alike(trajectories, run):
    one_rows, one_weights = trajectories["one", run]
    assert abs(one_rows[-1]["loss"] - one_rows[0]["loss"]) > 1e-3  # the trajectory moves
    assert all(
        r["grad_norm"] > RUNS[run]["max_grad_norm"] for r in one_rows
    )  # clipping is active at every step
    for kind in ("ddp", "fsdp"):
        if (kind, run) not in trajectories:
            continue
        rows, weights = trajectories[kind, run]
        assert_same_trajectory(rows, one_rows)
        assert_same_weights(weights, one_weights)


def test_fsdp_run_directory_is_complete(trajectories, setup):
    from transformers import AutoModelForCausalLM

    root, _ = setup
    run = root / "fsdp-dpo_lora"
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["parallelism"] == "fsdp" and state["step"] == STEPS
    assert (run / "checkpoint-3" / ".metadata").is_file()  # torch.distributed.checkpoint
    assert (run / "final-adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    assert not any("lora" in k for k in merged.state_dict())
    assert not list(run.glob("*.tmp"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any("eval_loss" in r for r in rows)  # evaluation ran through the sharded scorer
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # once per run, not in the checkpoints
    assert not list(run.glob("checkpoint-*/tokenizer*"))


def test_fsdp_lora_checkpoint_holds_what_ddp_holds(trajectories, setup):
    """The sharded LoRA checkpoint of 2 processes holds the adapter's tensors and no frozen base
    weight (the tied head was in it: 113 MB of SmolLM2), about the bytes of DDP's checkpoint."""
    import math

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from transformers import AutoConfig

    root, config = setup
    fsdp_ckpt, ddp_ckpt = root / "fsdp-dpo_lora" / "checkpoint-3", root / "ddp-dpo_lora" / "checkpoint-3"
    metadata = dcp.FileSystemReader(str(fsdp_ckpt)).read_metadata().state_dict_metadata
    model = {
        k: math.prod(m.size) * m.properties.dtype.itemsize
        for k, m in metadata.items()
        if k.startswith("model.")
    }
    adapter = load_file(ddp_ckpt / "model" / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in model), [k for k in model if "lora" not in k]
    assert len(model) == len(adapter)
    assert sum(model.values()) == sum(t.numel() * t.element_size() for t in adapter.values())
    tied = AutoConfig.from_pretrained(config("x", "dpo_lora", 1)["model"])
    head_bytes = tied.vocab_size * tied.hidden_size * 4
    fsdp_bytes = sum(f.stat().st_size for f in fsdp_ckpt.glob("*.distcp"))  # both ranks' shards
    ddp_bytes = sum(f.stat().st_size for f in (ddp_ckpt / "model").glob("*.safetensors"))
    ddp_bytes += (ddp_ckpt / "optimizer.safetensors").stat().st_size
    # DCP frames each rank's shard of each tensor (~1.5 KB apiece, more than these tiny adapters hold;
    # nothing next to SmolLM2's); the frozen head alone would be head_bytes
    assert fsdp_bytes < ddp_bytes + head_bytes / 2, (fsdp_bytes, ddp_bytes, head_bytes)


def test_fsdp_lora_checkpoint_resumed_on_one_process_trains_alike(trajectories, setup):
    """The 2-process LoRA run's checkpoint-2 resumed by one process (the sharded checkpoint holds
    the adapter alone; the frozen base comes from the model): the same losses and merged weights as
    the uninterrupted run."""
    from preftune.trainer import train

    from .conftest import metric_rows

    root, config = setup
    copy = root / "fsdp-dpo_lora-resumed"
    shutil.copytree(root / "fsdp-dpo_lora", copy, ignore=shutil.ignore_patterns("checkpoint-3", "final*"))
    train(config(copy.name, "dpo_lora", 1, "fsdp", resume=True))
    rows, weights = trajectories["fsdp", "dpo_lora"]
    assert metric_rows(copy, "loss")[-1]["step"] == STEPS
    assert_same_trajectory(metric_rows(copy, "loss"), rows)
    assert_same_weights(final_weights(copy), weights)


@pytest.fixture(scope="module")
def failed_run(setup):
    """FSDP DPO checkpointing every step, where rank 1 raises in the middle of step 3."""
    root, config = setup
    cfg = config("fsdp-failed", "dpo_full", WORLD, "fsdp", save_steps=1, dist_timeout_s=TIMEOUT_S)
    codes, ended = launch_workers([cfg], root, "failed", timeout=TIMEOUT_S + 120, env={FAIL_ENV: "1:3"})
    return root / "fsdp-failed", cfg, codes, ended


def test_a_failing_rank_ends_the_job_naming_rank_and_stage(failed_run, setup):
    from .conftest import process_logs

    run, _, codes, ended = failed_run
    text = process_logs(setup[0], "failed", WORLD)
    assert codes == [1, 1], text  # both ended by themselves, with an error
    assert "rank 1: step 3 failed" in text and "fails mid-step on purpose" in text, text
    assert "rank 0: step 3 failed" in text, text  # the survivor names its rank and stage too
    assert ended[0] - ended[1] < TIMEOUT_S, ended
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]


def test_fsdp_resume_after_the_job_died_on_two_nodes_equals_uninterrupted_one_node(
    failed_run, trajectories, setup
):
    """The failed run resumed by two ``torchrun --nnodes 2`` launchers on localhost, one process
    each, running ``python -m preftune train``: the same losses and weights as the uninterrupted
    one-node run (so two nodes train like one, and resuming is exact)."""
    from .conftest import free_port, launch_processes, metric_rows, process_logs

    run, cfg, _, _ = failed_run
    root, config = setup
    copy = root / "fsdp-failed-one-process"
    shutil.copytree(run, copy)
    cfg_file = root / "two-nodes.json"
    cfg_file.write_text(json.dumps({**cfg, "resume": True}))
    port = str(free_port())
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    commands = [
        (
            [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                "--master_addr", "127.0.0.1", "--master_port", port,
                "-m", "preftune", "train", str(cfg_file),
            ],
            env,
        )
        for node in range(2)
    ]  # fmt: skip
    codes, _ = launch_processes(commands, root, "two-nodes", timeout=300)
    assert codes == [0, 0], process_logs(root, "two-nodes", 2)
    logs = process_logs(root, "two-nodes", 2)
    assert "resumed from" in logs
    assert logs.count("next: preftune report") == 1  # the summary is printed by rank 0 only
    rows, weights = trajectories["fsdp", "dpo_full"]
    assert_same_trajectory(metric_rows(run, "loss"), rows)
    assert_same_weights(final_weights(run), weights)

    # the same checkpoint (2 processes x 1 x 2) resumed by one process (1 x 4): resharded on load
    from preftune.trainer import train

    train(config(copy.name, "dpo_full", 1, "fsdp", resume=True))
    assert_same_trajectory(metric_rows(copy, "loss"), rows)
    assert_same_weights(final_weights(copy), weights)


def test_resuming_across_checkpoint_formats_is_refused(failed_run, setup):
    from preftune.checkpointing import TrainingError
    from preftune.trainer import train

    run, _, _, _ = failed_run
    root, config = setup
    copy = root / "fsdp-failed-as-ddp"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final*", "checkpoint-3"))
    with pytest.raises(TrainingError, match=r"written with parallelism=fsdp.*this run has parallelism=ddp"):
        train(config(copy.name, "dpo_full", 1, "ddp", resume=True))


@pytest.mark.slow
def test_accelerate_launch_on_cpu(trajectories, setup):
    """``accelerate launch --multi_gpu --num_processes 2 -m preftune train`` on a machine without GPUs:
    the same FSDP run. (``--cpu`` makes accelerate 1.x start one process, whatever
    ``--num_processes``; ``--multi_gpu`` only picks its torchrun launcher, the processes then train
    on the CPU over gloo.)"""
    from .conftest import free_port, launch_processes, metric_rows, process_logs

    root, config = setup
    cfg_file = root / "accelerate.json"
    cfg_file.write_text(json.dumps(config("fsdp-accelerate", "dpo_full", WORLD, "fsdp")))
    argv = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "preftune", "train", str(cfg_file),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    codes, _ = launch_processes([(argv, env)], root, "accelerate", timeout=300)
    assert codes == [0], process_logs(root, "accelerate", 1)
    rows, weights = trajectories["fsdp", "dpo_full"]
    assert_same_trajectory(metric_rows(root / "fsdp-accelerate", "loss"), rows)
    assert_same_weights(final_weights(root / "fsdp-accelerate"), weights)


def test_fp16_with_fsdp_is_a_config_error():
    from preftune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fp16 is not supported with parallelism=fsdp"):
        load_config({"precision": "fp16", "parallelism": "fsdp"})
    assert load_config({"dist_timeout_s": 60}).parallelism == "ddp"


if __name__ == "__main__":
    worker(sys.argv[1])
