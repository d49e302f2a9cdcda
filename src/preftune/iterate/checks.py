"""``preftune iterate``'s config and every check before any model loads: the ``preftune train``
config plus ``rounds:`` (:func:`load_iterate_config`), what the rounds need of it
(:func:`check_settings`) and the prompts and judge settings read and checked (:func:`check_rounds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, TrainConfig, apply_overrides, load_config, resolved_method, to_dict
from .judges import check_judge
from .prompts import read_prompt_rows


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
