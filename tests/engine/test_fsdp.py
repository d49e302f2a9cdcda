"""FSDP2 sharding engine (preftune.distributed) on two CPU processes over gloo.

The same DPO steps on the same fixed pairs run three ways: in this process without any process
group (the reference: one micro-batch of 4 pairs per step), and in two worker processes launched
as torchrun would (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), sharded with ``shard_policy``:
full fine-tuning of a tied-embedding model with activation checkpointing and gradient accumulation
(2 processes x 2 micro-batches x 1 pair), and LoRA (2 processes x 2 pairs). Gradient clipping is
active (the norms exceed ``MAX_NORM``), so a wrong global norm changes the weights.

The worker side is this file run as a script: ``python test_fsdp.py SCENARIO WORKDIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

pytestmark = pytest.mark.distributed

VOCAB = 128
PAIRS = 17  # 4 steps x 4 pairs, plus one so that the reference scoring splits unevenly over 2 ranks
STEPS = 4
GLOBAL_BATCH = 4
SAVE_AT = 2
LR = 1e-3
MAX_NORM = 0.05
TIMEOUT_S = 20  # process-group timeout in the workers; the failure test asserts the wall time
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------------
# Shared by this process and the workers


def make_pairs() -> list[SimpleNamespace]:
    g = torch.Generator().manual_seed(1234)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    return [
        SimpleNamespace(prompt_ids=ids(3, 7), chosen_ids=ids(2, 6), rejected_ids=ids(2, 6))
        for _ in range(PAIRS)
    ]


def make_policy(lora: bool, checkpointing: bool):
    from preftune.testing import tiny_llama

    model = tiny_llama(VOCAB, hidden_size=32, layers=2, heads=4, tie_word_embeddings=not lora, seed=0)
    if checkpointing:  # as the trainer does: before LoRA, before sharding
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # lora_A's random init, identical in every process
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        if checkpointing:
            model.enable_input_require_grads()
    return model


def make_scorer(model):
    from preftune.step import PolicyScorer

    return PolicyScorer(model)


def make_optimizer(root):
    params = [p for p in root.parameters() if p.requires_grad]
    # fused AdamW accepts the sharded DTensor parameters on CPU (torch 2.13), as the trainer uses it
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 10)
    return params, optimizer, scheduler


def score_pairs(root, pairs, index) -> dict[str, torch.Tensor]:
    """Chosen and rejected log-probs of pairs ``index``, two pairs per forward."""
    from preftune.data.collate import collate_pairs

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(index), 2):
            part = [pairs[i] for i in index[start : start + 2]]
            logps = root(**collate_pairs(part, 0)).logps
            chosen.append(logps[: len(part)])
            rejected.append(logps[len(part) :])
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


def reference_scores(root, pairs) -> dict[str, torch.Tensor]:
    """Every pair's log-probs, each rank scoring its share (equal shares: the model is sharded)."""
    from preftune.distributed import scatter_score

    return scatter_score(len(pairs), lambda index: score_pairs(root, pairs, index), equal=True)


def train_steps(root, params, optimizer, scheduler, pairs, refs, steps, micro_batches, fail_at=None):
    """DPO steps on pairs [4s, 4s + 4): this rank's share, in ``micro_batches`` micro-batches."""
    from preftune.data.collate import collate_pairs
    from preftune.distributed import clip_grad_norm_, no_sync, rank, world_size
    from preftune.losses import dpo

    history = []
    world, r = world_size(), rank()
    per_rank = GLOBAL_BATCH // world
    for step in steps:
        mine = list(range(step * GLOBAL_BATCH + r * per_rank, step * GLOBAL_BATCH + (r + 1) * per_rank))
        size = per_rank // micro_batches
        losses = []
        for m in range(micro_batches):
            index = mine[m * size : (m + 1) * size]
            with no_sync(root, enabled=m < micro_batches - 1):
                logps = root(**collate_pairs([pairs[i] for i in index], 0)).logps
                if fail_at == step and r == 1:
                    raise RuntimeError("rank 1 fails mid-step on purpose")
                idx = torch.tensor(index)
                out = dpo(logps[:size], logps[size:], refs["chosen"][idx], refs["rejected"][idx], beta=0.1)
                (out.loss / micro_batches).backward()
            losses.append(out.loss.detach())
        norm = clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.stack(losses).mean()
        if world > 1:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        history.append({"loss": float(loss), "grad_norm": norm})
    return history


