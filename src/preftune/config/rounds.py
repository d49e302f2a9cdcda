"""The ``rounds:`` section of the config: what ``preftune iterate`` does each round.

A section of :class:`~.keys.TrainConfig` like ``mrpo:`` or ``lora:`` (same metadata, so
``preftune config`` documents every key); ``preftune train`` ignores it. The checks
that need files or the method (judge settings, prompts, references) are in
:func:`preftune.iterate.checks.check_rounds`, run before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import AT_LEAST_ONE, MATCH_MODES, NON_NEGATIVE, Range, _f

JUDGE_KINDS = ("verifier", "reward_model", "python")
PAIR_MODES = ("best_worst", "all", "unpaired")
REFERENCE_MODES = ("initial", "previous", "both")


@dataclass
class JudgeConfig:
    kind: str = _f(
        "verifier",
        "`verifier` (each prompt's `answer` checked with `match`; score 1 or 0), `reward_model` (a local "
        "AutoModelForSequenceClassification at `model`; its scalar output is the score) or `python` "
        "(`function`, your own `(prompt, completion, row) -> float`).",
        choices=JUDGE_KINDS,
    )
    match: str = _f(
        "numeric",
        "verifier: how an answer is checked, as `generation_match`: `numeric` (the integer of the last "
        '"The answer is N"), `exact`, `contains` or `regex`.',
        choices=MATCH_MODES,
    )
    model: str | None = _f(
        None,
        "reward_model: a local directory with the classifier, its tokenizer and (if it has one) its chat "
        "template; the conversation prompt + completion is rendered with that template.",
    )
    function: str | None = _f(
        None,
        "python: `module:callable` (importable module, or a path to a .py file, then `:` and the name), "
        "called as callable(prompt, completion, row) -> float for every sample; row is the prompt's row.",
    )
    batch_size: int = _f(16, "reward_model: completions scored per forward pass.", range=AT_LEAST_ONE)
    max_length: int = _f(
        1024, "reward_model: longest prompt + completion scored, in its tokens.", range=Range(ge=2)
    )


@dataclass
class RoundsConfig:
    count: int = _f(1, "preftune iterate: number of rounds R.", range=AT_LEAST_ONE)
    prompts: str | None = _f(
        None,
        "preftune iterate: the prompts to sample from, a data file in any format `data.train` takes "
        "(e.g. builtin:arithmetic-train): rows with `prompt` (text or chat messages) and, for a verifier, "
        "`answer`.",
    )
    prompts_split: str = _f("train", "Split of `rounds.prompts` when it is a DatasetDict folder or hub name.")
    prompts_per_round: int | None = _f(
        None,
        "Prompts per round: round N takes the next slice of this many (wrapping around at the end); "
        "null = every prompt every round.",
        range=AT_LEAST_ONE,
    )
    samples_per_prompt: int = _f(4, "k: samples drawn per prompt.", range=Range(ge=2))
    temperature: float = _f(
        1.0, "Sampling temperature (0 = greedy: k copies of one text).", range=NON_NEGATIVE
    )
    top_p: float = _f(
        1.0, "Nucleus sampling: keep the top tokens whose probability reaches top_p.", range=Range(gt=0, le=1)
    )
    max_new_tokens: int = _f(96, "Longest sample (and held-out answer), in tokens.", range=AT_LEAST_ONE)
    stop: str = _f(
        "auto",
        'When a sample ends: `eos`, `answer` (also once it has written "The answer is N.") or `auto` '
        "(`answer` for a numeric verifier, else `eos`).",
        choices=("auto", "eos", "answer"),
    )
    seed: int = _f(
        0,
        "Seed of the sampling: batch b of round N draws from a generator seeded by (seed, N, b), so the "
        "samples do not depend on the number of processes or on a resume.",
    )
    batch_size: int = _f(
        8,
        "Prompts sampled at once (each with its k rows; one batch = batch_size * k rows).",
        range=AT_LEAST_ONE,
    )
    judge: JudgeConfig = _f(help="How samples are scored.", factory=JudgeConfig)
    pairs: str = _f(
        "best_worst",
        "`best_worst` (each prompt's highest- against its lowest-scored sample; prompts whose samples all "
        "tie are skipped and counted), `all` (every higher/lower pair, largest margins first, at most "
        "max_pairs_per_prompt) or `unpaired` (every sample, desirable when its score >= threshold; for "
        "kto, rpo_unpaired and the other unpaired methods).",
        choices=PAIR_MODES,
    )
    max_pairs_per_prompt: int = _f(4, "pairs: all: most pairs kept per prompt.", range=AT_LEAST_ONE)
    threshold: float = _f(0.5, "pairs: unpaired: a sample is desirable when its score is at least this.")
    reference: str = _f(
        "initial",
        "References of each round: `initial` (the starting model), `previous` (the previous round's policy) "
        "or `both` ([initial, previous]; needs a method with several references, e.g. mrpo or mdpo). "
        "`references` must then be left unset.",
        choices=REFERENCE_MODES,
    )
    eval_prompts: str | None = _f(
        None,
        "Held-out prompts answered greedily before round 1 and after every round, scored by the judge "
        "(answer match for a verifier, mean score otherwise); rows as in `rounds.prompts`.",
    )
    eval_max_rows: int | None = _f(
        None, "Answer only the first N rows of `rounds.eval_prompts` (null = all).", range=AT_LEAST_ONE
    )
    eval_split: str = _f(
        "test", "Split of `rounds.eval_prompts` when it is a DatasetDict folder or hub name."
    )
    engine: str = _f(
        "transformers",
        "Sampling engine: `transformers` (batched, KV cache) or `vllm` (extra; GPU).",
        choices=("transformers", "vllm"),
    )


__all__ = ["JUDGE_KINDS", "PAIR_MODES", "REFERENCE_MODES", "JudgeConfig", "RoundsConfig"]
