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

from . import losses as L
from .config import ConfigError, TrainConfig, config_value, resolved_method, validate


def _length_normalize(cfg: TrainConfig, spec: L.MethodSpec) -> bool:
    if cfg.length_normalize is not None:
        return cfg.length_normalize
    return spec.length_normalize or cfg.reference_free


def _process_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a per-process scalar over all processes (itself with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


@dataclass
class LossAdapter:
    """Computes the configured method's :class:`~preftune.losses.LossOutput` for one micro-batch.

    ``state`` holds what persists between steps (BCO's running δ and its count); the trainer saves it
    in checkpoints (:meth:`state_dict` / :meth:`load_state_dict`).
    """

    spec: L.MethodSpec
    length_normalize: bool
    kwargs: dict[str, Any]
    ld_alpha: float | None = None
    wpo: bool = False
    running_delta: bool = False
    state: dict[str, float] = field(default_factory=lambda: {"bco_delta": 0.0, "bco_count": 0})

    @classmethod
    def from_config(cls, cfg: TrainConfig, num_references: int) -> LossAdapter:
        """Check the method against the references actually prepared; collect the loss keywords."""
        validate(cfg)  # a TrainConfig built in code has not been through load_config
        spec = resolved_method(cfg)
        if num_references > 1 and not spec.multi_reference:
            raise ConfigError(
                f"method {cfg.method!r} uses one reference but {num_references} are configured; "
                "use mrpo or mdpo (optionally composed, e.g. mrpo+mallows_theta)"
            )
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
        policy: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor],
        refs: dict,
        c: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> L.LossOutput:
        """``policy``/``refs``: per-side ``[B]`` / ``[K, B]`` summed log-probs; ``lengths`` per side.

        Optional entries: ``<side>_tail`` (policy and refs; LD-DPO), ``<side>_wpo`` (policy; WPO's
        aligned sums), ``kl`` (policy and refs; KTO's mismatched items).
        """
        sides = [s for s in ("chosen", "rejected", "completion") if s in policy]

        def norm(x, side):
            return x / lengths[side].clamp(min=1).to(x.dtype) if self.length_normalize else x

        def ld(values, side):
            x = values[side]
            if self.needs_tails and self.ld_alpha is not None:
                x = L.ld_logps(x, values[f"{side}_tail"].to(x.dtype), self.ld_alpha)
            return x

        pol = {s: norm(ld(policy, s), s) for s in sides}
        ref = {s: norm(ld(refs, s), s) for s in sides}
        if self.spec.unpaired:
            return self._unpaired(policy, pol, ref, lengths, refs, embeddings)
        kwargs = dict(self.kwargs)
        if self.wpo:
            kwargs["pair_weights"] = L.wpo_weights(
                policy["chosen_wpo"], policy["rejected_wpo"], lengths["chosen"], lengths["rejected"]
            )

        def loss(options) -> L.LossOutput:
            return L.preference_loss(
                pol["chosen"],
                pol["rejected"],
                ref["chosen"],
                ref["rejected"],
                chosen_lengths=lengths["chosen"],
                **self.spec.step_kwargs({"c": c, "embeddings": embeddings}),
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
            delta, count = L.bco_running_delta(delta, count, batch_mean.reshape(1), batch_mean.reshape(1))
            self.state.update(bco_delta=float(delta), bco_count=count)
            kwargs["link_options"] = {**kwargs["link_options"], "delta": delta}
        return loss(kwargs)

    def _unpaired(self, policy, pol, ref, lengths, refs, embeddings) -> L.LossOutput:
        labels = lengths["label"]
        if self.spec.takes == "unpaired":  # KTO-style: each item against the reference point
            options = dict(self.kwargs.get("link_options", {}))
            if self.needs_mismatched:
                kl = (policy["kl"].detach().double() - refs["kl"][0].to(policy["kl"].device).double()).mean()
                options["reference_point"] = _process_mean(kl).clamp(min=0.0)
            return self.spec.link.impl(
                pol["completion"], ref["completion"], labels, beta=self.kwargs["beta"], **options
            )
        ci, ri = labels.nonzero().flatten(), (~labels).nonzero().flatten()
        comp, rcomp = pol["completion"], ref["completion"][0]
        emb = embeddings
        kwargs = {k: v for k, v in self.kwargs.items() if k != "link_options"}
        return L.unpaired_preference_loss(
            comp[ci],
            rcomp[ci],
            None if emb is None else emb[ci],
            comp[ri],
            rcomp[ri],
            None if emb is None else emb[ri],
            chosen_lengths=lengths["completion"][ci],
            **kwargs,
        )
