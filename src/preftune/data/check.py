"""Check a run's data before any model is loaded: every configured source exists and reads, every
column is there, every row validates. Errors name the config key, file, line and field, and come all
at once (every missing column, the first bad rows), seconds into a run rather than after the model
loaded.

    check = check_data(cfg, unpaired=False, log=print)   # raises DataError / ConfigError
    check.skipped["train"]                                # rows left out with data.on_error=skip

With ``generation_eval: true`` the held-out rows that carry an ``answer`` are checked here too, so a
run whose answers cannot be scored fails before training, not after it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .loading import MAX_REPORTED_ROWS, bad_rows_error, load_examples
from .records import ANSWER_FIELD, Columns, DataError, LoadedData
from .sources import HUB_NAME, JSON_SUFFIXES

_DATA_SUFFIXES = (*JSON_SUFFIXES, ".parquet", ".csv", ".arrow")


@dataclass
class DataCheck:
    """What :func:`check_data` found: the loaded splits and the rows skipped in each. The splits are
    streamed (a few numbers per row, no text), so ``prepare_data`` reuses them instead of loading
    again."""

    loaded: dict[str, LoadedData] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        """Per split, rows read and skipped while loading (for run_state.json)."""
        return {
            f"{split}/rows": {
                "read": len(data.examples) + len(data.skipped),
                "skipped": len(data.skipped),
                "skipped_rows": [row for row, _, _ in data.skipped[:MAX_REPORTED_ROWS]],
            }
            for split, data in self.loaded.items()
        }


def resolve_source(source: str, key: str) -> str:
    """A configured source as a path or hub name: ``builtin:arithmetic-train`` names the bundled pairs."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in ("arithmetic-train", "arithmetic-test"):
            from .arithmetic import arithmetic_path

            return str(arithmetic_path(name.split("-")[1]))
        raise DataError(
            f"{key}: unknown builtin dataset {source!r} "
            "(have builtin:arithmetic-train, builtin:arithmetic-test)"
        )
    return source


def check_source_exists(source: str, key: str) -> None:
    """A local path that is not there is an error naming the config key (a hub name is left to load)."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return
    looks_local = path.lower().endswith(_DATA_SUFFIXES) or not HUB_NAME.match(source) or path.startswith(".")
    if looks_local:
        raise DataError(f"file not found (set by {key}); check the path", source=source)


def _describe_skipped(data: LoadedData) -> str:
    parts = []
    for row, column, reason in data.skipped[:MAX_REPORTED_ROWS]:
        parts.append(f"{data.row_kind} {row}" + (f" ('{column}': {reason})" if column else f" ({reason})"))
    more = len(data.skipped) - MAX_REPORTED_ROWS
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def check_data(cfg, *, unpaired: bool = False, log=print, training: bool = True) -> DataCheck:
    """Load and validate every split ``cfg.data`` names (``training=False``: ``data.eval`` alone, for a
    held-out evaluation), before any model is loaded.

    Raises DataError naming the config key and path of a source that is missing, every missing column
    with the ``data.columns.<field>=<column>`` override that maps it, and the first bad rows with line
    and field. With ``data.on_error=skip`` it logs how many rows each split skips and which, and
    returns the counts. With ``generation_eval`` also the answers of the held-out rows
    (:func:`answer_items`): a ConfigError if none has one.
    """
    from ..config import NO_EVAL_FOR_GENERATION, ConfigError

    data_cfg = cfg.data
    sources = configured_sources(cfg, training=training)
    answering = bool(getattr(cfg, "generation_eval", False))  # the tests' stand-in configs lack the key
    if answering and not data_cfg.eval:
        raise ConfigError(NO_EVAL_FOR_GENERATION)
    resolved = {}
    for split, (key, source, _) in sources.items():  # every path first: one missing file, one short run
        resolved[split] = resolve_source(source, key)
        check_source_exists(resolved[split], key)
    check = DataCheck()
    for split, (_key, source, hf_split) in sources.items():
        loaded = load_split(
            cfg, resolved[split], hf_split, unpaired, with_answers=answering and split == "eval"
        )
        check.loaded[split] = loaded
        check.skipped[split] = len(loaded.skipped)
        if loaded.skipped:
            log(
                f"{split}: skipped {len(loaded.skipped)} bad rows of {source} (data.on_error=skip): "
                + _describe_skipped(loaded)
            )
    if answering:  # checked now, answered after training (generation_items reads them again then)
        eval_data = check.loaded["eval"]
        items = answer_items(eval_data, cfg.generation_match, data_cfg.on_error, log)
        log(
            f"generation_eval: {len(items)} of {len(eval_data)} held-out rows carry an "
            f"'{ANSWER_FIELD}'; their prompts are answered after training "
            f"(generation_match={cfg.generation_match}, max_new_tokens={cfg.max_new_tokens})"
        )
    return check


def configured_sources(cfg, *, training: bool = True) -> dict[str, tuple[str, str, str]]:
    """The splits ``cfg.data`` names: ``{"train": ("data.train", source, split within it), "eval": ...}``
    (eval only when set). A ConfigError without ``data.train``. ``training=False`` (a held-out
    evaluation): ``data.eval`` alone, a ConfigError without it."""
    from ..config import ConfigError

    data_cfg = cfg.data
    evaluation = ("data.eval", data_cfg.eval, data_cfg.eval_split)
    if not training:
        if not data_cfg.eval:
            raise ConfigError(
                "data.eval is required to evaluate (a file, a folder, a hub name or builtin:arithmetic-test)"
            )
        return {"eval": evaluation}
    if not data_cfg.train:
        raise ConfigError("data.train is required (a file, a folder, a hub name or builtin:arithmetic-train)")
    sources = {"train": ("data.train", data_cfg.train, data_cfg.train_split)}
    if data_cfg.eval:
        sources["eval"] = evaluation
    return sources


def load_split(cfg, resolved: str, split: str, unpaired: bool, *, with_answers: bool = False) -> LoadedData:
    """:func:`~preftune.data.loading.load_examples` of one resolved source, with ``cfg.data``'s
    columns, ``on_error`` and ``max_rows``."""
    from ..config import to_dict

    return load_examples(
        resolved,
        unpaired=unpaired,
        columns=Columns(**to_dict(cfg.data.columns)),
        on_error=cfg.data.on_error,
        split=split,
        max_rows=cfg.data.max_rows,
        with_answers=with_answers,
    )


# --------------------------------------------------------------------------------------------------
# generation_eval: the held-out rows that carry an answer


def answer_problem(answer: Any, mode: str) -> str | None:
    """Why ``answer`` cannot be checked under match ``mode`` (see preftune.generation), or None.

    Found here, before training, rather than after it: a numeric match needs an integer, a regex
    match a valid regular expression, every mode some text or number.
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"expected text or a number, got {type(answer).__name__} {str(answer)[:40]!r}"
    if isinstance(answer, str) and not answer.strip():
        return "empty answer"
    if mode == "numeric":
        whole = (
            isinstance(answer, int)
            or (isinstance(answer, float) and answer.is_integer())
            or (isinstance(answer, str) and re.fullmatch(r"\s*[-+]?\d+\s*", answer) is not None)
        )
        if not whole:
            return f"generation_match=numeric needs an integer answer, got {answer!r}"
    if mode == "regex":
        try:
            re.compile(str(answer))
        except re.error as e:
            return f"generation_match=regex: not a valid regular expression ({e})"
    return None


