"""From a run's config and a micro-batch's per-sequence tensors to the configured method's loss.

Nothing here names a method: the :class:`~preftune.losses.MethodSpec` says which loss keywords each
component takes from the config (its options) and from the trainer's per-pair tensors (dispersion
``c``, prompt embeddings), and what kind of link it is (a margin, a pair's rewards, the batch, or
unpaired items), so a new component needs no change here. The modifiers that apply to any paired loss
live here: LD-DPO's tail weighting, WPO's pair weights, BCO's running reward shift δ (state that the
trainer checkpoints) and KTO's reference point (reduced over processes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TrainConfig, config_value, resolved_method, validate
from .losses import (
    LossOutput,
    MethodSpec,
    bco_running_delta,
    ld_logps,
    preference_loss,
    unpaired_preference_loss,
    wpo_weights,
)
from .references import MISMATCHED_SIDE


def _length_normalize(cfg: TrainConfig, spec: MethodSpec) -> bool:
    if cfg.length_normalize is not None:
        return cfg.length_normalize
    return spec.length_normalize or cfg.reference_free


def _process_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a per-process scalar over all processes (itself with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


@dataclass
class SideScores:
    """Per-sequence numbers of one micro-batch, by side: ``chosen``/``rejected`` (paired data) or
    ``completion`` (unpaired), and KTO's mismatched side (:data:`MISMATCHED_SIDE`) when scored.

    The policy's have ``[B]`` tensors and every field; the references' have ``[K, B]`` log-probs
    (reference 0 first) and tails."""

    logps: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # completion tokens [B]
    wpo: dict[str, torch.Tensor] = field(default_factory=dict)  # WPO's aligned sums [B], detached
    tail: dict[str, torch.Tensor] = field(default_factory=dict)  # LD-DPO: log-prob beyond the shared length


@dataclass
class LossAdapter:
    """Computes the configured method's :class:`~preftune.losses.LossOutput` for one micro-batch.

    ``state`` holds what persists between steps (BCO's running δ and its count); the trainer saves it
    in checkpoints (:meth:`state_dict` / :meth:`load_state_dict`).
    """

    spec: MethodSpec
    length_normalize: bool
    kwargs: dict[str, Any]
    ld_alpha: float | None = None
    wpo: bool = False
    running_delta: bool = False
    state: dict[str, float] = field(default_factory=lambda: {"bco_delta": 0.0, "bco_count": 0})

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossAdapter:
        """Check the config (and so the method against its references); collect the loss keywords."""
        validate(cfg)  # a TrainConfig built in code has not been through load_config
        spec = resolved_method(cfg)
        kwargs: dict[str, Any] = dict(
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            reference_free=cfg.reference_free,
            gamma=cfg.gamma,
            sft_weight=cfg.sft_weight,
        )
        kwargs.update(spec.option_kwargs(lambda key: config_value(cfg, key)))
        kwargs.update(spec.loss_kwargs)
        if not spec.unpaired:
            if cfg.loss_weights is not None:
                kwargs["loss_weights"] = tuple(cfg.loss_weights)
            if cfg.f_divergence != "reverse_kl":
                kwargs.update(f_divergence=cfg.f_divergence, f_alpha=cfg.f_alpha)
        running = kwargs.get("link_options", {}).get("delta") == "running"
        return cls(spec, _length_normalize(cfg, spec), kwargs, cfg.ld_alpha, cfg.wpo, running)

    # -- what the trainer must supply ----------------------------------------------------------------

    @property
    def needs_tails(self) -> bool:
        """LD-DPO: log-probs of the tokens beyond each pair's shared length, policy and references."""
        return self.ld_alpha is not None and self.ld_alpha != 1.0

    @property
    def needs_mismatched(self) -> bool:
        """KTO: mismatched prompt/completion items, scored by the policy and the reference."""
        return "mismatched" in self.spec.needs

    def state_dict(self) -> dict[str, float]:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        for key in self.state:
            if key in state:
                self.state[key] = type(self.state[key])(state[key])

    # -- the loss ------------------------------------------------------------------------------------

    def __call__(
        self,
        policy: SideScores,
        reference: SideScores,
        *,
        labels: torch.Tensor | None = None,
        dispersion: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> LossOutput:
        """``policy``/``reference``: per-side ``[B]`` / ``[K, B]`` summed log-probs (the policy's with
        lengths, WPO's aligned sums and LD-DPO's tails as the method asks; KTO's mismatched side
        :data:`MISMATCHED_SIDE` in both). ``labels``: unpaired data's desirable items; ``dispersion``
        and ``embeddings``: MallowsPO's c(x), RPO's prompt embeddings, per example."""
        sides: list[str] = [s for s in ("chosen", "rejected", "completion") if s in policy.logps]

        def modified(scores: SideScores, side: str) -> torch.Tensor:
            """LD-DPO's tail weighting, then length normalisation (by the policy's token counts)."""
            logps = scores.logps[side]
            if self.needs_tails and self.ld_alpha is not None:
                logps = ld_logps(logps, scores.tail[side].to(logps.dtype), self.ld_alpha)
            if self.length_normalize:
                logps = logps / policy.lengths[side].clamp(min=1).to(logps.dtype)
            return logps

        policy_logps = {s: modified(policy, s) for s in sides}
        reference_logps = {s: modified(reference, s) for s in sides}
        if self.spec.unpaired:
            assert labels is not None, "unpaired data needs its labels"
            return self._unpaired(policy, reference, policy_logps, reference_logps, labels, embeddings)
        kwargs = dict(self.kwargs)
        if self.wpo:
            kwargs["pair_weights"] = wpo_weights(
                policy.wpo["chosen"],
                policy.wpo["rejected"],
                policy.lengths["chosen"],
                policy.lengths["rejected"],
            )

        def loss(options) -> LossOutput:
            return preference_loss(
                policy_logps["chosen"],
                policy_logps["rejected"],
                reference_logps["chosen"],
                reference_logps["rejected"],
                chosen_lengths=policy.lengths["chosen"],
                **self.spec.step_kwargs({"c": dispersion, "embeddings": embeddings}),
                **options,
            )

        if not self.running_delta:
            return loss(kwargs)
        # BCO's running δ: update with this batch's mean reward first, then the loss uses the new δ;
        # only while training (under no_grad, evaluation leaves the state alone).
        delta = torch.tensor(self.state["bco_delta"], dtype=torch.float64)
        kwargs["link_options"] = {**kwargs["link_options"], "delta": delta}
        if torch.is_grad_enabled():
            first = loss(kwargs)
            assert first.chosen_rewards is not None and first.rejected_rewards is not None  # paired losses
            rewards = torch.cat([first.chosen_rewards.reshape(-1), first.rejected_rewards.reshape(-1)])
            batch_mean = _process_mean(rewards.double().mean())
            count = int(self.state["bco_count"])
            delta, count = bco_running_delta(delta, count, batch_mean.reshape(1), batch_mean.reshape(1))
            self.state.update(bco_delta=float(delta), bco_count=count)
            kwargs["link_options"] = {**kwargs["link_options"], "delta": delta}
        return loss(kwargs)

    def _unpaired(
        self,
        policy: SideScores,
        reference: SideScores,
        policy_logps: dict[str, torch.Tensor],
        reference_logps: dict[str, torch.Tensor],
        labels: torch.Tensor,
        embeddings: torch.Tensor | None,
    ) -> LossOutput:
        if self.spec.takes == "unpaired":  # KTO-style: each item against the reference point
            options = dict(self.kwargs.get("link_options", {}))
            if self.needs_mismatched:
                mismatched = policy.logps[MISMATCHED_SIDE].detach().double()
                mismatched_reference = reference.logps[MISMATCHED_SIDE][0].to(mismatched.device).double()
                options["reference_point"] = _process_mean((mismatched - mismatched_reference).mean()).clamp(
                    min=0.0
                )
            return self.spec.link.impl(
                policy_logps["completion"],
                reference_logps["completion"],
                labels,
                beta=self.kwargs["beta"],
                **options,
            )
        desirable, undesirable = labels.nonzero().flatten(), (~labels).nonzero().flatten()
        completion, reference_completion = policy_logps["completion"], reference_logps["completion"][0]
        kwargs = {k: v for k, v in self.kwargs.items() if k != "link_options"}
        return unpaired_preference_loss(
            completion[desirable],
            reference_completion[desirable],
            None if embeddings is None else embeddings[desirable],
            completion[undesirable],
            reference_completion[undesirable],
            None if embeddings is None else embeddings[undesirable],
            chosen_lengths=policy.lengths["completion"][desirable],
            **kwargs,
        )
