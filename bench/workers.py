"""One framework on one workload, in its own process: setup, warm-up, timed steps, peak memory.

Every worker times whole optimiser steps (data collation, forward, loss, backward, gradient
clipping, AdamW step) and measures peak memory from the end of setup (model loaded, data ready,
references precomputed) to the last step:
- CPU: the kernel's RSS high-water mark (VmHWM), reset through /proc/self/clear_refs at the end of
  setup; reported as the peak over the setup baseline ("train memory") and as the absolute peak.
  Where clear_refs is not writable, a thread samples RSS every millisecond instead (and says so).
- GPU: torch.cuda.max_memory_allocated(), reset at the end of setup; absolute and over the baseline.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import replace

import torch
from workloads import (
    Workload,
    apply_lora,
    as_text,
    build_model,
    describe_params,
    flops_per_step,
    model_vocab,
    peak_flops,
    synthetic_pairs,
    total_steps,
    word_tokenizer,
)

# --------------------------------------------------------------------------------------------------
# Measurement


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def allocator_env() -> dict:
    """The C allocator's settings from the environment (they change what RSS measures: NOTES.md)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        self._sampler = None
        self._peak_kb = 0
        self._stop = threading.Event()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.base_mb = _proc_status_kb("VmRSS") / 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM (reset at end of setup)"
        except OSError:
            self.method = "RSS sampled every 1 ms"
            self._peak_kb = _proc_status_kb("VmRSS")
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_kb = max(self._peak_kb, _proc_status_kb("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._peak_kb / 1024
        else:
            peak = _proc_status_kb("VmHWM") / 1024
        return {
            "memory_method": self.method,
            "base_mb": self.base_mb,
            "peak_abs_mb": peak,
            "peak_mb": peak - self.base_mb,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summarize(w: Workload, times: list[float], model, device: torch.device) -> dict:
    timed = times[w.warmup :]
    med = statistics.median(timed)
    total, body = describe_params(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    flops = flops_per_step(w, body, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size)
    out = {
        "step_times": times,
        "median_s": med,
        "tokens_per_s": 2 * w.batch * w.seq / med,
        "flops_per_step": flops,
        "params": total,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        out["device_name"] = name
        peak = peak_flops(name)
        out["peak_flops"] = peak
        out["mfu"] = flops / med / peak if peak else None
    return out


# --------------------------------------------------------------------------------------------------
# preftune


def _references(w: Workload, model, rows, k: int, device, autocast_dtype):
    """[k, N] chosen and rejected log-probs: a distinct random model per reference for tiny models,
    the initial policy (adapters off under LoRA) for presets (k must then be 1)."""
    from preftune.scoring import score_dataset

    prompts = [r[0] for r in rows] * 2
    completions = [r[1] for r in rows] + [r[2] for r in rows]
    n = len(rows)
    out = []
    for i in range(k):
        if w.model == "tiny":
            ref = build_model(w, seed_offset=i + 1)
            ctx = torch.no_grad()
        else:
            if i:
                raise ValueError("preset workloads use the initial policy as their one reference")
            ref = model
            ctx = model.disable_adapter() if w.lora else torch.no_grad()
        with ctx:
            scores = score_dataset(
                ref,
                prompts,
                completions,
                pad_token_id=0,
                device=device,
                with_entropy=False,
                autocast_dtype=autocast_dtype,
                batch_tokens=2 * w.batch * w.seq,
            )
        out.append(scores.logps)
        if ref is not model:
            del ref
    logps = torch.stack(out)  # [k, 2N]
    return logps[:, :n], logps[:, n:]


def trainable_policy(w: Workload):
    """The policy as preftune's trainer prepares it: LoRA adapters and activation checkpointing as the
    workload asks, in training mode."""
    from preftune.models.loading import enable_activation_checkpointing

    model = build_model(w)
    if w.lora:
        model = apply_lora(w, model)
    if w.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if w.lora:
            model.enable_input_require_grads()
    model.train()
    return model


def _loss_adapter(method: str, beta: float):
    """The trainer's LossAdapter for ``method``, from a config as the trainer's."""
    from preftune.config import MRPOConfig, TrainConfig
    from preftune.method_adapter import LossAdapter

    # the references are tensors fed by the workload, not configured models: the config lists none
    cfg = TrainConfig(method=method, beta=beta, mrpo=MRPOConfig(allow_single_reference=True))
    return LossAdapter.from_config(cfg)


def _profile_table(prof, device: torch.device, rows: int = 30) -> tuple[str, list[dict]]:
    """torch.profiler's operator table of one step, sorted by self device time (self CPU time on the
    CPU), and its top rows as numbers."""
    events = prof.key_averages()
    if device.type == "cuda":
        key = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") else None
        key = key or "self_cuda_time_total"
    else:
        key = "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=rows)
    top = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:rows]
    total = sum(getattr(e, key, 0) or 0 for e in events) or 1
    return table, [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": (getattr(e, key, 0) or 0) / 1e3,
            "share": (getattr(e, key, 0) or 0) / total,
        }
        for e in top
    ]


def run_preftune(
    w: Workload, method: str, share_prompt: bool | None = None, profile_to: str | None = None
) -> dict:
    """preftune's training step as the trainer runs it: the same functions of ``preftune.step``
    (collation, scoring, loss, clip + AdamW update), fed from synthetic pairs instead of a dataset.

    ``share_prompt`` collates each pair as one ``prompt | chosen | rejected`` row instead of two;
    None decides per batch as the trainer's automatic mode does (``sharing_pays``). ``method="alternate"`` alternates DPO
    (reference 0) and MRPO (all references) steps in one process, so that the small difference
    between them is not drowned by a busy machine; it returns both under "split".

    ``profile_to``: after the timed steps, one more step (the first batch again, untimed) runs under
    ``torch.profiler``; its operator table is written there and its top rows returned as "profile".
    """
    from preftune.method_adapter import SideScores
    from preftune.references import PAIRED_SIDES
    from preftune.step import (
        MicroBatch,
        PolicyScorer,
        apply_update,
        make_optimizer,
        micro_batch_loss,
        shares_prompt,
    )

    device = torch.device(w.device)
    t0 = time.perf_counter()
    schedule = ["dpo", "mrpo"] * total_steps(w) if method == "alternate" else [method] * total_steps(w)
    rows = synthetic_pairs(replace(w, warmup=0, steps=len(schedule)), model_vocab(w))
    model = trainable_policy(w)
    autocast_dtype = torch.bfloat16 if w.precision == "bf16" else None
    k = w.references if method in ("mrpo", "alternate") else 1
    ref_c, ref_r = _references(w, model, rows, k, device, autocast_dtype)
    adapters = {"dpo": _loss_adapter("dpo", w.beta), "mrpo": _loss_adapter("mrpo", w.beta)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=w.learning_rate, weight_decay=0.0, device=device)
    scorer = PolicyScorer(model, autocast_dtype=autocast_dtype)
    setup_s = time.perf_counter() - t0

    meter = MemoryMeter(device)
    meter.start()
    times, losses, checks = [], [], {}
    shared_steps = 0
    b = w.batch

    def one_step(step: int, step_method: str):
        part = rows[step * b : (step + 1) * b]
        prompts = [r[0] for r in part] * 2
        completions = [r[1] for r in part] + [r[2] for r in part]
        share = shares_prompt(share_prompt, prompts, completions)
        sl = slice(step * b, (step + 1) * b)
        refs = slice(None) if step_method == "mrpo" else slice(0, 1)
        batch = MicroBatch(
            prompts,
            completions,
            PAIRED_SIDES,
            SideScores({"chosen": ref_c[refs, sl].to(device), "rejected": ref_r[refs, sl].to(device)}),
            pad_token_id=0,
            device=device,
            share=share,
        )
        out, _, policy, _ = micro_batch_loss(scorer, adapters[step_method], batch)
        out.loss.backward()
        apply_update(opt, None, params, 1.0)
        loss = out.loss.item()
        _sync(device)
        return loss, share, policy

    for step, step_method in enumerate(schedule):
        t = time.perf_counter()
        loss, share, policy = one_step(step, step_method)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        shared_steps += bool(share)
        if step == 0:
            checks = {
                "loss_step0": losses[0],
                "logps_chosen_step0": policy.logps["chosen"].mean().item(),
                "logps_rejected_step0": policy.logps["rejected"].mean().item(),
            }
    mem = meter.stop()
    checks["loss_last"] = losses[-1]
    profiled = {}
    if profile_to:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            one_step(0, schedule[0])
        table, top = _profile_table(prof, device)
        with open(profile_to, "w") as f:
            f.write(f"one {schedule[0]} step of {w.title}, {w.batch} pairs, share_prompt={share_prompt}\n")
            f.write(table)
        profiled = {"profile": {"table": profile_to, "top": top}}
    if method == "alternate":
        split = {}
        for name, m in (("preftune", "dpo"), ("preftune-mrpo", "mrpo")):
            mine = [t for t, sm in zip(times, schedule) if sm == m]
            split[name] = {
                **summarize(w, mine, model, device),
                **mem,
                "setup_s": setup_s,
                "settings": f"preftune {m} ({k if m == 'mrpo' else 1} precomputed reference(s)), steps "
                "alternating with the other method in one process (memory: that process)",
            }
        return {"split": split}
    return {
        **summarize(w, times, model, device),
        **mem,
        "setup_s": setup_s,
        "checks": checks,
        "settings": f"preftune {method}: fused chunked completion-only log-probs, {k} precomputed reference(s), "
        + f"one shared-prompt row per pair in {shared_steps}/{len(schedule)} steps ("
        + ("automatic rule), " if share_prompt is None else "forced), ")
        + f"{w.precision}, fused AdamW (weight_decay 0, clip 1.0), "
        + ("gradient checkpointing" if w.gradient_checkpointing else "no gradient checkpointing"),
        **profiled,
    }


# --------------------------------------------------------------------------------------------------
# Supervised floors: the same policy forward + backward + AdamW on the same 2·B sequences


def run_sft(w: Workload, path: str) -> dict:
    from preftune.data.collate import collate_sequences
    from preftune.scoring import score_batch
    from preftune.step import apply_update, make_optimizer

    device = torch.device(w.device)
    t0 = time.perf_counter()
    rows = synthetic_pairs(w, model_vocab(w))
    model = trainable_policy(w)
    autocast_dtype = torch.bfloat16 if w.precision == "bf16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=w.learning_rate, weight_decay=0.0, device=device)
    setup_s = time.perf_counter() - t0
    meter = MemoryMeter(device)
    meter.start()
    times = []
    b = w.batch
    for step in range(total_steps(w)):
        t = time.perf_counter()
        part = rows[step * b : (step + 1) * b]
        batch = collate_sequences(
            [r[0] for r in part] * 2, [r[1] for r in part] + [r[2] for r in part], 0, device
        )
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            if path == "hf":  # the standard path: full logits, token-level cross-entropy
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                loss = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
                ).loss
            else:  # preftune's chunked scoring, mean token NLL
                scores = score_batch(model, **batch)
                loss = -scores.logps.sum() / scores.n_tokens.sum()
        loss.backward()
        apply_update(opt, None, params, 1.0)
        loss.item()
        _sync(device)
        times.append(time.perf_counter() - t)
    mem = meter.stop()
    what = (
        "HF model(input_ids, labels=...) cross-entropy (materialises logits)"
        if path == "hf"
        else "preftune chunked scoring, mean token NLL"
    )
    return {**summarize(w, times, model, device), **mem, "setup_s": setup_s, "settings": f"SFT floor: {what}"}


# --------------------------------------------------------------------------------------------------
# TRL


def trl_settings(w: Workload) -> dict:
    """TRL's best settings for this job: precomputed references, no gradient checkpointing (unless
    both use it), the trainer's fused chunked LM head (always on in TRL 1.16)."""
    cuda = w.device == "cuda"
    return dict(
        per_device_train_batch_size=w.batch,
        max_steps=total_steps(w),
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        beta=w.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=w.batch,
        gradient_checkpointing=w.gradient_checkpointing,
        bf16=w.precision == "bf16",
        fp16=False,
        use_cpu=not cuda,
        max_length=None,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=w.seed,
    )


def run_trl(w: Workload) -> dict:
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = torch.device(w.device)
    t0 = time.perf_counter()
    vocab = model_vocab(w)
    rows = synthetic_pairs(w, vocab)
    dataset = Dataset.from_list(
        [
            {"prompt": as_text(p, False), "chosen": as_text(c, True), "rejected": as_text(r, True)}
            for p, c, r in rows
        ]
    )
    model = build_model(w)
    if w.lora:  # wrapped here so that the adapters start from the same weights as preftune's
        model = apply_lora(w, model)
    ref_model = build_model(w, seed_offset=1) if w.model == "tiny" else None
    settings = trl_settings(w)
    tmp = tempfile.mkdtemp(prefix="preftune-bench-trl-")
    args = DPOConfig(output_dir=tmp, **settings)

    times: list[float] = []
    logs: list[dict] = []
    meter = MemoryMeter(device)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _sync(device)
            meter.start()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs_copy = dict(logs)
                logs_copy["step"] = state.global_step
                all_logs.append(logs_copy)

    all_logs = logs
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=word_tokenizer(vocab),
        callbacks=[Timer()],
    )

    for i, (p, c, r) in enumerate(rows[:8]):
        got = trainer.train_dataset[i]
        assert (got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]) == (p, c, r), (
            i,
            {k: len(v) for k, v in got.items() if k.endswith("_ids")},
            "TRL tokenized the benchmark's text to other token ids than preftune scores",
        )
    setup_s = time.perf_counter() - t0
    trainer.train()
    # the Trainer turns checkpointing on inside train(), on the model under any peft wrapper
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    flag = (
        "is_activation_checkpointing"
        if hasattr(base, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    checkpointing = bool(getattr(base, flag, False))
    assert checkpointing == w.gradient_checkpointing, "TRL's gradient checkpointing is not what was asked"
    mem = meter.stop()
    by_step = {entry["step"]: entry for entry in logs}
    checks = {}
    if 1 in by_step:
        checks = {
            "loss_step0": by_step[1].get("loss"),
            "logps_chosen_step0": by_step[1].get("logps/chosen"),
            "logps_rejected_step0": by_step[1].get("logps/rejected"),
        }
    last = max(by_step) if by_step else None
    if last is not None:
        checks["loss_last"] = by_step[last].get("loss")
    import trl

    shown = {
        k: v for k, v in settings.items() if k not in ("seed", "disable_tqdm", "report_to", "save_strategy")
    }
    return {
        **summarize(w, times, trainer.model, device),
        **mem,
        "setup_s": setup_s,
        "checks": checks,
        "settings": f"TRL {trl.__version__} DPOTrainer: "
        + ", ".join(f"{k}={v}" for k, v in shown.items())
        + (", peft LoRA r=16 (all linear)" if w.lora else "")
        + (", ref_model=distinct random model" if ref_model is not None else ", reference = initial policy"),
    }


def run(w: Workload, framework: str) -> dict:
    torch.manual_seed(w.seed)
    if framework == "preftune":
        return run_preftune(w, "dpo")
    if framework == "preftune-mrpo":
        return run_preftune(w, "mrpo")
    if framework == "preftune-alternate":
        return run_preftune(w, "alternate")
    if framework == "preftune-shared":
        return run_preftune(w, "dpo", share_prompt=True)
    if framework == "preftune-plain":
        return run_preftune(w, "dpo", share_prompt=False)
    if framework == "sft-hf":
        return run_sft(w, "hf")
    if framework == "sft-preftune":
        return run_sft(w, "preftune")
    if framework == "trl":
        return run_trl(w)
    raise ValueError(f"unknown framework {framework!r}")


def env_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
