"""The training recipe, top to bottom: setup -> data -> references -> embeddings -> fit -> save.

Everything the losses need is a per-sequence tensor: policy log-probs (with grad), reference
log-probs [K, B] (precomputed or online), MallowsPO's dispersion c(x) from the primary reference's
entropies, RPO's prompt embeddings. The loop is plain PyTorch on top of ``accelerate`` (devices,
mixed precision, DDP); the loss is always ``losses.preference_loss`` configured by the method name.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import losses as L
from .cache import default_cache_dir
from .config import ConfigError, TrainConfig, load_config, save_config, to_dict
from .data.check import check_data
from .references import (
    PAIRED_SIDES,
    UNPAIRED_SIDES,
    ModelView,
    OnlineReferences,
    PrecomputedReferences,
    precompute_references,
)
from .scoring import (
    collate_sequences,
    collate_shared_prompt_pairs,
    score_batch,
    shared_prompt_support,
    sharing_pays,
)

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what was kept."""


# --------------------------------------------------------------------------------------------------
# Setup


@dataclass
class RunResult:
    output_dir: Path
    final_model_dir: Path
    metrics_path: Path
    steps: int
    last_metrics: dict[str, float] = field(default_factory=dict)


class PolicyScorer(nn.Module):
    """Wraps the policy so that DDP sees one forward: chunked per-sequence log-probs."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 0):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, **batch):
        """A batch from ``collate_sequences`` or ``collate_shared_prompt_pairs``."""
        scores = score_batch(self.model, **batch, chunk_tokens=self.chunk_tokens)
        return scores.logps, scores.n_tokens


def _log(msg: str, accelerator=None) -> None:
    if accelerator is None or accelerator.is_main_process:
        tqdm.write(f"[preftune] {msg}")


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return value


def prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir {out} is not writable: {e.strerror or e}") from e
    if find_checkpoints(out) and not cfg.resume and not cfg.overwrite_output_dir:
        raise TrainingError(
            f"{out} already holds checkpoints; pass resume=true to continue that run or "
            "overwrite_output_dir=true to start over"
        )
    return out


def find_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def resolve_causal_lm(name: str, key: str) -> Path:
    """A model directory for a config value, checked to be a causal LM; errors name the config key."""
    from .models import check_causal_lm_config, resolve_model

    try:
        path = Path(resolve_model(name))
        check_causal_lm_config(path)
    except (ValueError, ImportError) as e:  # not a causal LM / a file / a preset's package missing
        raise ConfigError(f"{key}: {e}") from e
    return path


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing).

    transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias until v6) to
    activation_checkpointing_enable; older releases have only the first.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(cfg: TrainConfig, device) -> tuple[nn.Module, Any, Path]:
    from .models import load_causal_lm

    if not cfg.model:
        raise ConfigError(
            "`model` is required: a local HF directory or a preset name (e.g. smollm2-135m-instruct)"
        )
    path = resolve_causal_lm(cfg.model, "model")
    model, tokenizer = load_causal_lm(
        str(path), dtype=_dtype(cfg.model_dtype) or torch.float32, device=device
    )
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets if targets == "all-linear" else list(targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, tokenizer, Path(path)


# --------------------------------------------------------------------------------------------------
# Data


def resolve_data_source(source: str) -> str:
    """`builtin:arithmetic-train` / `builtin:arithmetic-test` name the bundled arithmetic pairs."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in ("arithmetic-train", "arithmetic-test"):
            from .data.arithmetic import arithmetic_path

            return str(arithmetic_path(name.split("-")[1]))
        raise ConfigError(
            f"unknown builtin dataset {source!r} (have builtin:arithmetic-train, builtin:arithmetic-test)"
        )
    return source


@dataclass
class PreparedData:
    splits: list[str]  # "train" and optionally "eval"
    views: list[ModelView]  # views[0] is the policy's; then one per reference (may share the policy's)
    reference_views: list[ModelView]
    unpaired: bool
    report: dict[str, Any]


