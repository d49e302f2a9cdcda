"""A run's setup, as one straight function: :func:`prepare_run` (config -> :class:`PreparedRun`).

``preftune train`` (the :class:`~preftune.trainer.Trainer`), ``preftune precompute`` and
``preftune eval`` all start here. The stages run in the order :func:`prepare_run` lists; each reads
only what the stages before it made.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .cache import default_cache_dir
from .checkpointing import prepare_output_dir, save_run_tokenizer, select_resume_checkpoint
from .config import ConfigError, TrainConfig, save_config
from .data.check import check_data
from .data.prepare import PreparedData, carve_validation, prepare_data
from .final_model import recorded_final_step
from .losses import MethodSpec, calibrate_phi_star, neg_log_dispersion, resolve_method
from .method_adapter import LossAdapter
from .metrics import log
from .models.loading import check_model_paths, load_policy, load_tokenizer, mixed_precision
from .mrpo_validation import fixed_weights, uses_validation_weights, with_weights
from .progress import library_bars
from .references import (
    MISMATCHED_SIDE,
    PAIRED_SIDES,
    UNPAIRED_SIDES,
    OnlineReferences,
    PrecomputedReferences,
    precompute_references,
)
from .rundir import CHECKPOINT_STATE, RunDir
from .scoring_probe import shared_prompt_support
from .seeding import set_seed
from .step import PolicyScorer, StepInputs
from .threads import configure_threads
from .trackers import require_trackers

__all__ = ["PreparedRun", "prepare_run"]


@dataclass
class PreparedRun:
    """Everything a run's steps read: what :func:`prepare_run` made, in the order it made it."""

    cfg: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    spec: MethodSpec
    sides: tuple[str, ...]  # the sides a micro-batch scores: chosen, rejected (or completion), KTO's kl
    fsdp: bool  # the policy is sharded (parallelism=fsdp over several processes)
    output_dir: Path
    run_dir: RunDir
    resume_from: Path | None  # the newest intact checkpoint (resume=true)
    cache_root: Path
    model: torch.nn.Module
    tokenizer: Any
    data: PreparedData
    loading_report: dict
    adapter: LossAdapter
    share_prompt: bool | None  # True/False: always/never; None: decided per micro-batch
    autocast_dtype: torch.dtype | None
    references: PrecomputedReferences | OnlineReferences | None  # None: reference_free
    validation: dict | None = None  # mrpo.weights=validation: the accuracies and the weights
    scorer: torch.nn.Module | None = (
        None  # under FSDP: the sharded PolicyScorer, the only module that may run
    )
    phi_star: float | None = None
    inputs: StepInputs = field(default_factory=StepInputs)
    finished: bool = False  # resume=true on a run that already has its final model

    @property
    def unpaired(self) -> bool:
        return self.spec.unpaired

    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def steps_per_epoch(self) -> int:
        rows = len(self.data.views[0].tokenized["train"])
        steps = rows // self.global_batch()
        if steps == 0:
            raise ConfigError(
                f"the training data has {rows} usable examples, fewer than one global batch "
                f"(batch_size × grad_accum × processes = {self.global_batch()})"
            )
        return steps

    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch()))