def answer_items(loaded: LoadedData, mode: str, on_error: str = "raise", log=print) -> list[dict[str, Any]]:
    """The held-out examples whose row carries an answer, as ``{"prompt", "answer", "row"}`` items
    (the prompt as training saw it: text or chat messages), in file order.

    Raises ConfigError when no row has an answer, and DataError naming the file, row and field for an
    answer ``mode`` cannot check (with ``on_error="skip"`` such rows are left out and counted).
    """
    from ..config import ConfigError

    if not loaded.answers:
        raise ConfigError(
            f"generation_eval: no row of data.eval ({loaded.source}) has an '{ANSWER_FIELD}' field, so "
            "there is nothing to answer after training; add answers to the rows whose prompts should "
            "be answered, or set generation_eval: false"
        )
    items, problems = [], []
    for example in loaded.examples:
        if example.row not in loaded.answers:
            continue
        answer = loaded.answers[example.row]
        problem = answer_problem(answer, mode)
        if problem is not None:
            problems.append((example.row, ANSWER_FIELD, problem))
            continue
        items.append({"prompt": example.prompt, "answer": answer, "row": example.row})
    if problems and (on_error == "raise" or not items):
        raise bad_rows_error(problems, len(problems), loaded.source, loaded.row_kind)
    if problems:
        log(
            f"generation_eval: left out {len(problems)} rows of {loaded.source} whose answer cannot be "
            f"checked (data.on_error=skip), first {loaded.where(problems[0][0])}: {problems[0][2]}"
        )
    return items


def generation_items(cfg, *, unpaired: bool = False, log=print) -> list[dict[str, Any]]:
    """generation_eval's prompts and answers read from ``cfg.data.eval`` (as :func:`check_data` found
    them before training): for the step after training, when the trainer and its data are gone."""
    from ..config import NO_EVAL_FOR_GENERATION, ConfigError

    if not cfg.data.eval:
        raise ConfigError(NO_EVAL_FOR_GENERATION)
    resolved = resolve_source(cfg.data.eval, "data.eval")
    check_source_exists(resolved, "data.eval")
    loaded = load_split(cfg, resolved, cfg.data.eval_split, unpaired, with_answers=True)
    return answer_items(loaded, cfg.generation_match, cfg.data.on_error, log)