def prepare_data(
    cfg: TrainConfig, policy_tokenizer, policy_path: Path, unpaired: bool, log=_log
) -> PreparedData:
    """Load, validate and tokenize every split for the policy and for each reference's tokenizer.

    Rows dropped for one model (e.g. a prompt over max_length in its tokens, with on_error=skip) are
    dropped for all, so index i always names the same example in every view.
    """
    from transformers import AutoTokenizer

    from .data import Columns, load_examples, tokenize_dataset

    columns = Columns(**to_dict(cfg.data.columns))
    sources = {"train": (cfg.data.train, cfg.data.train_split)}
    if cfg.data.eval:
        sources["eval"] = (cfg.data.eval, cfg.data.eval_split)
    if not cfg.data.train:
        raise ConfigError("data.train is required (a file, a folder, a hub name or builtin:arithmetic-train)")
    loaded = {}
    for split, (source, hf_split) in sources.items():
        loaded[split] = load_examples(
            resolve_data_source(source),
            unpaired=unpaired,
            columns=columns,
            on_error=cfg.data.on_error,
            split=hf_split,
            max_rows=cfg.data.max_rows,
        )
        if loaded[split].skipped:
            log(f"{split}: skipped {len(loaded[split].skipped)} bad rows of {source} (data.on_error=skip)")

    policy_view = ModelView("policy", policy_path, policy_tokenizer, cfg.data.chat_template)
    views = [policy_view]
    reference_views = []
    for k, ref in enumerate(cfg.references or []):
        if ref.model == "policy":
            if ref.chat_template:
                raise ConfigError("references: the `policy` reference always uses the policy's chat template")
            reference_views.append(policy_view)
            continue
        path = resolve_causal_lm(ref.model, f"references[{k}]")
        tok = AutoTokenizer.from_pretrained(str(path))
        view = ModelView(ref.model, Path(path), tok, ref.chat_template, dtype=_dtype(ref.dtype))
        views.append(view)
        reference_views.append(view)
    if not reference_views:
        reference_views = [policy_view]

    report: dict[str, Any] = {}
    for split, data in loaded.items():
        kept_rows = None
        per_view = []
        for view in views:
            items, rep = tokenize_dataset(
                data,
                view.tokenizer,
                max_length=cfg.max_length,
                on_error=cfg.data.on_error,
                chat_template=view.chat_template,
                progress=cfg.progress,
            )
            per_view.append(items)
            rows = {it.row for it in items}
            kept_rows = rows if kept_rows is None else kept_rows & rows
            if rep.skipped:
                row, column, reason = rep.skipped[0]
                log(
                    f"{split}: skipped {len(rep.skipped)} row(s) that do not tokenize for {view.name} "
                    f"(data.on_error=skip); first: {data.where(row)}, field '{column}': {reason}"
                )
            if rep.truncated:
                log(
                    f"{split}: {rep.truncated} of {rep.total} rows truncated to max_length={cfg.max_length} "
                    f"for {view.name} (the start is kept)"
                )
            report[f"{split}/{view.name}"] = {
                "total": rep.total,
                "truncated": rep.truncated,
                "skipped": len(rep.skipped),
            }
        for view, items in zip(views, per_view):
            view.tokenized[split] = [it for it in items if it.row in kept_rows]
        if not view.tokenized[split]:
            raise ConfigError(f"{split}: no usable rows in {sources[split][0]}")
    return PreparedData(list(loaded), views, reference_views, unpaired, report)


# --------------------------------------------------------------------------------------------------
# The step


@dataclass
class StepInputs:
    """Per-example tensors for the whole dataset that the loss may need, indexed by example."""

    dispersion_c: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> [N, d]