def prepare_run(cfg: TrainConfig, accelerator=None, *, training: bool = True) -> PreparedRun:
    """Set up a run: every stage once, in this order (each needs the ones before it).

    1. the method (:class:`~preftune.losses.MethodSpec`) and the sides a micro-batch scores;
       the accelerator (every collective times out);
    2. the inputs, before any weights load and before anything is written: the data, every model
       path (policy, references, RPO's embedder), the loss adapter (it refuses what the method
       cannot do and says whether the references need LD-DPO's tails), the data tokenized for the
       policy and for each reference (tokenizers only; with ``mrpo.weights=validation``, validation
       rows held out before anything scores the data) and whether it holds one global batch;
    3. the run directory (created and locked only now: a bad input leaves none behind); the
       checkpoint to resume from; the seed;
    4. the policy's weights (LoRA, activation checkpointing);
    5. the references (precomputed into the cache, or online);
    6. MRPO's validation weights, from the references' scores of the validation rows (the adapter is
       rebuilt with them);
    7. sharding (FSDP2), after LoRA / activation checkpointing (the policy) and the precomputed
       references (which score with the unsharded policy);
    8. the per-example step inputs (MallowsPO's dispersion, RPO's embeddings);
    9. config.yaml, run_state.json and the tokenizer (``tokenizer/``, once per run: checkpoints do
       not carry it), written once the inputs proved usable (a failed start keeps the old ones),
       unless the run has finished already.

    ``training=False`` prepares a held-out evaluation (``preftune eval``): ``data.eval`` is the only
    split, under its own name, and nothing is carved out of it or calibrated on it.
    The libraries' own progress bars (transformers' "Loading weights", datasets') follow
    ``progress`` and are off when stderr is not a terminal (:func:`preftune.progress.library_bars`).
    """
    with library_bars(cfg.progress):
        return _prepare_run(cfg, accelerator, training)


def _prepare_run(cfg: TrainConfig, accelerator, training: bool) -> PreparedRun:
    from accelerate import Accelerator

    spec = resolve_method(cfg.method)
    sides = UNPAIRED_SIDES if spec.unpaired else PAIRED_SIDES
    if "mismatched" in spec.needs:  # KTO's reference point: mismatched items, scored last
        sides += (MISMATCHED_SIDE,)
    acc = accelerator or Accelerator(
        mixed_precision=mixed_precision(cfg),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[distributed.process_group_kwargs(cfg.dist_timeout_s)],  # every collective times out
    )

    def say(message: str) -> None:
        log(message, acc)

    # FSDP shards only over several processes; the checkpoint format follows the key regardless
    fsdp = cfg.parallelism == "fsdp" and acc.num_processes > 1
    distributed.barrier("start", cfg.dist_timeout_s)  # every rank is up (and NCCL's side gloo group exists)
    require_trackers(cfg.report_to)  # a requested tracker that is not installed: before any model loads
    # data errors surface here, all at once, before any model loads (preftune.data.check)
    data_check = check_data(cfg, unpaired=spec.unpaired, log=say, training=training)
    # then every model path and the method's settings: a bad one leaves no run directory behind
    policy_path = check_model_paths(cfg)[0]  # the policy and every reference, before any weights load
    if spec.needs_embeddings:
        _check_embedder(cfg.rpo.embedder)
    adapter = LossAdapter.from_config(cfg)  # refuses what the method cannot do, before anything is scored
    if spec.needs_entropy and (cfg.reference_free or cfg.reference_mode != "precompute"):
        raise ConfigError(MALLOWS_NEEDS_PRECOMPUTE)
    # intra-op threads from the CPUs this process may use; after the checks, so that a command refused
    # for its input says only why, not also how busy the machine is
    configure_threads(cfg.threads, log=log)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # the data tokenized with the policy's tokenizer (no weights yet): too-long rows are refused here
    tokenizer = load_tokenizer(policy_path)
    data = prepare_data(
        cfg,
        tokenizer,
        policy_path,
        spec.unpaired,
        log=say,
        node_first=acc.local_main_process_first,
        loaded=data_check.loaded,
        training=training,
    )
    validation_rows = None
    if training and uses_validation_weights(cfg, spec):  # held out before anything scores the data
        validation_rows = carve_validation(data, cfg.mrpo.validation_fraction, cfg.seed)
    loading_report = data_check.report  # rows skipped while loading (read from the loaded splits)
    data_check.loaded.clear()  # streamed splits (row offsets); only the token stores stay
    if training:  # an evaluation (data.eval alone) has no training batch to fit
        _check_batch_fits(cfg, len(data.views[0].tokenized["train"]), acc.num_processes)

    # only now the run directory: created and locked once every input proved usable
    output_dir = prepare_output_dir(cfg, log=say) if acc.is_main_process else Path(cfg.output_dir)
    acc.wait_for_everyone()
    # the newest intact checkpoint (damaged ones are skipped, saying why) before any model loads
    resume_from = select_resume_checkpoint(output_dir, say) if cfg.resume else None
    set_seed(cfg.seed)
    model, _, _ = load_policy(
        cfg, acc.device, tokenizer
    )  # the tokenizer the data was tokenized with, loaded once

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    run = PreparedRun(
        cfg,
        acc,
        spec,
        sides,
        fsdp,
        output_dir,
        RunDir(output_dir),
        resume_from,
        cache_root,
        model,
        tokenizer,
        data,
        loading_report,
        adapter,
        _share_prompt(cfg, model, spec.unpaired, acc),
        autocast_dtype,
        _references(cfg, acc, data, sides, model, cache_root, autocast_dtype, adapter),
    )
    if validation_rows is not None:
        run.validation = fixed_weights(cfg, run.references, validation_rows)
        say(
            f"mrpo.weights=validation: accuracies {run.validation['accuracies']} -> "
            f"weights {run.validation['weights']} ({len(validation_rows)} validation rows)"
        )
        run.adapter = LossAdapter.from_config(with_weights(cfg, run.validation["weights"]))
    if fsdp:
        run.scorer = _shard(run)
    run.inputs = _step_inputs(run)
    run.finished = _already_finished(run)
    if acc.is_main_process and not run.finished:
        save_config(cfg, run.run_dir.config)
        rows = {**data.report, **run.loading_report}  # rows skipped while loading, too
        state = {"phi_star": run.phi_star, "data": rows, "method": spec.method}
        final_step = recorded_final_step(output_dir) if resume_from is not None else None
        if final_step is not None:  # the final folders of an earlier end stay until this run saves its own
            state["final_step"] = final_step
        if run.validation is not None:
            state["mrpo_validation"] = run.validation
        run.run_dir.run_state.write_text(json.dumps(state, indent=1))
        save_run_tokenizer(output_dir, tokenizer)  # once per run: checkpoints do not carry it
    return run


