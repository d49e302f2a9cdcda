"""Judges: one small interface, ``score(prompts, completions, rows) -> (scores, details)``.

* :class:`Verifier` checks each completion against its row's ``answer`` with the answer matchers of
  :mod:`preftune.generation` (``numeric``, ``exact``, ``contains``, ``regex``): score 1 or 0.
* :class:`RewardModel` scores prompt + completion with a local ``AutoModelForSequenceClassification``
  (its own tokenizer and chat template), in batches; its scalar output is the score.
* :class:`PythonJudge` calls the user's ``module:callable`` as ``f(prompt, completion, row) -> float``.

:func:`check_judge` checks the settings (and the rows a verifier needs) before any model loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError


def check_judge(
    judge, rows: list[dict] | None = None, source: str | None = None, key: str = "rounds.prompts"
):
    """Raise a one-line :class:`ConfigError` for settings that cannot work; no model is loaded."""
    if judge.kind == "verifier":
        for row in rows or ():
            if row.get("answer") is None:
                raise ConfigError(
                    f"{key}: {source} row {row['_row']} has no 'answer': rounds.judge.kind verifier checks "
                    "each sample against its prompt's answer (add one, or use reward_model or python)"
                )
    elif judge.kind == "reward_model":
        if not judge.model:
            raise ConfigError("rounds.judge.model: a reward_model judge needs the path of a local model")
        path = Path(judge.model).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError(
                f"rounds.judge.model: {judge.model} {what} (a local AutoModelForSequenceClassification directory)"
            )
        config = json.loads((path / "config.json").read_text())
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
        if labels != 1:
            raise ConfigError(
                f"rounds.judge.model: {judge.model} has {labels} labels; a reward model has one scalar output"
            )
    elif judge.kind == "python":
        python_function(judge.function)
    else:  # the config's choices catch this first; kept for configs built without validation
        raise ConfigError(f"rounds.judge.kind: {judge.kind!r} is not one of verifier, reward_model, python")


def python_function(spec: str | None):
    """The callable named by ``module:callable`` (a module on the path, or a .py file)."""
    if not spec or ":" not in spec:
        raise ConfigError(
            f"rounds.judge.function: expected `module:callable` (e.g. my_judges:score), got {spec!r}"
        )
    module_name, _, name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"rounds.judge.function: {module_name} does not exist")
            loaded = importlib.util.spec_from_file_location(f"preftune_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)  # type: ignore[arg-type]
            sys.modules[loaded.name] = module  # type: ignore[union-attr]
            loaded.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"rounds.judge.function: cannot import {module_name}: {type(e).__name__}: {' '.join(str(e).split())}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rounds.judge.function: {module_name} has no callable {name!r}")
    return fn


class Verifier:
    def __init__(self, match: str):
        self.match = match

    def score(
        self, prompts: list, completions: list[str], rows: list[dict]
    ) -> tuple[list[float], list[dict]]:
        from ..generation import answer_matches, extract_prediction

        scores, details = [], []
        for text, row in zip(completions, rows):
            ok = answer_matches(text, row["answer"], self.match)
            scores.append(1.0 if ok else 0.0)
            predicted = extract_prediction(text, self.match)
            details.append({"correct": ok, "predicted": predicted if self.match != "exact" else None})
        return scores, details

    def close(self) -> None:
        pass


class PythonJudge:
    def __init__(self, spec: str):
        self.spec, self.fn = spec, python_function(spec)

    def score(
        self, prompts: list, completions: list[str], rows: list[dict]
    ) -> tuple[list[float], list[dict]]:
        scores = []
        for prompt, text, row in zip(prompts, completions, rows):
            value = self.fn(prompt, text, {k: v for k, v in row.items() if k != "_row"})
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"rounds.judge.function: {self.spec} returned {value!r}; it must return a number"
                ) from None
            if not math.isfinite(value):
                raise ConfigError(f"rounds.judge.function: {self.spec} returned {value!r}; it must be finite")
            scores.append(value)
        return scores, [{} for _ in scores]

    def close(self) -> None:
        pass


class RewardModel:
    """A sequence classifier scoring the conversation (prompt, completion) in batches."""

    def __init__(self, path: str, *, batch_size: int = 16, max_length: int = 1024, device=None, dtype=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or torch.float32)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or torch.device("cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def text(self, prompt: Any, completion: str) -> str:
        tok = self.tokenizer
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": completion}], tokenize=False
            )
        plain = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        return plain + completion

    @torch.no_grad()
    def score(
        self, prompts: list, completions: list[str], rows: list[dict]
    ) -> tuple[list[float], list[dict]]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[s : s + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
            ).to(self.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores, [{} for _ in scores]

    def close(self) -> None:
        del self.model


def make_judge(judge, device=None):
    """The judge of ``rounds.judge`` (call :func:`check_judge` first); ``close()`` frees its model."""
    if judge.kind == "verifier":
        return Verifier(judge.match)
    if judge.kind == "reward_model":
        return RewardModel(
            judge.model, batch_size=judge.batch_size, max_length=judge.max_length, device=device
        )
    if judge.kind == "python":
        return PythonJudge(judge.function)
    raise ConfigError(f"rounds.judge.kind: {judge.kind!r} is not one of verifier, reward_model, python")
