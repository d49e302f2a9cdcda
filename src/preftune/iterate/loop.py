"""The rounds: sample -> judge -> pairs -> train (``preftune.train`` on ``round-N/pairs.jsonl``) ->
evaluate, each stage a function whose output is a file under ``output_dir/round-N/``:

=======================  ===========================================================================
``samples.part-R.jsonl``  sampled batches as they land (the resume point of sampling)
``samples.jsonl``         every sample with its score and the judge's details (sampling finished)
``pairs.jsonl``           the round's training data in preftune's format (+ ``pairs.json``: counts)
``train/``                the round's ``preftune train`` run (metrics, checkpoints, ``final/``)
``trained.json``          the round's trained model and its last metrics (training finished)
``eval.jsonl``            greedy answers to ``rounds.eval_prompts`` with their scores
``round.json``            the round's row of ``rounds.jsonl`` (the round is finished)
=======================  ===========================================================================

A rerun with ``resume=true`` skips every stage whose file exists: a finished round is never redone,
sampling draws only the batches missing, training resumes from its newest checkpoint. ``round-0/``
holds the held-out answers of the starting model. ``final/`` is the last round's model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    resolved_method,
    save_config,
    to_dict,
)
from .judges import check_judge, make_judge
from .pairs import build_pairs
from .prompts import read_prompt_rows, round_slice
from .sampling import merged_samples, sample_round

ROUNDS_FILE = "rounds.jsonl"
CONFIG_FILE = "iterate.yaml"


def _say(msg: str) -> None:
    from ..metrics import log

    if os.environ.get("RANK", "0") == "0":
        log(msg)


# --------------------------------------------------------------------------------------------------
# Config and checks (before any model loads)


def _raw_config(source) -> dict:
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, TrainConfig):
        return to_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def load_iterate_config(source, overrides: list[str] | None = None) -> TrainConfig:
    """The ``preftune train`` config plus ``rounds:``, validated as round 1 will train it."""
    data = apply_overrides(_raw_config(source), overrides or [])
    rounds = data.get("rounds") or {}
    if not isinstance(rounds, dict):
        raise ConfigError(f"rounds: expected a mapping, got {rounds!r}")
    mode = rounds.get("reference", "initial")
    if data.get("references"):
        raise ConfigError(
            "references: preftune iterate sets each round's references from rounds.reference "
            "(initial, previous or both); remove `references`"
        )
    if mode == "both":
        from ..losses.registry import MethodError, resolve_method

        try:
            spec = resolve_method(str(data.get("method", "dpo")), lenient=True)
        except MethodError as e:
            raise ConfigError(f"method: {e}") from None
        if not spec.multi_reference:
            raise ConfigError(
                f"rounds.reference: both gives each round two references [initial, previous] and needs a "
                f"method that takes several (mrpo, mdpo, or a composition such as mrpo+rpo); {spec.method!r} "
                "takes one"
            )
        # round 1's previous model is the initial one: it trains with that one reference (below)
        data["references"] = [data.get("model") or "policy"]
        data.setdefault("mrpo", {})["allow_single_reference"] = True
    cfg = load_config(data)
    check_settings(cfg)
    return cfg


def check_settings(cfg: TrainConfig) -> None:
    """What the rounds need beyond the ranges and choices (no files read)."""
    rounds = cfg.rounds
    if not cfg.model:
        raise ConfigError(
            "`model` is required: a local HF directory or a preset name (e.g. smollm2-135m-instruct)"
        )
    if not rounds.prompts:
        raise ConfigError(
            "rounds.prompts is required: a data file with a `prompt` per row (and an `answer` for a "
            "verifier), e.g. builtin:arithmetic-train"
        )
    spec = resolved_method(cfg)
    if rounds.pairs == "unpaired" and not spec.unpaired:
        raise ConfigError(
            f"rounds.pairs: unpaired makes labelled single samples; method {spec.method!r} trains on pairs "
            "(use best_worst or all, or an unpaired method such as kto or rpo_unpaired)"
        )
    if rounds.pairs != "unpaired" and spec.unpaired:
        raise ConfigError(
            f"rounds.pairs: method {spec.method!r} trains on unpaired samples; set rounds.pairs: unpaired"
        )
    if spec.reference_free and rounds.reference != "initial":
        raise ConfigError(f"rounds.reference: method {spec.method!r} uses no reference model")
    if rounds.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "rounds.engine: vllm is not installed: pip install vllm (a GPU engine), or use "
                "rounds.engine: transformers"
            )
        raise ConfigError(
            "rounds.engine: vllm is not supported by this version yet; use rounds.engine: transformers"
        )


@dataclass
class Plan:
    """The prompts (rows as read) and held-out prompts of a run, checked."""

    prompts: list[dict]
    eval_prompts: list[dict] = field(default_factory=list)


def check_rounds(cfg: TrainConfig) -> Plan:
    """Read and check the prompts and the judge settings: every error here comes before any model loads."""
    from ..models.loading import resolve_causal_lm

    rounds = cfg.rounds
    check_settings(cfg)
    resolve_causal_lm(cfg.model, "model")  # a misspelt path: one line, before output_dir exists
    column = cfg.data.columns.prompt
    rows = read_prompt_rows(rounds.prompts, rounds.prompts_split, "rounds.prompts", prompt_column=column)
    check_judge(rounds.judge, rows, rounds.prompts, "rounds.prompts")
    eval_rows: list[dict] = []
    if rounds.eval_prompts:
        eval_rows = read_prompt_rows(
            rounds.eval_prompts, rounds.eval_split, "rounds.eval_prompts", prompt_column=column
        )[: rounds.eval_max_rows]
        check_judge(rounds.judge, eval_rows, rounds.eval_prompts, "rounds.eval_prompts")
    return Plan(rows, eval_rows)


def stop_pattern(rounds):
    """The ``stop_when`` of sampling and held-out answers (``rounds.stop``)."""
    from ..generation import ANSWER_STATED

    numeric = rounds.judge.kind == "verifier" and rounds.judge.match == "numeric"
    return ANSWER_STATED if rounds.stop == "answer" or (rounds.stop == "auto" and numeric) else None


# --------------------------------------------------------------------------------------------------
# One round's training config


def round_dir(output_dir: str | Path, round_index: int) -> Path:
    return Path(output_dir) / f"round-{round_index}"


def model_of(cfg: TrainConfig, round_index: int) -> str:
    """The model after round ``round_index`` (0: the starting model)."""
    if round_index == 0:
        return str(cfg.model)
    return json.loads((round_dir(cfg.output_dir, round_index) / "trained.json").read_text())["model"]


def round_references(cfg: TrainConfig, round_index: int) -> list[dict]:
    """References of round ``round_index``. ``policy`` is the round's starting model (the previous
    round's weights; with LoRA the base with adapters disabled, which is that model merged)."""
    initial = {"model": str(cfg.model), "chat_template": cfg.data.chat_template, "dtype": None}
    previous = {"model": "policy", "chat_template": None, "dtype": None}
    mode = cfg.rounds.reference
    if cfg.reference_free or mode == "previous" or (mode == "initial" and round_index == 1):
        return []  # the default reference: the round's starting model
    if mode == "initial" or round_index == 1:
        # `both` in round 1: the previous model is the initial one, and two identical references are
        # exactly DPO against it (the virtual reference of equal log-probs is that log-prob), as one is
        return [initial]
    return [initial, previous]


