"""The training recipe, top to bottom: setup -> data -> references -> step inputs -> fit -> save.

Everything the losses need is a per-sequence tensor: policy log-probs (with grad), reference
log-probs [K, B] (precomputed or online), MallowsPO's dispersion c(x) from the primary reference's
entropies, RPO's prompt embeddings. The loop is plain PyTorch on top of ``accelerate`` (devices,
mixed precision, DDP); the loss is always ``losses.preference_loss`` configured by the method name.

The components live in their own modules and never import this one: models.loading (the policy),
data.prepare (the data), references (reference scores), step (one micro-batch and the update),
checkpointing, metrics and rundir (the run directory's files).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import autoresume, preemption, runlock
from . import distributed as D
from . import losses as L
from .cache import default_cache_dir
from .checkpointing import (
    SHARDED,
    TrainingError,
    check_checkpoint_format,
    find_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    save_final,
    save_sharded_checkpoint,
    select_resume_checkpoint,
)
from .config import ConfigError, TrainConfig, load_config, save_config
from .data.check import check_data
from .data.prepare import carve_validation, prepare_data
from .metrics import HeldOutMetrics, MetricsLog, log, mean_over_processes, peak_memory_mb
from .model_card import write_model_cards
from .models.loading import load_policy, mixed_precision
from .mrpo_validation import fixed_weights, uses_validation_weights, with_weights
from .nonfinite import NonFiniteError, nonfinite_part, weights_finite
from .nonfinite import hint as nonfinite_hint
from .references import (
    MISMATCHED_SIDE,
    PAIRED_SIDES,
    UNPAIRED_SIDES,
    OnlineReferences,
    PrecomputedReferences,
    precompute_references,
)
from .rundir import CHECKPOINT_STATE, RunDir
from .scoring import shared_prompt_support
from .seeding import set_seed
from .step import (
    DataOrder,
    LossComputer,
    PolicyScorer,
    StepInputs,
    apply_update,
    make_optimizer,
    micro_batch_loss,
    shares_prompt,
)
from .threads import configure_threads
from .trackers import require_trackers

__all__ = ["RunResult", "Trainer", "TrainingError", "train"]


@dataclass
class RunResult:
    output_dir: Path
    final_model_dir: Path
    metrics_path: Path
    steps: int
    last_metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Holds the prepared run; ``fit()`` trains, ``evaluate()`` measures held-out preference metrics."""

    split_labels: dict[str, str] | None = None  # how messages name a split (`preftune eval` renames)

    def __init__(self, cfg: TrainConfig, *, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        configure_threads(cfg.threads, log=log)  # intra-op threads from the CPUs this process may use
        self.spec = L.parse_method(cfg.method)
        self.unpaired = bool(self.spec.get("unpaired"))
        self.sides = UNPAIRED_SIDES if self.unpaired else PAIRED_SIDES
        self.stage = "setup"  # named in the message when this process fails (distributed.exit_on_error)
        if "mismatched" in self.spec["needs"]:  # KTO's reference point: mismatched items, scored last
            self.sides += (MISMATCHED_SIDE,)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mixed_precision(cfg),
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[D.process_group_kwargs(cfg.dist_timeout_s)],  # every collective times out
        )
        acc = self.accelerator
        # FSDP shards only over several processes; the checkpoint format follows the key regardless
        self.fsdp = cfg.parallelism == "fsdp" and acc.num_processes > 1
        self.scorer = None  # under FSDP: the sharded PolicyScorer, the only module that may run
        D.barrier("start", cfg.dist_timeout_s)  # every rank is up (and NCCL's side gloo group exists)
        require_trackers(cfg.report_to)  # a requested tracker that is not installed: before any model loads
        # data errors surface here, all at once, before any model loads (preftune.data.check)
        self.data_check = check_data(cfg, unpaired=self.unpaired, log=lambda m: log(m, acc))
        self.output_dir = (
            prepare_output_dir(cfg, log=lambda m: log(m, acc))
            if acc.is_main_process
            else Path(cfg.output_dir)
        )
        self.run_dir = RunDir(self.output_dir)
        acc.wait_for_everyone()
        # the newest intact checkpoint (damaged ones are skipped, saying why) before any model loads
        self.resume_from = (
            select_resume_checkpoint(self.output_dir, lambda m: log(m, acc)) if cfg.resume else None
        )
        set_seed(cfg.seed)
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()

        self.model, self.tokenizer, self.policy_path = load_policy(cfg, acc.device)
        self.data = prepare_data(
            cfg,
            self.tokenizer,
            self.policy_path,
            self.unpaired,
            log=lambda m: log(m, acc),
            node_first=acc.local_main_process_first,
            loaded=self.data_check.loaded,
        )
        # mrpo.weights=validation: hold out validation rows before anything scores the data
        self.validation: dict | None = None
        validation_rows = None
        if uses_validation_weights(cfg, self.spec):
            validation_rows = carve_validation(self.data, cfg.mrpo.validation_fraction, cfg.seed)
        self.loading_report = self.data_check.report
        self.data_check.loaded.clear()  # streamed splits (row offsets); only the token stores stay
        self.loss_fn = LossComputer(cfg, self.spec, len(self.data.reference_views), self.unpaired)
        self.share_prompt = self._resolve_share_prompt()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        self.references = self._references()
        if validation_rows is not None:
            self.validation = fixed_weights(cfg, self.references, validation_rows)
            log(
                f"mrpo.weights=validation: accuracies {self.validation['accuracies']} -> "
                f"weights {self.validation['weights']} ({len(validation_rows)} validation rows)",
                acc,
            )
            self.loss_fn = LossComputer(
                with_weights(cfg, self.validation["weights"]),
                self.spec,
                len(self.data.reference_views),
                self.unpaired,
            )
        if self.fsdp:  # after LoRA / checkpointing (load_policy) and the precomputed references
            self.scorer = self._shard()
        self.phi_star: float | None = None
        self.inputs = self._step_inputs()
        self.finished = self._already_finished()
        # written once the inputs proved usable: a failed start keeps the old one
        if acc.is_main_process and not self.finished:
            save_config(cfg, self.run_dir.config)
            data = {**self.data.report, **self.loading_report}  # rows skipped while loading, too
            state = {"phi_star": self.phi_star, "data": data, "method": self.spec["method"]}
            if self.validation is not None:
                state["mrpo_validation"] = self.validation
            self.run_dir.run_state.write_text(json.dumps(state, indent=1))

    def _already_finished(self) -> bool:
        """resume=true on a run whose last checkpoint is its last step and whose final model exists."""
        saved = self.run_dir.final.is_dir() or self.run_dir.final_adapter.is_dir()  # LoRA: the adapter alone
        if self.resume_from is None or not saved:
            return False
        step = json.loads((self.resume_from / CHECKPOINT_STATE).read_text()).get("step", 0)
        return step >= self.total_steps()

    # -- stages ------------------------------------------------------------------------------------

    def _shard(self):
        """The policy's scorer sharded with FSDP2 (each decoder layer, the scorer as root)."""
        cfg, acc = self.cfg, self.accelerator
        mp = D.mixed_precision_policy(cfg.precision, acc.device)
        root = D.shard_policy(PolicyScorer(self.model, cfg.logits_chunk_tokens), mp_policy=mp)
        if isinstance(self.references, OnlineReferences):
            self.references.policy_root = root  # the LoRA reference runs through the root too
        log(f"parallelism=fsdp: policy sharded over {acc.num_processes} processes", acc)
        return root

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
        # every process scores its share of the rows; the main one writes the merged cache entry
        return precompute_references(
            self.data.reference_views,
            self.data.splits,
            self.sides,
            policy=self.model,
            cache_root=self.cache_root,
            device=acc.device,
            autocast_dtype=self.autocast_dtype,
            progress=cfg.progress and acc.is_local_main_process,
            log=lambda m: log(m, acc),
            tails=self.loss_fn.adapter.needs_tails,
            split_labels=self.split_labels,
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
                log(f"share_prompt (auto): off ({reason})", self.accelerator)
                return False
            return None
        if cfg.share_prompt and why_not:
            raise ConfigError(f"share_prompt: true is not possible with this model: {why_not}")
        return bool(cfg.share_prompt)

    def _shares(self, prompts: list, completions: list) -> bool:
        """Whether this micro-batch (chosen rows, then rejected rows) goes as shared-prompt rows."""
        return shares_prompt(self.share_prompt, prompts, completions)

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
                log(f"mallows.phi_star=auto -> {phi_star:.4f} (mean c(x) over the training set is 1)")
            self.phi_star = float(phi_star)
            for split, (hc, hr) in ent.items():
                inputs.dispersion_c[split] = L.neg_log_dispersion(hc, hr, self.phi_star).float()
        if spec.get("needs_embeddings"):
            from .embeddings import embed_prompts

            for split in self.data.splits:  # sharded over the processes like the reference scores
                inputs.embeddings[split] = embed_prompts(
                    self.data.views[0].prompt_texts(split),
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
        if self.references is None:
            refs = {s: torch.zeros(1, b, device=acc.device) for s in self.sides}
        else:
            refs = {
                s: v.to(acc.device) for s, v in self.references.batch(split, index, self.sides).logps.items()
            }
        idx = torch.tensor(index)
        c = self.inputs.dispersion_c[split][idx].to(acc.device) if split in self.inputs.dispersion_c else None
        emb = self.inputs.embeddings[split][idx].to(acc.device) if split in self.inputs.embeddings else None
        labels = None
        if self.unpaired:
            labels = torch.tensor(view.labels(split, index), device=acc.device)
        gather = (
            grad
            and acc.num_processes > 1
            and self.cfg.rpo.contrast_scope == "global"
            and (self.spec.get("pairing", "diagonal") != "diagonal" or self.unpaired)
        )
        return micro_batch_loss(
            scorer,
            self.loss_fn,
            prompts,
            completions,
            refs,
            sides=self.sides,
            pad_token_id=view.pad_token_id,
            device=acc.device,
            share=self._shares(prompts, completions),
            grad=grad,
            c=c,
            embeddings=emb,
            labels=labels,
            gather=acc if gather else None,
            tail_from=view.shared_lengths(split, index) * 2 if self.loss_fn.adapter.needs_tails else None,
        )

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

    def _data_order(self) -> DataOrder:
        cfg, acc = self.cfg, self.accelerator
        n = len(self.data.views[0].tokenized["train"])
        return DataOrder(
            n,
            cfg.seed,
            self._steps_per_epoch(),
            cfg.batch_size,
            cfg.grad_accum,
            acc.num_processes,
            acc.process_index,
        )

    # -- fit -----------------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train; the run directory's lock is released however this ends."""
        try:
            return self._fit()
        finally:
            if self.accelerator.is_main_process:
                runlock.release(self.output_dir)

    def _fit(self) -> RunResult:
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        total = self.total_steps()
        if self.finished:
            log(f"already finished: {self.resume_from} is step {total} of {total}; nothing to do", acc)
            return RunResult(self.output_dir, self.run_dir.final, self.run_dir.metrics, total)
        scorer = self.scorer if self.fsdp else PolicyScorer(self.model, cfg.logits_chunk_tokens)
        params = [p for p in scorer.parameters() if p.requires_grad]  # FSDP: the sharded DTensors
        optimizer = make_optimizer(
            params,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            device=acc.device,
        )
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        if not self.fsdp:  # FSDP2 is applied by preftune.distributed, not by accelerate
            scorer, optimizer = acc.prepare(scorer, optimizer)
        self._fit_scorer = scorer
        metrics_log = MetricsLog(self.output_dir, cfg.report_to, acc.is_main_process)

        start = 0
        if self.resume_from is not None:
            self.stage = f"resume from {self.resume_from.name}"
            check_checkpoint_format(self.resume_from, cfg.parallelism)
            if cfg.parallelism == SHARDED:  # any number of processes: DCP reshards on load
                root = scorer if self.fsdp else acc.unwrap_model(scorer)
                state = load_sharded_checkpoint(self.resume_from, root, optimizer, scheduler)
            else:
                state = load_checkpoint(self.resume_from, self.model, optimizer, scheduler)
            start = state["step"]
            self.loss_fn.adapter.load_state_dict(state.get("loss_state", {}))  # BCO's running δ
            if state.get("global_batch") != self._global_batch():
                raise TrainingError(
                    f"{self.resume_from} was written with global batch {state.get('global_batch')}, "
                    f"this run has {self._global_batch()}: the data order would not continue"
                )
            metrics_log.truncate_after(start)
            log(f"resumed from {self.resume_from} at step {start}", acc)
        else:
            if cfg.resume:
                log(f"resume=true but {self.output_dir} has no checkpoint; starting from step 0", acc)
            metrics_log.reset()  # rows of a run killed before its first checkpoint would repeat
        skipped = 0

        bar = tqdm(
            total=total,
            initial=start,
            desc=f"train {cfg.method}",
            unit="step",
            disable=not (cfg.progress and acc.is_local_main_process),
            dynamic_ncols=True,
        )
        if start == 0 and "eval" in self.data.splits:  # the "before" point of every eval curve
            metrics_log.write(0, {"epoch": 0.0, **self.evaluate(scorer)})
        window: dict[str, list[float]] = {}
        window_tokens, window_start = 0, time.perf_counter()
        last: dict[str, float] = {}
        scorer.train()
        per_epoch = self._steps_per_epoch()
        order = self._data_order()
        for step in range(start, total):
            self.stage = f"step {step + 1}"
            micro_batches = order(step)
            step_metrics: dict[str, list[float]] = {}
            losses = []
            for m, index in enumerate(micro_batches):
                sync = m == len(micro_batches) - 1
                if self.fsdp:
                    accumulate = D.no_sync(scorer, enabled=not sync)
                else:
                    accumulate = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(scorer)
                with accumulate:
                    out, tokens, _, _ = self._micro_batch(scorer, "train", index, grad=True)
                    acc.backward(out.loss / cfg.grad_accum)
                losses.append(out.loss.detach())
                window_tokens += tokens
                for k, v in out.metrics.items():
                    step_metrics.setdefault(k, []).append(float(v))
            bad = nonfinite_part(losses, params, acc)  # before the update: a NaN step must not land
            if bad:
                skipped += 1
                grad_norm, lr = self._nonfinite(bad, step + 1, optimizer, scheduler)
            else:
                clip = D.clip_grad_norm_ if self.fsdp else acc.clip_grad_norm_  # FSDP: over all shards
                grad_norm, lr = apply_update(optimizer, scheduler, params, cfg.max_grad_norm, clip)

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
                    row = mean_over_processes(row)
                row.update(
                    epoch=done / per_epoch,
                    learning_rate=lr,
                    tokens_per_second=window_tokens * acc.num_processes / max(elapsed, 1e-9),
                    peak_memory_mb=peak_memory_mb(acc.device),
                )
                if skipped:
                    row["nonfinite_skipped_steps"] = skipped
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
            preemption.at_step_end(self, done, total, optimizer, scheduler)  # SIGTERM: checkpoint, exit 75
        bar.close()

        self.stage = "final evaluation"
        if "eval" in self.data.splits and start < total:  # else its row came before checkpoint-{total}
            ev = self.evaluate(scorer)
            metrics_log.write(total, {"epoch": total / per_epoch, **ev})
            last.update(ev)
        self._checkpoint(total, optimizer, scheduler)
        final = self.run_dir.final
        self.stage = "final save"
        lora = hasattr(self.model, "peft_config")
        if self.fsdp:  # gathered to rank 0 and saved as transformers directories (LoRA: merged + adapter)
            D.save_consolidated(
                scorer,
                final,
                tokenizer=self.tokenizer,
                merge_lora=True,
                adapter_directory=self.run_dir.final_adapter if lora else None,
                timeout_s=cfg.dist_timeout_s,
            )
        else:
            if acc.is_main_process:
                model = acc.unwrap_model(scorer).model
                save_final(model, self.tokenizer, self.output_dir, save_merged=cfg.save_merged)
            if lora and not cfg.save_merged:  # LoRA runs keep the adapter alone unless asked
                final = self.run_dir.final_adapter
        if acc.is_main_process:  # README.md of final/ and final-adapter/ (preftune.model_card)
            write_model_cards(self.output_dir, cfg, total, acc.num_processes)
        metrics_log.close()
        acc.wait_for_everyone()
        log(f"done: {total} steps; model in {final}", acc)
        return RunResult(self.output_dir, final, metrics_log.path, total, last)

    def _nonfinite(self, part: str, step: int, optimizer, scheduler):
        """A NaN/Inf loss or gradient at ``step``: stop (raise) or drop the update (skip_step)."""
        if self.cfg.on_nonfinite == "stop":
            kept = find_checkpoints(self.output_dir)
            raise NonFiniteError(
                f"step {step}: the {part} is not finite (NaN/Inf); stopped before the optimizer step, "
                f"nothing of it was saved; {nonfinite_hint(self.cfg, str(kept[-1]) if kept else None)}"
            )
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()  # the schedule follows the step count, skipped or not
        log(
            f"step {step}: the {part} is not finite; on_nonfinite=skip_step dropped this update",
            self.accelerator,
        )
        return None, lr

    def _checkpoint(self, step: int, optimizer, scheduler) -> None:
        acc = self.accelerator
        if not weights_finite(self.model):  # e.g. NaN weights loaded from elsewhere: never save them
            raise NonFiniteError(
                f"step {step}: the weights are not finite (NaN/Inf); not saving them; {nonfinite_hint(self.cfg, None)}"
            )
        self.stage = f"checkpoint {step}"
        D.barrier(f"checkpoint {step}: start", self.cfg.dist_timeout_s)
        state = {
            "step": step,
            "global_batch": self._global_batch(),
            "method": self.cfg.method,
            "parallelism": self.cfg.parallelism,
            "loss_state": self.loss_fn.adapter.state_dict(),  # e.g. BCO's running reward shift
        }
        if self.cfg.parallelism == SHARDED:
            self._sharded_checkpoint(step, optimizer, scheduler, state)
        elif acc.is_main_process:
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
        D.barrier(f"checkpoint {step}: done", self.cfg.dist_timeout_s)

    def _sharded_checkpoint(self, step: int, optimizer, scheduler, state: dict) -> None:
        """Every rank writes its shards (collective); see checkpointing.save_sharded_checkpoint."""
        cfg = self.cfg
        root = self.scorer if self.fsdp else self.accelerator.unwrap_model(self._fit_scorer)
        try:
            save_sharded_checkpoint(
                self.output_dir,
                step,
                root,
                self.tokenizer,
                optimizer,
                scheduler,
                state,
                cfg.save_total_limit,
                cfg.dist_timeout_s,
            )
        except TrainingError as e:
            kept = find_checkpoints(self.output_dir)
            hint = f"{kept[-1]} is intact" if kept else "no earlier checkpoint exists"
            raise TrainingError(f"{e}; {hint}") from e

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, scorer=None, split: str = "eval") -> dict[str, float]:
        """Held-out metrics with TRL's ``eval_`` names (see :class:`preftune.metrics.HeldOutMetrics`)."""
        scorer = (
            scorer
            or self.scorer
            or PolicyScorer(self.model, self.cfg.logits_chunk_tokens).to(self.accelerator.device)
        )
        was_training = scorer.training
        scorer.eval()
        n = len(self.data.views[0].tokenized[split])
        bs = self.cfg.batch_size
        metrics = HeldOutMetrics(self.cfg.beta, self.unpaired, self.references is not None)
        progress = self.cfg.progress and self.accelerator.is_local_main_process
        for start in tqdm(range(0, n, bs), desc=f"evaluate ({n} pairs)", disable=not progress, leave=False):
            index = list(range(start, min(n, start + bs)))
            out, _, policy, refs = self._micro_batch(scorer, split, index, grad=False)
            metrics.add(out, policy, refs)
        scorer.train(was_training)
        return {**metrics.result(), "eval_n": n}

    def reference_logps(self, split: str) -> dict[str, torch.Tensor]:
        """Every example's reference log-probs of ``split``, per side [K, N] (reference 0 first)."""
        if self.references is None:
            raise ConfigError("reference_free=true: this run has no reference")
        n = len(self.data.views[0].tokenized[split])
        return self.references.batch(split, list(range(n)), self.sides).logps


def train(config: TrainConfig | str | os.PathLike | dict, overrides: list[str] | None = None) -> RunResult:
    """Train as the config says; returns where the run directory, final model and metrics are."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    trainer = None

    def stage() -> str:
        return trainer.stage if trainer is not None else "setup"

    try:
        # several processes: a failing rank exits at once naming its rank and stage; the others end at
        # their next collective or barrier (dist_timeout_s) instead of hanging
        with preemption.watch(cfg, stage), D.exit_on_error(stage):
            cfg = autoresume.resolve(cfg)  # resume: auto -> true (this run is there) or false
            trainer = Trainer(cfg)
            return trainer.fit()
    finally:
        runlock.release(cfg.output_dir)  # also when the setup failed (a no-op if this process holds none)