def flat_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous().float() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Worker side


def _worker_train(workdir: Path, lora: bool, micro_batches: int) -> None:
    from safetensors.torch import save_file

    import preftune.scoring as scoring
    from preftune.checkpointing import load_dcp_state, save_dcp_state
    from preftune.distributed import full_state_dict, rank, save_consolidated, shard_policy
    from preftune.testing import tiny_tokenizer

    name = "lora" if lora else "full"
    pairs = make_pairs()
    seen = []  # what the fused head reads inside the sharded forward
    fused_token_logps = scoring.token_logps

    def spy(hidden, targets, head, **kw):
        seen.append((type(head.weight).__name__, tuple(head.weight.shape), scoring._fusable(head)))
        return fused_token_logps(hidden, targets, head, **kw)

    scoring.token_logps = spy

    def fresh():
        model = make_policy(lora, checkpointing=True)
        root = shard_policy(make_scorer(model))
        return (model, root, *make_optimizer(root))

    model, root, params, optimizer, scheduler = fresh()
    head = model.get_output_embeddings()
    outside = (type(head.weight).__name__, tuple(head.weight.to_local().shape))
    tied = (not lora) and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if lora:
        with model.disable_adapter():
            refs = reference_scores(root, pairs)
    else:
        refs = reference_scores(root, pairs)
    history = train_steps(root, params, optimizer, scheduler, pairs, refs, range(SAVE_AT), micro_batches)
    ckpt = workdir / f"{name}-ckpt"
    save_dcp_state(
        ckpt,
        root,
        optimizer,
        json_files={"trainer_state.json": {"step": SAVE_AT}, "scheduler.json": scheduler.state_dict()},
        write=tiny_tokenizer(VOCAB).save_pretrained,
    )
    history += train_steps(
        root, params, optimizer, scheduler, pairs, refs, range(SAVE_AT, STEPS), micro_batches
    )
    result = {"history": history, "head_outside_forward": outside, "head_in_forward": seen[0], "tied": tied}
    if not lora:  # the HF model as the FSDP root: its forward never runs, so nothing unshards the rest
        from torch.distributed.fsdp import fully_shard

        wrong = make_policy(lora, checkpointing=False)
        for layer in wrong.model.layers:
            fully_shard(layer)
        fully_shard(wrong)
        try:
            score_pairs(make_scorer(wrong), pairs, [0])
            result["wrong_root"] = "no error"
        except RuntimeError as e:
            result["wrong_root"] = str(e)
    if lora:
        with model.disable_adapter():
            result["disabled_after_training"] = {
                k: v.tolist() for k, v in reference_scores(root, pairs).items()
            }
    result["refs"] = {k: v.tolist() for k, v in refs.items()}
    final = full_state_dict(root)
    tokenizer = tiny_tokenizer(VOCAB)
    save_consolidated(
        root, workdir / f"{name}-final", tokenizer=tokenizer, adapter_directory=workdir / f"{name}-adapter"
    )

    # resume: new model and optimizer objects, state from the sharded checkpoint
    model, root, params, optimizer, scheduler = fresh()
    saved = load_dcp_state(ckpt, root, optimizer)
    scheduler.load_state_dict(saved["scheduler.json"])
    start = saved["trainer_state.json"]["step"]
    result["resumed"] = train_steps(
        root, params, optimizer, scheduler, pairs, refs, range(start, STEPS), micro_batches
    )
    resumed = full_state_dict(root)
    if rank() == 0:
        save_file(flat_state(final), workdir / f"{name}-final.safetensors")
        save_file(flat_state(resumed), workdir / f"{name}-resumed.safetensors")
        (workdir / f"{name}.json").write_text(json.dumps(result))