# -- the stages ------------------------------------------------------------------------------------


def _check_embedder(embedder: str) -> None:
    """RPO's prompt embedder exists (a one-line ConfigError naming ``rpo.embedder`` otherwise)."""
    from .embeddings import resolve_embedder

    try:
        resolve_embedder(embedder)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def _check_batch_fits(cfg: TrainConfig, rows: int, processes: int) -> None:
    """Fewer usable training rows than one global batch can never train: said before anything is
    written (the message :meth:`PreparedRun.steps_per_epoch` would give at the first step)."""
    batch = cfg.batch_size * cfg.grad_accum * processes
    if rows < batch:
        raise ConfigError(
            f"the training data has {rows} usable examples, fewer than one global batch "
            f"(batch_size × grad_accum × processes = {batch})"
        )


MALLOWS_NEEDS_PRECOMPUTE = "MallowsPO needs the primary reference's entropies: use reference_mode=precompute"


def _share_prompt(cfg: TrainConfig, model, unpaired: bool, acc) -> bool | None:
    """True/False: always/never share a pair's prompt; None: decide per micro-batch
    (:func:`preftune.step.shares_prompt`)."""
    if unpaired:
        if cfg.share_prompt:
            raise ConfigError("share_prompt: unpaired data has one completion per prompt, nothing to share")
        return False
    why_not = shared_prompt_support(model, cfg.max_length)
    if cfg.share_prompt is None:
        if why_not or acc.device.type != "cpu":
            reason = (
                why_not or "not measured on accelerators yet, where the custom mask costs the fast kernels"
            )
            log(f"share_prompt (auto): off ({reason})", acc)
            return False
        return None
    if cfg.share_prompt and why_not:
        raise ConfigError(f"share_prompt: true is not possible with this model: {why_not}")
    return bool(cfg.share_prompt)


