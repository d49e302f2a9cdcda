"""The training recipe, top to bottom: setup (:func:`~preftune.prepare_run.prepare_run`) -> fit ->
evaluate -> checkpoints -> save.

Everything the losses need is a per-sequence tensor: policy log-probs (with grad), reference
log-probs [K, B] (precomputed or online), MallowsPO's dispersion c(x) from the primary reference's
entropies, RPO's prompt embeddings. The loop is plain PyTorch on top of ``accelerate`` (devices,
mixed precision, DDP); one micro-batch is :mod:`preftune.step`'s (built by ``micro_batch``, its loss
by ``micro_batch_loss``).

The components live in their own modules and never import this one: prepare_run (the setup),
step (one micro-batch and the update), checkpointing (and what a resume needs), metrics (the logged
rows), nonfinite (a NaN step), yardsticks (what ``eval_initial/*`` compares with) and rundir (the
run directory's files).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import autoresume, distributed, preemption, runlock
from .checkpointing import (
    SHARDED,
    batch_choices,
    check_checkpoint_format,
    load_checkpoint,
    load_sharded_checkpoint,
    naming_intact_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    write_atomically,
)
from .config import ConfigError, TrainConfig, load_config
from .errors import TrainingError
from .final_model import final_directories, record_final_step, remove_stale_finals, save_final
from .metrics import HeldOutMetrics, MetricsLog, MetricsWindow, log
from .model_card import write_model_cards
from .nonfinite import NonFiniteError, nonfinite_part, skip_or_stop, weights_finite
from .nonfinite import hint as nonfinite_hint
from .prepare_run import PreparedRun, prepare_run
from .progress import bar as progress_bar
from .progress import library_bars
from .reference_identity import initial_policy_index
from .step import (
    DataOrder,
    PolicyScorer,
    StepLoss,
    apply_update,
    make_optimizer,
    micro_batch,
    micro_batch_loss,
)
from .storage import StorageError, one_line, with_intact_hint
from .yardsticks import InitialScores

__all__ = ["RunResult", "Trainer", "TrainingError", "train"]


@dataclass
class RunResult:
    output_dir: Path
    final_model_dir: Path
    metrics_path: Path
    steps: int
    last_metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """The recipe on a prepared run: ``fit()`` trains, ``evaluate()`` measures held-out preference
    metrics, checkpoints are written on the way. ``setup`` is a config (prepared here, see
    :func:`~preftune.prepare_run.prepare_run`) or a run prepared already."""

    def __init__(self, setup: TrainConfig | PreparedRun, *, accelerator=None):
        self.stage = "setup"  # named in the message when this process fails (distributed.exit_on_error)
        self.run = setup if isinstance(setup, PreparedRun) else prepare_run(setup, accelerator)
        self._fit_scorer = None  # the scorer fit() trains (accelerate-wrapped unless sharded)
        cfg = self.run.cfg
        # the yardstick of eval_initial/*: the reference that is the initial policy, else the
        # policy's own step-0 scores of the held-out pairs (kept in this file; see evaluate)
        self.initial_reference: int | None = None
        if self.run.references is not None:
            self.initial_reference = initial_policy_index(cfg.model, cfg.references, cfg.data.chat_template)
        self.initial_scores = InitialScores(self.run.run_dir.held_out_initial)

    # -- one micro-batch ---------------------------------------------------------------------------

    def _micro_batch(self, scorer, split: str, index: list[int], *, grad: bool) -> StepLoss:
        """Policy forward on this process's examples, gathered if the scope is global; then the loss."""
        run = self.run
        acc = run.accelerator
        global_contrast = run.cfg.rpo.contrast_scope == "global" and (
            run.spec.pairing.value != "diagonal" or run.spec.unpaired
        )
        batch = micro_batch(
            run.data.views[0],
            run.references,
            run.inputs,
            split,
            index,
            sides=run.sides,
            share_prompt=run.share_prompt,
            tails=run.adapter.needs_tails,
            device=acc.device,
            gather=acc if grad and acc.num_processes > 1 and global_contrast else None,
        )
        return micro_batch_loss(scorer, run.adapter, batch, grad=grad)

    def _data_order(self) -> DataOrder:
        run = self.run
        cfg, acc = run.cfg, run.accelerator
        return DataOrder(
            len(run.data.views[0].tokenized["train"]),
            cfg.seed,
            run.steps_per_epoch(),
            cfg.batch_size,
            cfg.grad_accum,
            acc.num_processes,
            acc.process_index,
        )

    # -- fit -----------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        return self.run.total_steps()

    def fit(self) -> RunResult:
        """Train; the run directory's lock is released however this ends. The libraries' own bars
        (transformers' "Writing model shards" at each save) follow ``progress``, as in the setup."""
        try:
            with library_bars(self.run.cfg.progress):
                return self._fit()
        finally:
            if self.run.accelerator.is_main_process:
                runlock.release(self.run.output_dir)

    def _fit(self) -> RunResult:
        from transformers import get_scheduler

        run = self.run
        cfg, acc = run.cfg, run.accelerator
        total = run.total_steps()
        if run.finished:
            log(f"already finished: {run.resume_from} is step {total} of {total}; nothing to do", acc)
            return RunResult(run.output_dir, run.run_dir.final, run.run_dir.metrics, total)
        scorer = run.scorer if run.fsdp else PolicyScorer(run.model, cfg.logits_chunk_tokens)
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
        if not run.fsdp:  # FSDP2 is applied by preftune.distributed, not by accelerate
            scorer, optimizer = acc.prepare(scorer, optimizer)
        self._fit_scorer = scorer
        metrics_log = MetricsLog(run.output_dir, cfg.report_to, acc.is_main_process)
        start = self._resume(scorer, optimizer, scheduler, metrics_log)

        bar = progress_bar(
            total=total,
            initial=start,
            desc=f"train {cfg.method}",
            unit="step",
            enabled=cfg.progress and acc.is_local_main_process,
            dynamic_ncols=True,
        )
        if start == 0 and "eval" in run.data.splits:  # the "before" point of every eval curve
            metrics_log.write(0, {"epoch": 0.0, **self.evaluate(scorer, initial=True)})
        window = MetricsWindow()
        last: dict[str, float] = {}
        skipped = 0
        scorer.train()
        per_epoch = run.steps_per_epoch()
        order = self._data_order()
        for step in range(start, total):
            self.stage = f"step {step + 1}"
            micro_batches = order(step)
            losses = []
            for m, index in enumerate(micro_batches):
                sync = m == len(micro_batches) - 1
                if run.fsdp:
                    accumulate = distributed.no_sync(scorer, enabled=not sync)
                else:
                    accumulate = nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(scorer)
                with accumulate:
                    result = self._micro_batch(scorer, "train", index, grad=True)
                    acc.backward(result.output.loss / cfg.grad_accum)
                losses.append(result.output.loss.detach())
                window.add_micro_batch(result.output.metrics, result.tokens)
            bad = nonfinite_part(losses, params, acc)  # before the update: a NaN step must not land
            if bad:
                skipped += 1
                grad_norm, lr = skip_or_stop(cfg, bad, step + 1, optimizer, scheduler, run.output_dir, acc)
            else:
                clip = (
                    distributed.clip_grad_norm_ if run.fsdp else acc.clip_grad_norm_
                )  # FSDP: over all shards
                grad_norm, lr = apply_update(optimizer, scheduler, params, cfg.max_grad_norm, clip)

            loss = acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean").item()
            window.end_step(loss, grad_norm)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # shown by the update: one line per report
            bar.update(1)
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total:
                last = window.row(acc, epoch=done / per_epoch, learning_rate=lr, skipped=skipped)
                metrics_log.write(done, last)
            if (
                run.data.splits[-1] == "eval"
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
        if "eval" in run.data.splits and start < total:  # else its row came before checkpoint-{total}
            held_out = self.evaluate(scorer)
            metrics_log.write(total, {"epoch": total / per_epoch, **held_out})
            last.update(held_out)
        self._checkpoint(total, optimizer, scheduler)
        self.stage = "final save"
        try:
            final = self._save_final(scorer)
        except StorageError as e:  # a full disk: the one line names the intact checkpoint
            raise with_intact_hint(e, run.output_dir) from e.__cause__
        if acc.is_main_process:  # README.md of final/ and final-adapter/ (preftune.model_card)
            written = final_directories(run.output_dir, cfg, acc.num_processes)
            remove_stale_finals(run.output_dir, written, log)  # e.g. a merged final/ of an earlier end
            write_model_cards(run.output_dir, cfg, total, acc.num_processes)
            record_final_step(run.output_dir, total)  # last: the final folders hold step `total`
        metrics_log.close()
        acc.wait_for_everyone()
        log(f"done: {total} steps; model in {final}", acc)
        return RunResult(run.output_dir, final, metrics_log.path, total, last)

    def _resume(self, scorer, optimizer, scheduler, metrics_log: MetricsLog) -> int:
        """Load the checkpoint to resume from (resume=true) into the scorer, optimizer, scheduler and
        the loss's state; returns the step to start at (0 without one)."""
        run = self.run
        cfg, acc = run.cfg, run.accelerator
        if run.resume_from is None:
            if cfg.resume:
                log(f"resume=true but {run.output_dir} has no checkpoint; starting from step 0", acc)
            metrics_log.reset()  # rows of a run killed before its first checkpoint would repeat
            return 0
        self.stage = f"resume from {run.resume_from.name}"
        check_checkpoint_format(run.resume_from, cfg.parallelism)
        if cfg.parallelism == SHARDED:  # any number of processes: DCP reshards on load
            root = scorer if run.fsdp else acc.unwrap_model(scorer)
            state = load_sharded_checkpoint(run.resume_from, root, optimizer, scheduler)
        else:
            state = load_checkpoint(run.resume_from, run.model, optimizer, scheduler)
        start = state["step"]
        run.adapter.load_state_dict(state.get("loss_state", {}))  # BCO's running δ
        if state.get("global_batch") != run.global_batch():
            raise TrainingError(
                f"{run.resume_from} was written with global batch {state.get('global_batch')}, "
                f"this run has {run.global_batch()} (batch_size {cfg.batch_size} x grad_accum "
                f"{cfg.grad_accum} x {acc.num_processes} process(es)): the data order would not continue; "
                + batch_choices(state.get("global_batch"), acc.num_processes)
            )
        metrics_log.truncate_after(start)
        log(f"resumed from {run.resume_from} at step {start}", acc)
        return start

    def _save_final(self, scorer) -> Path:
        """The final model as transformers directories; returns where it is (LoRA: the adapter)."""
        run = self.run
        cfg, acc = run.cfg, run.accelerator
        final = run.run_dir.final
        lora = hasattr(run.model, "peft_config")
        if run.fsdp:  # gathered to rank 0 and saved as transformers directories (LoRA: merged + adapter)
            distributed.save_consolidated(
                scorer,
                final,
                tokenizer=run.tokenizer,
                merge_lora=True,
                adapter_directory=run.run_dir.final_adapter if lora else None,
                timeout_s=cfg.dist_timeout_s,
                write_directory=write_atomically,  # a full disk: one StorageError, .tmp removed
            )
            return final
        if acc.is_main_process:
            model = acc.unwrap_model(scorer).model
            save_final(model, run.tokenizer, run.output_dir, save_merged=cfg.save_merged)
        if lora and not cfg.save_merged:  # LoRA runs keep the adapter alone unless asked
            return run.run_dir.final_adapter
        return final

    # -- checkpoints ---------------------------------------------------------------------------------

    def _checkpoint(self, step: int, optimizer, scheduler) -> None:
        run = self.run
        cfg = run.cfg
        if not weights_finite(run.model):  # e.g. NaN weights loaded from elsewhere: never save them
            raise NonFiniteError(
                f"step {step}: the weights are not finite (NaN/Inf); not saving them; {nonfinite_hint(cfg, None)}"
            )
        self.stage = f"checkpoint {step}"
        distributed.barrier(f"checkpoint {step}: start", cfg.dist_timeout_s)
        state = {
            "step": step,
            "global_batch": run.global_batch(),
            "method": cfg.method,
            "parallelism": cfg.parallelism,
            "loss_state": run.adapter.state_dict(),  # e.g. BCO's running reward shift
        }
        if cfg.parallelism == SHARDED:  # every rank writes its shards (collective)
            root = run.scorer if run.fsdp else run.accelerator.unwrap_model(self._fit_scorer)
            with naming_intact_checkpoint(run.output_dir, resume=False):
                save_sharded_checkpoint(
                    run.output_dir,
                    step,
                    root,
                    optimizer,
                    scheduler,
                    state,
                    cfg.save_total_limit,
                    cfg.dist_timeout_s,
                )
        elif run.accelerator.is_main_process:
            with naming_intact_checkpoint(run.output_dir, resume=True):
                save_checkpoint(
                    run.output_dir,
                    step,
                    run.model,
                    optimizer,
                    scheduler,
                    state,
                    cfg.save_total_limit,
                )
        distributed.barrier(f"checkpoint {step}: done", cfg.dist_timeout_s)

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, scorer=None, split: str = "eval", *, initial: bool = False) -> dict[str, float]:
        """Held-out metrics with TRL's ``eval_`` names (see :class:`preftune.metrics.HeldOutMetrics`).

        ``initial``: the policy is still the initial one (the step-0 evaluation). When no reference is
        the initial policy, its log-probs are then kept (:attr:`initial_scores`) as
        the yardstick of the later evaluations' ``eval_initial/*``."""
        run = self.run
        cfg = run.cfg
        scorer = (
            scorer
            or run.scorer
            or PolicyScorer(run.model, cfg.logits_chunk_tokens).to(run.accelerator.device)
        )
        was_training = scorer.training
        scorer.eval()
        rows = len(run.data.views[0].tokenized[split])
        metrics = HeldOutMetrics(cfg.beta, run.unpaired)
        k = self.initial_reference
        paired = not run.unpaired
        collect = initial and k is None and paired
        data = cfg.data
        source = str(data.eval if split == "eval" else data.train)
        known = self.initial_scores.get(split, source, rows) if k is None and paired and not collect else None
        kept: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
        progress = cfg.progress and run.accelerator.is_local_main_process
        starts = range(0, rows, cfg.batch_size)
        for start in progress_bar(starts, desc=f"evaluate ({rows} pairs)", enabled=progress, leave=False):
            index = list(range(start, min(rows, start + cfg.batch_size)))
            result = self._micro_batch(scorer, split, index, grad=False)
            policy = result.policy.logps
            yardstick = None
            if paired and k is not None:
                yardstick = {side: result.reference.logps[side][k] for side in kept}
            elif known is not None:
                yardstick = {side: known[side][index] for side in kept}
            elif collect:  # step 0: the policy is the initial policy
                yardstick = {side: policy[side] for side in kept}
                for side in kept:
                    kept[side].append(policy[side].float().cpu())
            metrics.add(result.output, policy, yardstick)
        scorer.train(was_training)
        if collect:
            logps = {side: torch.cat(v) for side, v in kept.items()}
            self.initial_scores.keep(split, source, logps, write=run.accelerator.is_main_process)
        return {**metrics.result(), "eval_n": rows}

    def reference_logps(self, split: str) -> dict[str, torch.Tensor]:
        """Every example's reference log-probs of ``split``, per side [K, N] (reference 0 first)."""
        run = self.run
        if run.references is None:
            raise ConfigError("reference_free=true: this run has no reference")
        rows = len(run.data.views[0].tokenized[split])
        return run.references.batch(split, list(range(rows)), run.sides).logps