def _worker_fail(workdir: Path) -> None:
    """Train one step, checkpoint, then rank 1 raises in the middle of step 2."""
    from preftune.checkpointing import save_dcp_state
    from preftune.distributed import shard_policy

    pairs = make_pairs()
    model = make_policy(lora=False, checkpointing=True)
    root = shard_policy(make_scorer(model))
    params, optimizer, scheduler = make_optimizer(root)
    refs = reference_scores(root, pairs)
    train_steps(root, params, optimizer, scheduler, pairs, refs, range(1), 2)
    save_dcp_state(
        workdir / "ckpt",
        root,
        optimizer,
        json_files={"trainer_state.json": {"step": 1}, "scheduler.json": scheduler.state_dict()},
    )
    train_steps(root, params, optimizer, scheduler, pairs, refs, range(1, STEPS), 2, fail_at=1)


def _worker_barrier(workdir: Path) -> None:
    """Rank 1 never reaches the barrier; rank 0 must say so, naming the stage and rank 1."""
    from preftune.distributed import DistributedError, barrier, rank

    if rank() == 1:
        time.sleep(8)
        os._exit(0)  # as if it never came back (no process-group teardown)
    try:
        barrier("save checkpoint-7", timeout_s=2)
    except DistributedError as e:
        (workdir / "barrier.txt").write_text(str(e))
        raise


def worker_main(scenario: str, workdir: str) -> None:
    from preftune.distributed import end_process_group, exit_on_error, init_process_group

    torch.use_deterministic_algorithms(True)
    init_process_group(timeout_s=TIMEOUT_S, backend="gloo")
    workdir = Path(workdir)
    with exit_on_error(scenario):
        if scenario == "train":
            _worker_train(workdir, lora=False, micro_batches=2)
            _worker_train(workdir, lora=True, micro_batches=1)
        elif scenario == "fail":
            _worker_fail(workdir)
        elif scenario == "barrier":
            _worker_barrier(workdir)
    end_process_group()


# --------------------------------------------------------------------------------------------------
# Test side


def launch(
    scenario: str, workdir: Path, world: int = 2, timeout: float = 120
) -> tuple[list[int], list[float]]:
    """Run the scenario on ``world`` processes; return their exit codes (-9: killed at ``timeout``)
    and when each one ended (seconds after the launch)."""
    from .conftest import free_port, launch_processes, rank_env  # not in the worker (run as a script)

    port = free_port()
    cmd = [sys.executable, str(HERE), scenario, str(workdir)]
    return launch_processes(
        [(cmd, rank_env(r, world, port)) for r in range(world)], workdir, scenario, timeout
    )


def logs(workdir: Path, scenario: str, world: int = 2) -> str:
    from .conftest import process_logs

    return process_logs(workdir, scenario, world)


def single_process_run(lora: bool, steps=range(STEPS), resume_from: Path | None = None):
    """The reference: no process group, one micro-batch of 4 pairs per step, no checkpointing."""
    from preftune.checkpointing import load_dcp_state
    from preftune.distributed import scatter_score

    pairs = make_pairs()
    model = make_policy(lora, checkpointing=False)
    root = make_scorer(model)
    params, optimizer, scheduler = make_optimizer(root)
    index = list(range(len(pairs)))
    if lora:
        with model.disable_adapter():
            refs = scatter_score(len(pairs), lambda i: score_pairs(root, pairs, i))
    else:
        refs = score_pairs(root, pairs, index)
    if resume_from is not None:
        saved = load_dcp_state(resume_from, root, optimizer)
        scheduler.load_state_dict(saved["scheduler.json"])
        steps = range(saved["trainer_state.json"]["step"], STEPS)
    history = train_steps(root, params, optimizer, scheduler, pairs, refs, steps, 1)
    return SimpleNamespace(model=model, root=root, pairs=pairs, refs=refs, history=history)


