"""The model card (README.md) of a run's saved model: ``final/`` and ``final-adapter/``.

What a user needs to reuse the model, in the form the Hugging Face Hub reads (as TRL writes one): a
YAML front matter (``base_model`` when it is a Hub id, ``library_name`` -- ``transformers`` for a full
or merged model, ``peft`` for an adapter --, ``tags``, ``license`` when known, ``datasets`` for Hub
datasets), then the base model, the method with its paper and key settings, the data files with
their sha256 digests and row counts, the steps, the held-out metrics before and after training with
the yardstick each is measured against, how to load the model, and the versions that trained it.

Everything comes from the run directory (config.yaml, run_state.json, metrics.jsonl) and the config,
so the card says what the run did, not what was asked of it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import TrainConfig, resolved_method
from .rundir import RunDir
from .yardsticks import yardstick, yardsticks

CARD = "README.md"

# The presets' originals on the Hub: (repo id, license tag).
PRESET_ORIGINS = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Settings shown for every run, besides the method's own options (from the method registry).
COMMON_SETTINGS = (
    "beta",
    "label_smoothing",
    "sft_weight",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "batch_size",
    "grad_accum",
    "max_length",
    "max_grad_norm",
    "precision",
    "seed",
    "reference_mode",
)


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(os.path.expanduser(name))


def base_model_origin(model: str | None) -> tuple[str | None, str | None]:
    """(Hub id, license) of the policy's base model when they can be told: a preset's original, a Hub
    id, or a local directory whose own README.md front matter names them."""
    if not model:
        return None, None
    if model in PRESET_ORIGINS:
        return PRESET_ORIGINS[model]
    if _is_hub_id(model):
        return model, None
    front = _front_matter(Path(os.path.expanduser(model)) / CARD)
    hub = front.get("base_model")
    hub = hub[0] if isinstance(hub, list) and hub else hub
    return (hub if isinstance(hub, str) and _is_hub_id(hub) else None), (
        front.get("license") if isinstance(front.get("license"), str) else None
    )


def _front_matter(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError:
        return {}
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def data_files(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Each configured data source: its key, what it is, its sha256 (files; folders: of their files
    in order) or None (Hub datasets)."""
    from .cache import file_sha256
    from .data.check import resolve_source

    found = []
    for key, source in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if not source:
            continue
        try:
            path = Path(os.path.expanduser(resolve_source(source, key)))
        except Exception:
            path = Path(source)
        entry: dict[str, Any] = {"key": key, "source": source, "sha256": None, "hub": False}
        if path.is_file():
            entry["sha256"] = file_sha256(path)
        elif path.is_dir():
            import hashlib

            h = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\0")
            entry["sha256"] = h.hexdigest()
        else:
            entry["hub"] = _is_hub_id(source)
        found.append(entry)
    return found


def _rows(run: RunDir) -> dict[str, int]:
    """Rows used per split (from run_state.json's data report: the policy's tokenized rows)."""
    try:
        data = json.loads(run.run_state.read_text()).get("data", {})
    except (OSError, ValueError):
        return {}
    out = {}
    for key, value in data.items():
        if key.endswith("/policy") and isinstance(value, dict) and "total" in value:
            out[key.split("/")[0]] = int(value["total"]) - int(value.get("skipped", 0))
    return out