def _references(cfg, acc, data, sides, model, cache_root, autocast_dtype, adapter):
    if cfg.reference_free:
        return None
    if cfg.reference_mode == "online":
        return OnlineReferences(
            data.reference_views, policy=model, device=acc.device, autocast_dtype=autocast_dtype
        )
    # every process scores its share of the rows; the main one writes the merged cache entry
    return precompute_references(
        data.reference_views,
        data.splits,
        sides,
        policy=model,
        cache_root=cache_root,
        device=acc.device,
        autocast_dtype=autocast_dtype,
        progress=cfg.progress and acc.is_local_main_process,
        log=lambda m: log(m, acc),
        tails=adapter.needs_tails,
    )


def _shard(run: PreparedRun):
    """The policy's scorer sharded with FSDP2 (each decoder layer, the scorer as root)."""
    cfg, acc = run.cfg, run.accelerator
    mp = distributed.mixed_precision_policy(cfg.precision, acc.device)
    root = distributed.shard_policy(PolicyScorer(run.model, cfg.logits_chunk_tokens), mp_policy=mp)
    if isinstance(run.references, OnlineReferences):
        run.references.policy_root = root  # the LoRA reference runs through the root too
    log(f"parallelism=fsdp: policy sharded over {acc.num_processes} processes", acc)
    return root


def _step_inputs(run: PreparedRun) -> StepInputs:
    """MallowsPO's dispersion c(x) (sets ``run.phi_star``) and RPO's prompt embeddings, per split."""
    cfg, spec, references, acc = run.cfg, run.spec, run.references, run.accelerator
    inputs = StepInputs()
    if spec.needs_entropy:
        if not isinstance(references, PrecomputedReferences):  # refused before the run started
            raise ConfigError(MALLOWS_NEEDS_PRECOMPUTE)
        entropies = {
            split: (references.entropies(split, "chosen"), references.entropies(split, "rejected"))
            for split in run.data.splits
        }
        started = time.perf_counter()
        phi_star = cfg.mallows.phi_star
        if phi_star == "auto" and "train" not in entropies:  # a held-out evaluation
            raise ConfigError(
                "mallows.phi_star: auto is calibrated on the training set, which an evaluation does not "
                "load; set the number the run trained with"
            )
        if phi_star == "auto":
            phi_star = calibrate_phi_star(*entropies["train"])
            log(f"mallows.phi_star=auto -> {phi_star:.4f} (mean c(x) over the training set is 1)", acc)
        run.phi_star = float(phi_star)
        for split, (chosen_entropy, rejected_entropy) in entropies.items():
            inputs.dispersion_c[split] = neg_log_dispersion(
                chosen_entropy, rejected_entropy, run.phi_star
            ).float()
        counts = ", ".join(f"{len(chosen)} {split}" for split, (chosen, _) in entropies.items())
        log(
            f"MallowsPO dispersion c(x): the primary reference's token entropies of {counts} pairs "
            f"(scored with its log-probs), phi_star {run.phi_star:.4f}, "
            f"in {time.perf_counter() - started:.2f} s",
            acc,
        )
    if spec.needs_embeddings:
        from .embeddings import embed_prompts

        for split in run.data.splits:  # sharded over the processes like the reference scores
            inputs.embeddings[split] = embed_prompts(
                run.data.views[0].prompt_texts(split),
                embedder=cfg.rpo.embedder,
                cache_root=run.cache_root,
                progress=cfg.progress and run.accelerator.is_local_main_process,
                log=lambda message: log(message, run.accelerator),
                label=split,
            )
    return inputs


def _already_finished(run: PreparedRun) -> bool:
    """resume=true on a run whose last checkpoint is its last step and whose final model exists and
    holds that step (``final_step``: a final model of an earlier end, of a run resumed to a later
    step and stopped before it saved its own, is not this run's)."""
    saved = run.run_dir.final.is_dir() or run.run_dir.final_adapter.is_dir()  # LoRA: the adapter alone
    if run.resume_from is None or not saved:
        return False
    step = json.loads((run.resume_from / CHECKPOINT_STATE).read_text()).get("step", 0)
    final_step = recorded_final_step(run.output_dir)
    return step >= run.total_steps() and final_step in (None, step)  # None: written before it was recorded
