"""From a run's config and a micro-batch's per-sequence tensors to the configured method's loss.

Nothing here names a method: the :class:`~preftune.losses.MethodSpec` says which loss keywords each
component takes from the config (its options) and from the trainer's per-pair tensors (dispersion
``c``, prompt embeddings), so a new component needs no change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import losses as L
from .config import ConfigError, TrainConfig, config_value, resolved_method, validate


def _length_normalize(cfg: TrainConfig, spec: L.MethodSpec) -> bool:
    if cfg.length_normalize is not None:
        return cfg.length_normalize
    return spec.length_normalize or cfg.reference_free


@dataclass(frozen=True)
class LossAdapter:
    """Computes the configured method's :class:`~preftune.losses.LossOutput` for one micro-batch."""

    spec: L.MethodSpec
    length_normalize: bool
    kwargs: dict[str, Any]

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
        return cls(spec, _length_normalize(cfg, spec), kwargs)

    def __call__(
        self,
        policy: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor],
        refs: dict,
        c: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> L.LossOutput:
        """``policy``/``refs``: per-side ``[B]`` / ``[K, B]`` summed log-probs; ``lengths`` per side."""

        def norm(x, side):
            return x / lengths[side].clamp(min=1).to(x.dtype) if self.length_normalize else x

        pol = {s: norm(v, s) for s, v in policy.items()}
        ref = {s: norm(v, s) for s, v in refs.items()}
        if self.spec.unpaired:
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
                chosen_lengths=lengths["completion"][ci],
                **self.kwargs,
            )
        return L.preference_loss(
            pol["chosen"],
            pol["rejected"],
            ref["chosen"],
            ref["rejected"],
            chosen_lengths=lengths["chosen"],
            **self.spec.step_kwargs({"c": c, "embeddings": embeddings}),
            **self.kwargs,
        )
