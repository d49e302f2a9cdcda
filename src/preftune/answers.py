"""Greedy answers of a saved model: loading it on one process, the answer metrics, and the initial
model's answers to a prompts file, generated once and cached.

``preftune eval --prompts`` reports its answers before and after training: the trained model's are
generated every call; the initial model's (the run's ``model``) come from the cache kind
``answers``, keyed by the model's weights, the prompts, the chat template and the generation
settings (max_new_tokens, batch size, dtype). The cache holds the outputs, so another ``--match``
rescores them without generating again. ``generation_eval`` loads its final model with
:func:`load_trained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ANSWERS_KIND = "answers"  # the cache folder (preftune.cache.CACHE_KINDS)


def answer_metrics(details: list[dict], mode: str) -> dict[str, float]:
    """eval_answer_match and eval_prompts_n of scored answers; eval_answer_phrase (answers that
    state "The answer is N" at all) only under ``numeric`` matching, the mode of answer data that asks
    for that phrase: on other data it measures nothing."""
    n = len(details)
    metrics = {"eval_answer_match": sum(d["correct"] for d in details) / max(1, n)}
    if mode == "numeric":
        metrics["eval_answer_phrase"] = sum(d["reached_answer_phrase"] for d in details) / max(1, n)
    metrics["eval_prompts_n"] = n
    return metrics


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_trained(cfg, model_dir: Path):
    """(model, tokenizer) of a run's saved model, with plain transformers / peft on this process
    alone: no Trainer, so no accelerate state and no collective that would wait for the other ranks
    of a torchrun job (they have returned from training by now)."""
    import torch

    from .models.loading import config_dtype, load_causal_lm, resolve_causal_lm
    from .progress import library_bars

    dtype = config_dtype(cfg.model_dtype) or torch.float32
    with library_bars(cfg.progress):
        if not (Path(model_dir) / "adapter_config.json").is_file():  # a full or merged model
            return load_causal_lm(str(model_dir), dtype=dtype, device=_device())
        from peft import PeftModel

        base, tokenizer = load_causal_lm(
            str(resolve_causal_lm(cfg.model, "model")), dtype=dtype, device=_device()
        )
        return PeftModel.from_pretrained(base, str(model_dir)), tokenizer


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def initial_answers(
    cfg,
    items: list[dict],
    *,
    mode: str,
    max_new_tokens: int,
    batch_size: int,
    chat_template: str | None,
    cache_root: Path,
    progress: bool = False,
    log=None,
) -> tuple[dict[str, float], list[dict], bool]:
    """The initial model's (``cfg.model``'s) greedy answers to ``items``, scored under ``mode``:
    (metrics, details, whether they came from the cache)."""
    from .cache import _write_atomically, hash_texts, make_key, model_fingerprint
    from .generation import answer_details, generate
    from .models.loading import resolve_causal_lm

    base = resolve_causal_lm(cfg.model, "model")
    key = make_key(
        kind=ANSWERS_KIND,
        model=model_fingerprint(base),
        prompts=hash_texts(_prompt_text(it["prompt"]) for it in items),
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype=cfg.model_dtype,
    )
    path = Path(cache_root) / ANSWERS_KIND / f"{key}.json"
    outputs = None
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored.get("outputs"), list) and len(stored["outputs"]) == len(items):
            outputs = [str(o) for o in stored["outputs"]]
    except (OSError, ValueError, AttributeError):
        pass
    cached = outputs is not None
    if not cached:
        if log:
            log(f"answering {len(items)} prompts with the initial model {base} (cached for next time)")
        model, tokenizer = load_trained(cfg, base)
        outputs = generate(
            model,
            tokenizer,
            [it["prompt"] for it in items],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            chat_template=chat_template,
            progress=progress,
        )
        del model
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": str(base), "max_new_tokens": max_new_tokens, "outputs": outputs}
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, ensure_ascii=False)))
    elif log:
        log(f"the initial model's answers to these {len(items)} prompts: reused from {path}")
    details = answer_details(items, outputs, mode)
    return answer_metrics(details, mode), details, cached


def initial_generations(result: Path) -> Path:
    """Where the initial model's answers go next to ``eval-KEY-TIME.json``."""
    return result.with_name(result.name[: -len(".json")] + ".initial.generations.jsonl")