class LossComputer:
    """Turns per-sequence tensors of a micro-batch into the configured method's LossOutput."""

    def __init__(self, cfg: TrainConfig, spec: dict, num_references: int, unpaired: bool):
        self.cfg = cfg
        self.spec = spec
        self.unpaired = unpaired
        self.length_normalize = (
            cfg.length_normalize
            if cfg.length_normalize is not None
            else (spec.get("link") == "ipo" or cfg.reference_free)
        )
        if num_references > 1 and spec.get("reference", "single") == "single":
            raise ConfigError(
                f"method {cfg.method!r} uses one reference but {num_references} are configured; "
                "use mrpo or mdpo (optionally composed, e.g. mrpo+mallows_theta)"
            )
        if spec.get("reference") in ("mrpo", "mdpo") and num_references < 2:
            _log(f"{cfg.method} with a single reference is exactly DPO; add references to use it")
        self.kwargs = dict(
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            reference_free=cfg.reference_free,
            gamma=cfg.gamma,
            sft_weight=cfg.sft_weight,
        )

    def __call__(
        self,
        policy: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor],
        refs: dict,
        c=None,
        embeddings=None,
    ) -> L.LossOutput:
        def norm(x, side):
            return x / lengths[side].clamp(min=1).to(x.dtype) if self.length_normalize else x

        pol = {s: norm(v, s) for s, v in policy.items()}
        ref = {s: norm(v, s) for s, v in refs.items()}
        if self.unpaired:
            labels = lengths["label"]
            ci, ri = labels.nonzero().flatten(), (~labels).nonzero().flatten()
            comp, rcomp = pol["completion"], ref["completion"][0]
            emb = embeddings
            return L.unpaired_preference_loss(
                comp[ci],
                rcomp[ci],
                None if emb is None else emb[ci],
                comp[ri],
                rcomp[ri],
                None if emb is None else emb[ri],
                tau=self.cfg.rpo.tau,
                pairing=self.spec.get("pairing", "rpo"),
                link=self.spec.get("link", "sigmoid"),
                chosen_lengths=lengths["completion"][ci],
                **self.kwargs,
            )
        spec = self.spec
        extra: dict[str, Any] = {}
        if spec.get("scale") == "mallows_theta":
            extra["scale"] = c
        if spec.get("link") == "mallows_phi":
            extra["dispersion"] = torch.exp(-c)
        if spec.get("pairing") == "rpo":
            extra["prompt_embeddings"] = embeddings
        return L.preference_loss(
            pol["chosen"],
            pol["rejected"],
            ref["chosen"],
            ref["rejected"],
            reference=spec.get("reference", "single"),
            pairing=spec.get("pairing", "diagonal"),
            link=spec.get("link", "sigmoid"),
            tau=self.cfg.rpo.tau,
            diagonal_weight=self.cfg.rpo.diagonal_weight,
            weights=self.cfg.mrpo.weights,
            clip_eps=self.cfg.mrpo.clip_eps,
            clip=self.cfg.mrpo.clip,
            chosen_lengths=lengths["chosen"],
            **extra,
            **self.kwargs,
        )


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph (gradient flows back to the local part)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(all_gather(x), dim=0)