def round_train_config(cfg: TrainConfig, round_index: int) -> dict:
    """The ``preftune train`` config of round ``round_index`` (a dict, validated by ``preftune.train``)."""
    d = to_dict(cfg)
    rd = round_dir(cfg.output_dir, round_index)
    train_dir = rd / "train"
    d["model"] = model_of(cfg, round_index - 1)
    d["data"]["train"] = str(rd / "pairs.jsonl")
    d["data"]["train_split"] = "train"
    d["references"] = round_references(cfg, round_index)
    if len(d["references"]) == 1 and cfg.rounds.reference == "both":
        d["mrpo"]["allow_single_reference"] = True  # round 1 of `both` (round_references)
    d["output_dir"] = str(train_dir)
    d["seed"] = cfg.seed + round_index - 1
    has_checkpoints = train_dir.is_dir() and any(train_dir.glob("checkpoint-*"))
    d["resume"] = has_checkpoints
    d["overwrite_output_dir"] = not has_checkpoints  # the round's own folder: nothing else lives there
    d["generation_eval"] = False  # held-out answers are the loop's (rounds.eval_prompts)
    if cfg.lora.enabled:
        d["save_merged"] = True  # the next round starts from this round's merged weights
    return d


# --------------------------------------------------------------------------------------------------
# Stages


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(cfg: TrainConfig, name: str):
    import torch

    from ..models.loading import config_dtype, load_causal_lm, resolve_causal_lm

    path = resolve_causal_lm(name, "model")
    dtype = config_dtype(cfg.model_dtype) or torch.float32
    return load_causal_lm(str(path), dtype=dtype, device=_device())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sample_stage(cfg: TrainConfig, plan: Plan, round_index: int, rank: int = 0, world: int = 1) -> bool:
    """Draw this rank's missing batches of the round (all ranks); True if all are now drawn."""
    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    rd.mkdir(parents=True, exist_ok=True)
    indices = round_slice(plan.prompts, round_index, rounds.prompts_per_round)
    prompts = [plan.prompts[i][cfg.data.columns.prompt] for i in indices]
    from .. import distributed as D
    from .sampling import done_batches

    done = done_batches(rd)  # every rank deals the missing batches from the same list:
    D.barrier(f"iterate: round {round_index} sampling start", cfg.dist_timeout_s)  # read before writing
    batches = range((len(prompts) + rounds.batch_size - 1) // rounds.batch_size)
    if [b for b in batches if b not in done][rank::world]:  # this rank has batches to draw
        name = model_of(cfg, round_index - 1)
        _say(
            f"round {round_index}: sampling {len(prompts)} prompts x {rounds.samples_per_prompt} from {name}"
        )
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
            )
        finally:
            del model
    return merged_samples(rd, len(prompts), rounds.batch_size) is not None