def assert_close_weights(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    for k, e in expected.items():
        a = actual[k].float()
        e = e.detach().float()
        diff = float((a - e).norm())
        assert diff <= rel * float(e.norm()) + 1e-12, (k, diff, float(e.norm()))


def assert_same_history(two: list[dict], one: list[dict]) -> None:
    assert len(two) == len(one)
    for step, (b, a) in enumerate(zip(two, one)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (step, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (step, a, b)
        assert a["grad_norm"] > MAX_NORM  # clipping is active: a wrong norm would change the update


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def one_process_full():
    return single_process_run(lora=False)


@pytest.fixture(scope="module")
def trained(workdir, one_process_full):
    """Both 2-process trainings (full, LoRA) in one launch, and their 1-process references."""
    codes, _ = launch("train", workdir, timeout=240)
    assert codes == [0, 0], logs(workdir, "train")
    out = {}
    for name in ("full", "lora"):
        from safetensors.torch import load_file

        out[name] = SimpleNamespace(
            two=json.loads((workdir / f"{name}.json").read_text()),
            final=load_file(workdir / f"{name}-final.safetensors"),
            resumed=load_file(workdir / f"{name}-resumed.safetensors"),
            one=single_process_run(lora=True) if name == "lora" else one_process_full,
        )
    return out


@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_process_fsdp_trains_like_one_process(trained, name):
    run = trained[name]
    assert_same_history(run.two["history"], run.one.history)
    assert abs(run.one.history[-1]["loss"] - run.one.history[0]["loss"]) > 1e-4  # training moves
    expected = {k[len("model.") :]: v for k, v in run.one.root.state_dict().items()}
    assert_close_weights(run.final, expected)


def test_root_managed_head_is_whole_inside_the_scoring_forward(trained):
    run = trained["full"]
    assert run.two["tied"]  # the tied head and embedding stayed one parameter after sharding
    kind, shape = run.two["head_outside_forward"]
    assert kind == "DTensor" and shape == [VOCAB // 2, 32]  # sharded between forwards
    kind, shape, fusable = run.two["head_in_forward"]
    assert kind == "Parameter" and shape == [VOCAB, 32] and fusable  # the fused head reads it whole
    # whereas sharding the HF model as the root leaves the embedding sharded when scoring reads it
    assert "mixed torch.Tensor and DTensor" in run.two["wrong_root"], run.two["wrong_root"]


def test_reference_scores_split_over_ranks_equal_one_process(trained):
    for name in ("full", "lora"):
        two = {k: torch.tensor(v) for k, v in trained[name].two["refs"].items()}
        one = trained[name].one.refs
        for side in ("chosen", "rejected"):
            assert len(two[side]) == PAIRS
            torch.testing.assert_close(two[side], one[side], rtol=1e-5, atol=1e-6)


def test_lora_disabled_adapter_under_fsdp_is_the_base_model(trained):
    from preftune.testing import tiny_llama

    run = trained["lora"]
    base = make_scorer(tiny_llama(VOCAB, hidden_size=32, layers=2, heads=4, seed=0))
    pairs = run.one.pairs
    expected = score_pairs(base, pairs, list(range(PAIRS)))
    disabled = {k: torch.tensor(v) for k, v in run.two["disabled_after_training"].items()}
    trained_scores = score_pairs(run.one.root, pairs, list(range(PAIRS)))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(disabled[side], expected[side], rtol=1e-5, atol=1e-6)
        assert (trained_scores[side] - expected[side]).abs().max() > 1e-4  # the adapter did change it


@pytest.mark.parametrize("name", ["full", "lora"])
def test_sharded_checkpoint_resume_equals_uninterrupted(trained, workdir, name):
    run = trained[name]
    assert_same_history(run.two["resumed"], run.two["history"][SAVE_AT:])
    assert (workdir / f"{name}-ckpt" / "tokenizer.json").is_file()  # rank 0's extra files
    assert not list(workdir.glob("*.tmp"))
    assert_close_weights(run.resumed, run.final, rel=1e-6)


def test_consolidated_model_loads_in_transformers(trained, workdir):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(workdir / "full-final")
    assert full.get_output_embeddings().weight is full.get_input_embeddings().weight
    expected = trained["full"].one.model.state_dict()
    assert_close_weights({k: v for k, v in full.state_dict().items() if k in expected}, expected)

    lora_one = trained["lora"].one.model
    merged_one = {k: v.clone() for k, v in lora_one.merge_and_unload().state_dict().items()}
    merged = AutoModelForCausalLM.from_pretrained(workdir / "lora-final")
    assert not any("lora" in k for k in merged.state_dict())
    assert_close_weights(merged.state_dict(), merged_one)


def test_adapter_alone_loads_with_peft(trained, workdir):
    from peft import PeftModel

    from preftune.testing import tiny_llama

    run = trained["lora"]
    base = tiny_llama(VOCAB, hidden_size=32, layers=2, heads=4, seed=0)
    model = PeftModel.from_pretrained(base, workdir / "lora-adapter")
    pairs = run.one.pairs
    got = score_pairs(make_scorer(model), pairs, list(range(PAIRS)))
    want = score_pairs(run.one.root, pairs, list(range(PAIRS)))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(got[side], want[side], rtol=1e-5, atol=1e-5)


def test_failing_rank_ends_the_job_and_its_checkpoint_resumes_on_one_process(workdir, one_process_full):
    codes, ended = launch("fail", workdir, timeout=TIMEOUT_S + 90)
    text = logs(workdir, "fail")
    assert codes[1] == 1 and "fails mid-step on purpose" in text, text
    assert codes[0] == 1, text  # rank 0 ended by itself, with an error
    assert ended[0] - ended[1] < TIMEOUT_S, (ended, text)  # at worst at the process-group timeout
    ckpt = workdir / "ckpt"
    assert (ckpt / ".metadata").is_file() and not (workdir / "ckpt.tmp").exists()
    # resume the 2-process checkpoint (step 1) in one process: DCP reshards 2 -> 1
    resumed = single_process_run(lora=False, resume_from=ckpt)
    reference = one_process_full
    assert_same_history(resumed.history, reference.history[1:])
    assert_close_weights(resumed.root.state_dict(), reference.root.state_dict())


def test_barrier_names_the_stage_and_the_missing_rank(workdir):
    codes, ended = launch("barrier", workdir, timeout=60)
    assert codes == [1, 0], logs(workdir, "barrier")
    message = (workdir / "barrier.txt").read_text()
    assert "save checkpoint-7" in message and "rank(s) 1" in message, message
    assert ended[0] < ended[1]  # rank 0 gave up at its 2 s timeout, while rank 1 still slept


def test_shard_indices_cover_every_row_once():
    from preftune.distributed import shard_indices

    for contiguous in (False, True):
        shares = [shard_indices(7, rank_=r, world=3, contiguous=contiguous) for r in range(3)]
        assert sorted(i for share in shares for i in share) == list(range(7))
        padded = [shard_indices(7, rank_=r, world=3, contiguous=contiguous, equal=True) for r in range(3)]
        assert [len(p) for p in padded] == [3, 3, 3]
        assert all(set(p) == set(s) for p, s in zip(padded, shares))  # padding repeats a row of its own
    assert shard_indices(7, rank_=1, world=3) == [1, 4]
    assert shard_indices(7, rank_=1, world=3, contiguous=True) == [3, 4, 5]
    assert shard_indices(1, rank_=1, world=2, equal=True) == [0]  # an empty share still runs once


def test_python_dash_m_preftune_runs_the_cli():
    # what `torchrun -m preftune train cfg.yaml` runs in every process
    out = subprocess.run(
        [sys.executable, "-m", "preftune", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "preftune <command>" in out.stdout, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "preftune", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "unknown command" in out.stderr


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