def _mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average logged metrics over processes (each saw only its share of the batch). Keys may differ
    between processes (unpaired batches without chosen or rejected items): average where present."""
    from accelerate.utils import gather_object

    per_process = gather_object([values])
    keys = dict.fromkeys(k for v in per_process for k in v)
    return {k: sum(v[k] for v in per_process if k in v) / sum(k in v for v in per_process) for k in keys}


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_model(model: nn.Module, tokenizer, directory: Path, *, merge_lora: bool = False) -> None:
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _write_atomically(final: Path, write) -> None:
    """Write a directory under a temporary name, then rename: the old one survives any failure."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write {final}: {e.strerror or e}") from e
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int
) -> Path:
    path = output_dir / f"{CHECKPOINT_PREFIX}{step}"

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

    _write_atomically(path, write)
    for old in find_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    weights = path / "model"
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(weights / "adapter_model.safetensors"))
    else:
        state = {}
        for f in sorted(weights.glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied weights are saved once; anything else missing means the checkpoint is not this model.
        missing = [m for m in missing if "lm_head" not in m]
        if missing or unexpected:
            raise TrainingError(
                f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


# --------------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """metrics.jsonl (always) + TensorBoard (optional), TRL's names, written by the main process."""

    def __init__(self, output_dir: Path, report_to: list[str], enabled: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                _log("tensorboard is not installed; logging to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a crashed run wrote after its last checkpoint."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds the prepared run; ``fit()`` trains, ``evaluate()`` measures held-out preference metrics."""

    def __init__(self, cfg: TrainConfig, *, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.spec = L.parse_method(cfg.method)
        self.unpaired = bool(self.spec.get("unpaired"))
        self.sides = UNPAIRED_SIDES if self.unpaired else PAIRED_SIDES
        self.accelerator = accelerator or Accelerator(
            mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available()
        )
        acc = self.accelerator
        # data errors surface here, all at once, before any model loads (preftune.data.check)
        self.data_check = check_data(cfg, unpaired=self.unpaired, log=lambda m: _log(m, acc))
        self.output_dir = prepare_output_dir(cfg) if acc.is_main_process else Path(cfg.output_dir)
        acc.wait_for_everyone()
        set_seed(cfg.seed)
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()

        self.model, self.tokenizer, self.policy_path = load_policy(cfg, acc.device)
        self.data = prepare_data(
            cfg, self.tokenizer, self.policy_path, self.unpaired, log=lambda m: _log(m, acc)
        )
        self.loss_fn = LossComputer(cfg, self.spec, len(self.data.reference_views), self.unpaired)
        self.share_prompt = self._resolve_share_prompt()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        self.references = self._references()
        self.phi_star: float | None = None
        self.inputs = self._step_inputs()
        if acc.is_main_process:  # written once the inputs proved usable: a failed start keeps the old one
            save_config(cfg, self.output_dir / "config.yaml")
            data = {**self.data.report, **self.data_check.report}  # rows skipped while loading, too
            state = {"phi_star": self.phi_star, "data": data, "method": self.spec["method"]}
            (self.output_dir / "run_state.json").write_text(json.dumps(state, indent=1))

    # -- stages ------------------------------------------------------------------------------------

    def _references(self):
        cfg, acc = self.cfg, self.accelerator
        if cfg.reference_free:
            return None
        if cfg.reference_mode == "online":
            return OnlineReferences(
                self.data.reference_views,
                policy=self.model,
                device=acc.device,
                autocast_dtype=self.autocast_dtype,
            )
        with acc.main_process_first():
            return precompute_references(
                self.data.reference_views,
                self.data.splits,
                self.sides,
                policy=self.model,
                cache_root=self.cache_root,
                device=acc.device,
                autocast_dtype=self.autocast_dtype,
                progress=cfg.progress and acc.is_local_main_process,
                log=lambda m: _log(m, acc),
            )

    def _resolve_share_prompt(self) -> bool | None:
        """True/False: always/never share; None: decide per micro-batch (see :meth:`_shares`)."""
        cfg, device = self.cfg, self.accelerator.device
        if self.unpaired:
            if cfg.share_prompt:
                raise ConfigError(
                    "share_prompt: unpaired data has one completion per prompt, nothing to share"
                )
            return False
        why_not = shared_prompt_support(self.model, cfg.max_length)
        if cfg.share_prompt is None:
            if why_not or device.type != "cpu":
                reason = (
                    why_not
                    or "not measured on accelerators yet, where the custom mask costs the fast kernels"
                )
                _log(f"share_prompt (auto): off ({reason})", self.accelerator)
                return False
            return None
        if cfg.share_prompt and why_not:
            raise ConfigError(f"share_prompt: true is not possible with this model: {why_not}")
        return bool(cfg.share_prompt)

    def _shares(self, prompts: list, completions: list) -> bool:
        """Whether this micro-batch (chosen rows, then rejected rows) goes as shared-prompt rows."""
        b = len(prompts) // 2
        if not all(prompts[:b]):  # an empty prompt has nothing to share (and no position to predict from)
            return False
        if self.share_prompt is not None:
            return self.share_prompt
        return sharing_pays(prompts[:b], completions[:b], completions[b:])

    def _step_inputs(self) -> StepInputs:
        cfg, spec = self.cfg, self.spec
        inputs = StepInputs()
        if spec.get("needs_entropy"):
            if not isinstance(self.references, PrecomputedReferences):
                raise ConfigError(
                    "MallowsPO needs the primary reference's entropies: use reference_mode=precompute"
                )
            ent = {
                s: (self.references.entropies(s, "chosen"), self.references.entropies(s, "rejected"))
                for s in self.data.splits
            }
            phi_star = cfg.mallows.phi_star
            if phi_star == "auto":
                phi_star = L.calibrate_phi_star(*ent["train"])
                _log(f"mallows.phi_star=auto -> {phi_star:.4f} (mean c(x) over the training set is 1)")
            self.phi_star = float(phi_star)
            for split, (hc, hr) in ent.items():
                inputs.dispersion_c[split] = L.neg_log_dispersion(hc, hr, self.phi_star).float()
        if spec.get("needs_embeddings"):
            from .embeddings import embed_prompts

            with self.accelerator.main_process_first():
                for split in self.data.splits:
                    texts = [it.prompt_text for it in self.data.views[0].tokenized[split]]
                    inputs.embeddings[split] = embed_prompts(
                        texts,
                        embedder=cfg.rpo.embedder,
                        cache_root=self.cache_root,
                        progress=cfg.progress and self.accelerator.is_local_main_process,
                    )
        return inputs

    # -- one micro-batch ---------------------------------------------------------------------------

    def _micro_batch(self, scorer, split: str, index: list[int], *, grad: bool):
        """Policy forward on this process's examples, gathered if the scope is global; then the loss."""
        acc, view = self.accelerator, self.data.views[0]
        prompts, completions = [], []
        for side in self.sides:
            p, c = view.sequences(split, side, index)
            prompts += p
            completions += c
        b = len(index)
        if self._shares(prompts, completions):
            batch = collate_shared_prompt_pairs(
                prompts[:b], completions[:b], completions[b:], view.pad_token_id, acc.device
            )
        else:
            batch = collate_sequences(prompts, completions, view.pad_token_id, acc.device)
        with nullcontext() if grad else torch.no_grad():
            logps, n_tok = scorer(**batch)
        policy = {s: logps[j * b : (j + 1) * b] for j, s in enumerate(self.sides)}
        lengths = {s: n_tok[j * b : (j + 1) * b] for j, s in enumerate(self.sides)}
        if self.references is None:
            refs = {s: torch.zeros(1, b, device=acc.device) for s in self.sides}
        else:
            refs = {
                s: v.to(acc.device) for s, v in self.references.batch(split, index, self.sides).logps.items()
            }
        idx = torch.tensor(index)
        c = self.inputs.dispersion_c[split][idx].to(acc.device) if split in self.inputs.dispersion_c else None
        emb = self.inputs.embeddings[split][idx].to(acc.device) if split in self.inputs.embeddings else None
        if self.unpaired:
            lengths["label"] = torch.tensor(
                [view.tokenized[split][i].label for i in index], device=acc.device
            )
        gather = (
            grad
            and acc.num_processes > 1
            and self.cfg.rpo.contrast_scope == "global"
            and (self.spec.get("pairing", "diagonal") != "diagonal" or self.unpaired)
        )
        if gather:
            policy = {s: _gather_with_grad(v) for s, v in policy.items()}
            lengths = {s: acc.gather(v) for s, v in lengths.items()}
            refs = {s: acc.gather(v.T.contiguous()).T for s, v in refs.items()}
            c = acc.gather(c) if c is not None else None
            emb = acc.gather(emb) if emb is not None else None
        out = self.loss_fn(policy, lengths, refs, c=c, embeddings=emb)
        # No rescaling of a gathered (global) loss: every process computes the same loss, all_gather's
        # backward sums their gradients into each local part (P x), and DDP's average divides by P.
        tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))  # a shared prompt counts twice
        return out, tokens, policy, refs

    # -- data order --------------------------------------------------------------------------------

    def _global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def _steps_per_epoch(self) -> int:
        n = len(self.data.views[0].tokenized["train"])
        steps = n // self._global_batch()
        if steps == 0:
            raise ConfigError(
                f"the training data has {n} usable examples, fewer than one global batch "
                f"(batch_size × grad_accum × processes = {self._global_batch()})"
            )
        return steps

    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self._steps_per_epoch()))

    def _step_indices(self, step: int) -> list[list[int]]:
        """This process's example indices for each micro-batch of optimiser step ``step`` (0-based)."""
        cfg, acc = self.cfg, self.accelerator
        per_epoch = self._steps_per_epoch()
        epoch, pos = divmod(step, per_epoch)
        n = len(self.data.views[0].tokenized["train"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        g = self._global_batch()
        chunk = order[pos * g : (pos + 1) * g]
        micro = cfg.batch_size * acc.num_processes
        out = []
        for m in range(cfg.grad_accum):
            part = chunk[m * micro : (m + 1) * micro]
            r = acc.process_index
            out.append(part[r * cfg.batch_size : (r + 1) * cfg.batch_size])
        return out

    # -- fit -----------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        total = self.total_steps()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            # one kernel per step on CPU and CUDA, as TRL's default adamw_torch_fused
            fused=acc.device.type in ("cpu", "cuda") or None,
        )
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        scorer = PolicyScorer(self.model, cfg.logits_chunk_tokens)
        scorer, optimizer = acc.prepare(scorer, optimizer)
        metrics_log = MetricsLog(self.output_dir, cfg.report_to, acc.is_main_process)

        start = 0
        checkpoints = find_checkpoints(self.output_dir)
        if cfg.resume and checkpoints:
            state = load_checkpoint(checkpoints[-1], self.model, optimizer, scheduler)
            start = state["step"]
            if state.get("global_batch") != self._global_batch():
                raise TrainingError(
                    f"{checkpoints[-1]} was written with global batch {state.get('global_batch')}, "
                    f"this run has {self._global_batch()}: the data order would not continue"
                )
            metrics_log.truncate_after(start)
            _log(f"resumed from {checkpoints[-1]} at step {start}", acc)
        elif cfg.resume:
            _log(f"resume=true but {self.output_dir} has no checkpoint; starting from step 0", acc)

        bar = tqdm(
            total=total,
            initial=start,
            desc=f"train {cfg.method}",
            unit="step",
            disable=not (cfg.progress and acc.is_local_main_process),
            dynamic_ncols=True,
        )
        window: dict[str, list[float]] = {}
        window_tokens, window_start = 0, time.perf_counter()
        last: dict[str, float] = {}
        scorer.train()
        per_epoch = self._steps_per_epoch()
        for step in range(start, total):
            micro_batches = self._step_indices(step)
            step_metrics: dict[str, list[float]] = {}
            losses = []
            for m, index in enumerate(micro_batches):
                sync = m == len(micro_batches) - 1
                with nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(scorer):
                    out, tokens, _, _ = self._micro_batch(scorer, "train", index, grad=True)
                    acc.backward(out.loss / cfg.grad_accum)
                losses.append(out.loss.detach())
                window_tokens += tokens
                for k, v in out.metrics.items():
                    step_metrics.setdefault(k, []).append(float(v))
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss = acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean").item()
            window.setdefault("loss", []).append(loss)
            for k, vals in step_metrics.items():
                window.setdefault(k, []).append(sum(vals) / len(vals))
            if grad_norm is not None:
                window.setdefault("grad_norm", []).append(float(grad_norm))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total:
                elapsed = time.perf_counter() - window_start
                row = {k: sum(v) / len(v) for k, v in window.items()}
                if acc.num_processes > 1:
                    row = _mean_over_processes(row)
                row.update(
                    epoch=done / per_epoch,
                    learning_rate=lr,
                    tokens_per_second=window_tokens * acc.num_processes / max(elapsed, 1e-9),
                    peak_memory_mb=peak_memory_mb(acc.device),
                )
                metrics_log.write(done, row)
                last = row
                window, window_tokens, window_start = {}, 0, time.perf_counter()
            if (
                self.data.splits[-1] == "eval"
                and cfg.eval_steps > 0
                and done % cfg.eval_steps == 0
                and done != total
            ):
                metrics_log.write(done, {"epoch": done / per_epoch, **self.evaluate(scorer)})
            if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done != total:
                self._checkpoint(done, optimizer, scheduler)
        bar.close()

        if "eval" in self.data.splits:
            ev = self.evaluate(scorer)
            metrics_log.write(total, {"epoch": total / per_epoch, **ev})
            last.update(ev)
        self._checkpoint(total, optimizer, scheduler)
        final = self.output_dir / "final"
        if acc.is_main_process:
            _write_atomically(
                final,
                lambda tmp: save_model(acc.unwrap_model(scorer).model, self.tokenizer, tmp, merge_lora=True),
            )
            if hasattr(self.model, "peft_config"):
                _write_atomically(
                    self.output_dir / "final-adapter", lambda tmp: save_model(self.model, self.tokenizer, tmp)
                )
        metrics_log.close()
        acc.wait_for_everyone()
        _log(f"done: {total} steps; model in {final}", acc)
        return RunResult(self.output_dir, final, metrics_log.path, total, last)

    def _checkpoint(self, step: int, optimizer, scheduler) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "global_batch": self._global_batch(), "method": self.cfg.method}
            try:
                save_checkpoint(
                    self.output_dir,
                    step,
                    self.model,
                    self.tokenizer,
                    optimizer,
                    scheduler,
                    state,
                    self.cfg.save_total_limit,
                )
            except TrainingError as e:
                kept = find_checkpoints(self.output_dir)
                hint = (
                    f"{kept[-1]} is intact: rerun with resume=true to continue from it"
                    if kept
                    else "no earlier checkpoint exists"
                )
                raise TrainingError(f"{e}; {hint}") from e
        acc.wait_for_everyone()

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, scorer=None, split: str = "eval") -> dict[str, float]:
        """Held-out metrics with TRL's ``eval_`` names: the method's loss and rewards, plus rewards
        against the primary reference alone (``eval_primary/...``) and the policy's own preference
        ``eval_logps/accuracies`` (fraction of pairs with log π(y_w|x) > log π(y_l|x), no reference)."""
        scorer = scorer or PolicyScorer(self.model, self.cfg.logits_chunk_tokens).to(self.accelerator.device)
        was_training = scorer.training
        scorer.eval()
        n = len(self.data.views[0].tokenized[split])
        bs = self.cfg.batch_size
        losses, rc, rr, pc, pr, own = [], [], [], [], [], []
        for start in range(0, n, bs):
            index = list(range(start, min(n, start + bs)))
            out, _, policy, refs = self._micro_batch(scorer, split, index, grad=False)
            losses.append(out.losses.float().cpu())
            if out.chosen_rewards is not None:
                rc.append(out.chosen_rewards.float().cpu())
                rr.append(out.rejected_rewards.float().cpu())
            if not self.unpaired:
                own.append((policy["chosen"] > policy["rejected"]).float().cpu())
            if not self.unpaired and self.references is not None:
                pc.append((policy["chosen"].float() - refs["chosen"][0]).cpu())
                pr.append((policy["rejected"].float() - refs["rejected"][0]).cpu())
        scorer.train(was_training)
        result = {"eval_loss": float(torch.cat(losses).mean())}
        if own:
            result["eval_logps/accuracies"] = float(torch.cat(own).mean())
        if rc:
            c, r = torch.cat(rc), torch.cat(rr)
            result.update(
                {
                    "eval_rewards/chosen": float(c.mean()),
                    "eval_rewards/rejected": float(r.mean()),
                    "eval_rewards/margins": float(c.mean() - r.mean()),
                    "eval_rewards/accuracies": float((c > r).float().mean())
                    if c.shape == r.shape
                    else float("nan"),
                }
            )
        if pc:
            c, r = torch.cat(pc) * self.cfg.beta, torch.cat(pr) * self.cfg.beta
            result.update(
                {
                    "eval_primary/rewards/margins": float((c - r).mean()),
                    "eval_primary/rewards/accuracies": float((c > r).float().mean()),
                }
            )
        return result


def train(config: TrainConfig | str | os.PathLike | dict, overrides: list[str] | None = None) -> RunResult:
    """Train as the config says; returns where the run directory, final model and metrics are."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    return Trainer(cfg).fit()