def judge_stage(cfg: TrainConfig, plan: Plan, round_index: int) -> list[dict]:
    """Score every sample of the round; writes and returns ``samples.jsonl``'s rows (main process)."""
    rounds = cfg.rounds
    rd = round_dir(cfg.output_dir, round_index)
    indices = round_slice(plan.prompts, round_index, rounds.prompts_per_round)
    texts = merged_samples(rd, len(indices), rounds.batch_size)
    if texts is None:
        raise RuntimeError(f"round {round_index}: sampling is not finished in {rd}")
    column = cfg.data.columns.prompt
    flat = [(i, j, t) for i, group in zip(indices, texts) for j, t in enumerate(group)]
    judge = make_judge(rounds.judge, device=_device())
    try:
        scores, details = judge.score(
            [plan.prompts[i][column] for i, _, _ in flat],
            [t for _, _, t in flat],
            [plan.prompts[i] for i, _, _ in flat],
        )
    finally:
        judge.close()
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
    _write_jsonl(rd / "samples.jsonl", records)
    return records


def grouped(records: list[dict]) -> list[list[dict]]:
    """Sample records grouped per prompt, in order."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["prompt_index"], []).append(r)
    return list(groups.values())


def sample_stats(records: list[dict], verifier: bool) -> dict[str, float]:
    groups = grouped(records)
    scores = [r["score"] for r in records]
    out = {
        "prompts": len(groups),
        "samples": len(records),
        "score_mean": sum(scores) / len(scores),
        "score_max": max(scores),
        "best_score_mean": sum(max(r["score"] for r in g) for g in groups) / len(groups),
    }
    if verifier:
        k = max(len(g) for g in groups)
        out["pass_at_1"] = out["score_mean"]
        out[f"pass_at_{k}"] = sum(any(r["score"] >= 1 for r in g) for g in groups) / len(groups)
    return out


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
    _write_json(rd / "pairs.json", stats)
    _write_jsonl(rd / "pairs.jsonl", rows)
    return stats


def _last_metrics(metrics: Path) -> dict[str, float]:
    """The last eval_* values and the last training loss of a run's metrics.jsonl."""
    out: dict[str, float] = {}
    if not metrics.is_file():
        return out
    for row in read_jsonl(metrics):
        out.update({k: v for k, v in row.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        if "loss" in row:
            out["train_loss"] = row["loss"]
    return out


def train_stage(cfg: TrainConfig, round_index: int, pair_count: int) -> dict:
    """Train the round on its pairs with ``preftune.train`` (every rank); writes ``trained.json``."""
    from .. import distributed as D
    from .. import train

    rd = round_dir(cfg.output_dir, round_index)
    global_batch = cfg.batch_size * cfg.grad_accum * D.world_size()
    if pair_count < global_batch:  # preftune train refuses data smaller than one global batch
        why = f"{pair_count} usable training rows, fewer than one global batch ({global_batch})"
        _say(f"round {round_index}: {why}; the model is carried to the next round unchanged")
        info = {"model": model_of(cfg, round_index - 1), "steps": 0, "skipped": why}
    else:
        _say(f"round {round_index}: training on {pair_count} rows of {rd / 'pairs.jsonl'}")
        result = train(round_train_config(cfg, round_index))
        info = {
            "model": str(result.final_model_dir),
            "steps": result.steps,
            "metrics": _last_metrics(Path(result.metrics_path)),
        }
    if os.environ.get("RANK", "0") == "0":
        _write_json(rd / "trained.json", info)
    return info


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
    _write_jsonl(
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


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class IterateResult:
    output_dir: Path
    final_model_dir: Path | None
    rounds: list[dict]
    already_finished: bool = False


def rounds_rows(output_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(output_dir).glob("round-*/round.json"), key=lambda p: int(p.parent.name[6:])):
        rows.append(json.loads(path.read_text()))
    return rows


def _write_rounds(output_dir: Path) -> list[dict]:
    rows = rounds_rows(output_dir)
    _write_jsonl(Path(output_dir) / ROUNDS_FILE, rows)
    return rows


TABLE_KEYS = (
    ("score_mean", "score"),
    ("best_score_mean", "best of k"),
    ("usable_fraction", "usable"),
    ("pairs", "pairs"),
    ("skipped_tied", "tied"),
    ("margin_mean", "margin"),
    ("train_steps", "steps"),
    ("held_out_score", "held-out"),
)


def rounds_table(rows: list[dict]) -> str:
    """The console table of the rounds so far: one line per round."""
    keys = [(k, label) for k, label in TABLE_KEYS if any(k in r for r in rows)]
    header = ["round", *[label for _, label in keys]]
    body = []
    for r in rows:
        cells = [str(r["round"])]
        for k, _ in keys:
            v = r.get(k)
            cells.append("—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *body])


def _prepare_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    earlier = sorted(out.glob("round-*")) + [p for p in (out / ROUNDS_FILE, out / "final") if p.exists()]
    if earlier and not cfg.resume:
        if not cfg.overwrite_output_dir:
            names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise ConfigError(
                f"output_dir: {out} holds an earlier iterate run ({names}); pass resume=true to continue it "
                "or overwrite_output_dir=true to start over"
            )
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)


def _copy_final(source: Path, target: Path) -> None:
    """``target`` = a copy of ``source`` (hard links where the file system allows)."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def iterate(config, overrides: list[str] | None = None) -> IterateResult:
    """Run (or continue, with ``resume=true``) the rounds of ``config``; see the module docstring."""
    from .. import distributed as D
    from .. import runlock

    cfg = config if isinstance(config, TrainConfig) else load_iterate_config(config, overrides)
    plan = check_rounds(cfg)  # every config / data / judge error before any model loads
    if cfg.data.train:
        _say(f"data.train ({cfg.data.train}) is not used: each round trains on its own round-N/pairs.jsonl")
    D.init_process_group(cfg.dist_timeout_s)
    out = Path(cfg.output_dir)
    count = cfg.rounds.count
    if (
        cfg.resume
        and (out / "final").is_dir()
        and all((round_dir(out, r) / "round.json").is_file() for r in range(1, count + 1))
    ):
        _say(f"already finished: {count} round(s) in {out}, final model {out / 'final'}; nothing to do")
        return IterateResult(out, out / "final", rounds_rows(out), already_finished=True)
    stage = ["setup"]
    main = D.rank() == 0
    try:
        # several processes: a failing rank exits at once naming its rank and stage, as in training
        with D.exit_on_error(lambda: f"iterate {stage[0]}"):
            if main:
                out.mkdir(parents=True, exist_ok=True)
                try:
                    runlock.acquire(out, warn=_say)  # one `preftune iterate` per output_dir
                except runlock.RunDirLockedError as e:
                    raise ConfigError(f"output_dir: {e}") from None
                _prepare_output_dir(cfg)
            return _rounds(cfg, plan, stage)
    finally:
        if main:
            runlock.release(out)


def _rounds(cfg: TrainConfig, plan: Plan, stage: list[str]) -> IterateResult:
    from .. import distributed as D

    rank, world = D.rank(), D.world_size()
    main = rank == 0
    out = Path(cfg.output_dir)
    count = cfg.rounds.count
    D.barrier("iterate: start", cfg.dist_timeout_s)
    verifier = cfg.rounds.judge.kind == "verifier"
    if main and plan.eval_prompts and not (round_dir(out, 0) / "round.json").is_file():
        _say(f"round 0: answering {len(plan.eval_prompts)} held-out prompts with {cfg.model}")
        row = {"round": 0, "model": str(cfg.model), **evaluate_stage(cfg, plan, 0)}
        _write_json(round_dir(out, 0) / "round.json", row)
        _write_rounds(out)
    for r in range(1, count + 1):
        rd = round_dir(out, r)
        if (rd / "round.json").is_file():
            continue
        started = time.time()
        stage[0] = f"round {r}"
        if not (rd / "samples.jsonl").is_file():
            sample_stage(cfg, plan, r, rank, world)
            D.barrier(f"iterate: round {r} sampling", cfg.dist_timeout_s)
            if main:
                judge_stage(cfg, plan, r)
            D.barrier(f"iterate: round {r} judging", cfg.dist_timeout_s)
        records = read_jsonl(rd / "samples.jsonl")
        if main and not (rd / "pairs.jsonl").is_file():
            pairs_stage(cfg, r, records)
        D.barrier(f"iterate: round {r} pairs", cfg.dist_timeout_s)
        stats = json.loads((rd / "pairs.json").read_text())
        if (rd / "trained.json").is_file():
            trained = json.loads((rd / "trained.json").read_text())
        else:
            trained = train_stage(cfg, r, stats["pairs"])
        D.barrier(f"iterate: round {r} training", cfg.dist_timeout_s)
        if main:
            row = {
                "round": r,
                "model": trained["model"],
                **sample_stats(records, verifier),
                **stats,
                "train_steps": trained["steps"],
                **trained.get("metrics", {}),
                **evaluate_stage(cfg, plan, r),
                "seconds": round(time.time() - started, 1),
            }
            _write_json(rd / "round.json", row)
            rows = _write_rounds(out)
            _say(f"round {r} of {count} done:\n{rounds_table(rows)}")
        D.barrier(f"iterate: round {r} evaluation", cfg.dist_timeout_s)
    final = Path(model_of(cfg, count))
    if main:
        if final.is_dir() and final.resolve() != Path(cfg.model).resolve():
            _copy_final(final, out / "final")
            final = out / "final"
        _write_rounds(out)
        _say(f"{count} round(s) done in {out}: rounds.jsonl, final model {final}")
    D.barrier("iterate: end", cfg.dist_timeout_s)
    return IterateResult(out, out / "final" if (out / "final").is_dir() else None, rounds_rows(out))