def explain(
    error: BaseException, output_dir: str | Path | None, hint: str | None = None
) -> tuple[str, int] | None:
    """The one line (and exit code) of an error that explains itself: the trainer's own errors and
    a full disk anywhere (naming ``output_dir``'s intact checkpoint, or saying ``hint``); None for
    the others (a bug: its traceback is printed)."""
    line = one_line(error, output_dir, hint)  # a StorageError, or ENOSPC & co. raised anywhere
    if line is not None:
        return line, 1
    if isinstance(error, TrainingError):
        return " ".join(str(error).split()), getattr(error, "exit_code", 1)
    if isinstance(error, ConfigError):
        return " ".join(str(error).split()), 2
    return None


def train(config: TrainConfig | str | os.PathLike | dict, overrides: list[str] | None = None) -> RunResult:
    """Train as the config says; returns where the run directory, final model and metrics are."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    trainer = None

    def stage() -> str:
        return trainer.stage if trainer is not None else "setup"

    try:
        # several processes: a failing rank exits at once naming its rank and stage; the others end at
        # their next collective or barrier (dist_timeout_s) instead of hanging
        with (
            preemption.watch(cfg, stage),
            distributed.exit_on_error(stage, explain=lambda e: explain(e, cfg.output_dir)),
        ):
            cfg = autoresume.resolve(cfg)  # resume: auto -> true (this run is there) or false
            trainer = Trainer(cfg)
            return trainer.fit()
    finally:
        runlock.release(cfg.output_dir)  # also when the setup failed (a no-op if this process holds none)