def held_out(run: RunDir) -> tuple[dict[str, float], dict[str, float], int | None]:
    """(metrics at step 0, metrics at the last evaluation, its step) from metrics.jsonl."""
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    step = None
    try:
        lines = run.metrics.read_text().splitlines()
    except OSError:
        return before, after, step
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        evals = {k: v for k, v in row.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if not evals:
            continue
        if row.get("step") == 0:
            before.update(evals)
            continue
        if row.get("step") != step:  # a later evaluation replaces the earlier one
            after, step = {}, row.get("step")
        after.update(evals)  # rows of the same step (held-out pairs, then generation_eval's answers)
    return before, after, step


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def _setting(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"preftune": __version__}
    for name in ("transformers", "torch", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def model_card(
    cfg: TrainConfig, run_dir: str | Path, *, steps: int, adapter: bool, num_processes: int = 1
) -> str:
    """The README.md of the saved model of ``run_dir`` (``adapter``: the LoRA adapter's)."""
    run = RunDir(run_dir)
    spec = resolved_method(cfg)
    hub_id, license_ = base_model_origin(cfg.model)
    files = data_files(cfg)
    tags = ["preftune", *dict.fromkeys(spec.method.split("+"))]  # the method's named components
    tags += ["preference-optimization"] + (["lora"] if cfg.lora.enabled else [])
    front: dict[str, Any] = {}
    if hub_id:
        front["base_model"] = hub_id
    front["library_name"] = "peft" if adapter else "transformers"
    front["model_name"] = run.root.resolve().name
    front["tags"] = tags
    if license_:
        front["license"] = license_
    hub_data = [f["source"] for f in files if f["hub"]]
    if hub_data:
        front["datasets"] = hub_data
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]

    name = front["model_name"]
    base = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{cfg.model}`"
    what = (
        "a LoRA adapter for"
        if adapter
        else ("a LoRA fine-tune (merged) of" if cfg.lora.enabled else "a fine-tune of")
    )
    lines += [
        f"# Model card for {name}",
        "",
        f"This model is {what} {base}, trained with preference optimization by "
        f"[preftune](https://pypi.org/project/preftune/) {__version__}: method `{spec.method}`, "
        f"{steps} optimizer steps.",
        "",
        "## Quick start",
        "",
        "```python",
    ]
    here = "path/to/this/folder"
    if adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{here}")  # loads the base model, then the adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{here}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
        ]
    lines += ["```", "", "## Training procedure", ""]
    for c in spec.parts:
        if c.paper:
            lines.append(f"- `{c.name}` ({c.slot}): {c.summary}. {c.paper}.")
    refs = [r.model for r in cfg.references] or ["policy"]
    lines += [
        f"- references: {', '.join(f'`{r}`' for r in refs)} (`policy` = the initial policy; index 0 is the primary)"
        if not (spec.reference_free or cfg.reference_free)
        else "- references: none (reference-free)",
        f"- steps: {steps} (global batch {cfg.batch_size * cfg.grad_accum * num_processes} pairs = "
        f"batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum} × {num_processes} process"
        f"{'es' if num_processes > 1 else ''})",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    keys = [*COMMON_SETTINGS, *(o.key for o in spec.options)]
    if cfg.lora.enabled:
        keys += ["lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"]
    for key in dict.fromkeys(keys):
        lines.append(f"| `{key}` | `{_setting(cfg, key)}` |")
    lines += ["", "### Data", "", "| key | source | sha256 | rows used |", "|---|---|---|---|"]
    rows = _rows(run)
    split_of = {"data.train": "train", "data.eval": "eval"}
    for f in files:
        digest = f"`{f['sha256']}`" if f["sha256"] else ("Hub dataset" if f["hub"] else "—")
        lines.append(f"| `{f['key']}` | `{f['source']}` | {digest} | {rows.get(split_of[f['key']], '—')} |")
    before, after, step = held_out(run)
    lines += ["", "## Results", ""]
    if after:
        sticks = yardsticks(cfg)
        lines += [
            f"Held-out pairs (`data.eval`, n = {_value(after.get('eval_n'))}): before training (step 0, the "
            f"initial policy) and after (step {step}). Each metric says what it is measured against.",
            "",
            "| metric | before | after | measured against |",
            "|---|---|---|---|",
        ]
        for key in sorted(after, key=lambda k: (k != "eval_loss", k)):
            if key == "eval_n":
                continue
            lines.append(
                f"| `{key}` | {_value(before.get(key))} | {_value(after[key])} | {yardstick(key, sticks)} |"
            )
    else:
        lines.append(
            "No held-out data (`data.eval`) was set: `preftune eval RUN_DIR --data FILE` measures it."
        )
    lines += [
        "",
        "## Reproduce",
        "",
        "The run directory's `config.yaml` is the resolved config: `preftune train config.yaml`.",
        "",
        "### Framework versions",
        "",
        *(f"- {k}: {v}" for k, v in _versions().items()),
        "",
    ]
    return "\n".join(lines)


def write_model_cards(
    run_dir: str | Path, cfg: TrainConfig, steps: int, num_processes: int = 1
) -> list[Path]:
    """README.md into the model folders this run saved: ``final/`` (full model, or merged LoRA: with
    ``save_merged``, and always under FSDP) and ``final-adapter/`` (LoRA). Returns the cards written."""
    from .final_model import final_directories

    run = RunDir(run_dir)
    targets = [(d, d == run.final_adapter) for d in final_directories(run.root, cfg, num_processes)]
    written = []
    for directory, adapter in targets:
        if directory.is_dir():
            path = directory / CARD
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                model_card(cfg, run.root, steps=steps, adapter=adapter, num_processes=num_processes)
            )
            os.replace(tmp, path)
            written.append(path)
    return written
