"""The stages of one round that sample, judge and pair, and the held-out evaluation after it; each
reads the round's inputs and writes its output under ``round-N/`` (:mod:`.record`):
``samples.part-R.jsonl`` then ``judged.part.jsonl`` and ``samples.jsonl`` (:func:`sample_stage`,
:func:`judge_stage`), ``pairs.jsonl`` and ``pairs.json`` (:func:`pairs_stage`), ``eval.jsonl``
(:func:`evaluate_stage`).
Training the round is :mod:`.training`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import distributed, preemption
from ..config import TrainConfig
from .checks import Plan, stop_pattern
from .judges import make_judge
from .pairs import build_pairs
from .prompts import round_slice
from .record import JUDGED, grouped, model_of, round_dir, say, write_json, write_jsonl
from .sampling import done_batches, drop_torn_tail, merged_samples, sample_round


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(cfg: TrainConfig, name: str):
    import torch

    from ..models.loading import config_dtype, load_causal_lm, resolve_causal_lm
    from ..progress import library_bars

    path = resolve_causal_lm(name, "model")
    dtype = config_dtype(cfg.model_dtype) or torch.float32
    with library_bars(cfg.progress):
        return load_causal_lm(str(path), dtype=dtype, device=_device())


def sample_stage(cfg: TrainConfig, plan: Plan, round_index: int, rank: int = 0, world: int = 1) -> bool:
    """Draw this rank's missing batches of the round (all ranks); True if all are now drawn. On a
    preemption signal this rank stops after the batch in progress (``preemption.signalled``)."""
    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    rd.mkdir(parents=True, exist_ok=True)
    indices = round_slice(plan.prompts, round_index, rounds.prompts_per_round)
    prompts = [plan.prompts[i][cfg.data.columns.prompt] for i in indices]
    done = done_batches(rd)  # every rank deals the missing batches from the same list: read before writing
    distributed.barrier(f"iterate: round {round_index} sampling start", cfg.dist_timeout_s)
    batches = range((len(prompts) + rounds.batch_size - 1) // rounds.batch_size)
    if [b for b in batches if b not in done][rank::world]:  # this rank has batches to draw
        name = model_of(cfg, round_index - 1)
        say(f"round {round_index}: sampling {len(prompts)} prompts x {rounds.samples_per_prompt} from {name}")
        model, tokenizer = load_model(cfg, name)
        try:
            sample_round(
                model,
                tokenizer,
                prompts,
                rounds=rounds,
                round_index=round_index,
                round_dir=rd,
                rank=rank,
                world=world,
                chat_template=cfg.data.chat_template,
                stop_when=stop_pattern(rounds),
                progress=cfg.progress and rank == 0,
                done=done,
                stop=preemption.signalled,  # SIGTERM: the batch in progress is the last one drawn
            )
        finally:
            del model
    return merged_samples(rd, len(prompts), rounds.batch_size) is not None


def judge_stage(cfg: TrainConfig, plan: Plan, round_index: int) -> list[dict] | None:
    """Score every sample of the round (main process), one sampled batch's samples at a time: each
    chunk's scores are appended to ``judged.part.jsonl`` as they land (the resume point: a rerun
    judges only the chunks missing), then ``samples.jsonl`` is written and its rows returned. On a
    preemption signal it stops after the chunk in progress and returns None."""
    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    indices = round_slice(plan.prompts, round_index, rounds.prompts_per_round)
    texts = merged_samples(rd, len(indices), rounds.batch_size)
    if texts is None:
        raise RuntimeError(f"round {round_index}: sampling is not finished in {rd}")
    column = cfg.data.columns.prompt
    flat = [(i, j, t) for i, group in zip(indices, texts) for j, t in enumerate(group)]
    size = rounds.batch_size * rounds.samples_per_prompt  # a chunk: the samples of one sampled batch
    chunks = range((len(flat) + size - 1) // size)
    part = rd / JUDGED
    drop_torn_tail(part)
    done = judged_chunks(part)
    missing = [c for c in chunks if c not in done]
    if missing:
        judge = make_judge(rounds.judge, device=_device())
        try:
            with open(part, "a") as f:
                for c in missing:
                    if preemption.signalled():  # SIGTERM: the chunk in progress was the last one judged
                        return None
                    chunk = flat[c * size : (c + 1) * size]
                    scores, details = judge.score(
                        [plan.prompts[i][column] for i, _, _ in chunk],
                        [t for _, _, t in chunk],
                        [plan.prompts[i] for i, _, _ in chunk],
                    )
                    f.write(json.dumps({"chunk": c, "scores": scores, "details": details}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    done[c] = {"scores": scores, "details": details}
        finally:
            judge.close()
    scores = [s for c in chunks for s in done[c]["scores"]]
    details = [d for c in chunks for d in done[c]["details"]]
    records = [
        {
            "prompt_index": i,
            "row": plan.prompts[i]["_row"],
            "sample": j,
            "prompt": plan.prompts[i][column],
            "completion": text,
            "score": score,
            "judge": detail,
        }
        for (i, j, text), score, detail in zip(flat, scores, details)
    ]
    write_jsonl(rd / "samples.jsonl", records)
    part.unlink(missing_ok=True)  # everything it held is in samples.jsonl
    return records


def judged_chunks(part: Path) -> dict[int, dict]:
    """The chunks of a round already judged ({chunk: {"scores", "details"}}; a torn line is ignored)."""
    done: dict[int, dict] = {}
    if part.is_file():
        for line in part.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that chunk is judged again
            done[int(record["chunk"])] = {"scores": record["scores"], "details": record["details"]}
    return done


def pairs_stage(cfg: TrainConfig, round_index: int, records: list[dict]) -> dict:
    """Write ``pairs.jsonl`` (and ``pairs.json``, its counts) from the judged samples."""
    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    rows, stats = build_pairs(
        grouped(records),
        rounds.pairs,
        max_pairs_per_prompt=rounds.max_pairs_per_prompt,
        threshold=rounds.threshold,
        columns=cfg.data.columns,
    )
    write_json(rd / "pairs.json", stats)
    write_jsonl(rd / "pairs.jsonl", rows)
    return stats


def evaluate_stage(cfg: TrainConfig, plan: Plan, round_index: int) -> dict[str, float]:
    """Greedy answers of the model after round ``round_index`` to the held-out prompts, scored by the
    judge; writes ``round-N/eval.jsonl``. Empty without ``rounds.eval_prompts``."""
    if not plan.eval_prompts:
        return {}
    from ..generation import generate

    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    rd.mkdir(parents=True, exist_ok=True)
    column = cfg.data.columns.prompt
    prompts = [r[column] for r in plan.eval_prompts]
    model, tokenizer = load_model(cfg, model_of(cfg, round_index))
    try:
        outputs = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=rounds.max_new_tokens,
            batch_size=rounds.batch_size * rounds.samples_per_prompt,
            chat_template=cfg.data.chat_template,
            progress=cfg.progress,
            stop_when=stop_pattern(rounds),
        )
    finally:
        del model
    judge = make_judge(rounds.judge, device=_device())
    try:
        scores, details = judge.score(prompts, outputs, plan.eval_prompts)
    finally:
        judge.close()
    write_jsonl(
        rd / "eval.jsonl",
        [
            {"row": r["_row"], "prompt": p, "output": o, "score": s, "judge": d}
            for r, p, o, s, d in zip(plan.eval_prompts, prompts, outputs, scores, details)
        ],
    )
    metrics = {"held_out_score": sum(scores) / len(scores), "held_out_n": len(scores)}
    if rounds.judge.kind == "verifier":
        metrics["held_out_answer_match"] = metrics["held_out_score"]
    return metrics
