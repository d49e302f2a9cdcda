"""The one loss pipeline every method is a configuration of (docs/methods.md#one-pipeline-many-methods).

    references → aggregate (single | MRPO virtual reference | MDPO per-reference)
               → implicit rewards r(y) = logp_θ(y) − logp_ref(y)
               → pair (diagonal | RPO contrast matrix S_ij = r(y_w,i) − r(y_l,j))
               → margin m = c_i · W_ij · (S_ij − γ)
               → link (sigmoid | IPO | hinge | Mallows g_φ | robust | ...) → per-contrast loss ℓ
               → MDPO mix Σ_k α_k ℓ^k → per-row reduction → Σ_t w_t (several links)
               → × WPO pair weight ω_i → + SFT term → mean.

Links of kind ``rewards`` (NCA, BCO, SPPO, APO, ORPO) take the pair's two rewards instead of a contrast
(no scale, no RPO pairing); ``batch`` links (AOT, TRL's pooled SFT) take the whole batch.
An f-divergence replaces each reward r by ψ(r) before the contrast.

Row-indexed quantities (dispersion scale ``c``, Mallows ``φ``, MDPO ``α``) belong to the chosen
response's pair, i.e. to row ``i`` of the contrast matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .aggregation import ClipMode, ReferenceAggregate, ReferenceMode, WeightSpec, aggregate_references
from .components import Component, lookup
from .divergences import F_DIVERGENCES, FDivergence, f_divergence_score
from .links import Link, apply_link
from .output import (
    LossOutput,
    as_float,
    as_ref_stack,
    compute_dtype,
    preference_accuracy,
    reward_metrics,
    safe_mean,
    sft_term,
)
from .pairing import Pairing, contrasts, reduce_rows, rpo_weights
from .pairing import pair_weights as _pair_weights

__all__ = ["preference_loss", "unpaired_preference_loss"]


def _row_vector(x: Tensor | float, name: str, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A detached per-row quantity ``[rows]`` (a scalar is broadcast)."""
    x = as_float(torch.as_tensor(x, device=device), dtype, detach=True)
    if x.dim() == 0:
        return x.expand(rows)
    if x.shape != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], got {tuple(x.shape)}")
    return x


def _contrast_losses(
    contrast: Tensor,
    *,
    weight: Tensor | None,
    gamma: float,
    scale: Tensor | None,
    link: Link,
    beta: float,
    label_smoothing: float,
    phi: Tensor | None,
    ref_weights: Tensor | None,
    link_options: dict | None = None,
) -> Tensor:
    """``[K', M, N]`` contrasts → ``[M, N]`` losses: margin, link, then the MDPO mix over K'."""
    margin = contrast - gamma if gamma else contrast
    if weight is not None:
        margin = margin * weight
    if scale is not None:
        margin = margin * scale[:, None]
    losses = apply_link(
        margin,
        link,
        beta,
        label_smoothing=label_smoothing,
        phi=None if phi is None else phi[:, None],
        **lookup("link", link).own_options(link_options),
    )
    return _mix(losses, None if ref_weights is None else ref_weights[..., None])


def _mix(losses: Tensor, alpha: Tensor | None) -> Tensor:
    """MDPO: ``Σ_k α_k ℓ^k`` over the leading reference dimension (``K' = 1``: the one loss)."""
    if losses.shape[0] == 1:
        return losses[0]
    if alpha is None:
        raise ValueError("several reference stacks need their mixing weights (ref_weights)")
    return torch.where(alpha > 0, alpha * losses, torch.zeros_like(losses)).sum(dim=0)


def _checked_links(
    link: Link | str | tuple[str, ...],
    pairing: str,
    loss_weights: tuple[float, ...] | list[float] | None,
    f_divergence: str,
    beta: float,
) -> tuple[list[Component], tuple[float, ...] | list[float]]:
    """The link components of ``link`` and their weights ``w_t``, after the checks of the settings."""
    links = (link,) if isinstance(link, str) else tuple(link)
    components = [lookup("link", name) for name in links]  # unknown names fail here, listing the valid ones
    lookup("pairing", pairing)
    if loss_weights is None:
        loss_weights = (1.0,) * len(links)
    if len(loss_weights) != len(links):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for the {len(links)} links {links}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return components, loss_weights


def _policy_logps(
    policy_chosen: Tensor, policy_rejected: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Both ``[B]`` policy log-probs in the compute dtype (still attached to the graph)."""
    chosen = as_float(policy_chosen, dtype, detach=False)
    rejected = as_float(policy_rejected, dtype, detach=False)
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"policy log-probs must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    return chosen, rejected


def _references(
    refs_chosen: Tensor | None,
    refs_rejected: Tensor | None,
    like: Tensor,
    reference_free: bool,
    aggregation: tuple[ReferenceMode, WeightSpec, float, ClipMode],
) -> ReferenceAggregate:
    """The reference slot: ``logp_ref := 0`` (reference-free) or the aggregated ``[K, B]`` stacks.

    ``aggregation``: ``(reference, weights, clip_eps, clip)`` of :func:`preference_loss`.
    """
    batch, dtype, device = like.shape[0], like.dtype, like.device
    reference = aggregation[0]
    if reference_free:
        if reference != "single":
            raise ValueError(f"reference_free=True cannot be combined with reference={reference!r}")
        zeros = torch.zeros(1, batch, dtype=dtype, device=device)
        return aggregate_references(zeros, zeros, "single")
    if refs_chosen is None or refs_rejected is None:
        raise ValueError("reference log-probs are required unless reference_free=True")
    stack_chosen = as_ref_stack(refs_chosen, dtype).to(device)
    stack_rejected = as_ref_stack(refs_rejected, dtype).to(device)
    if stack_chosen.shape[1] != batch or stack_rejected.shape[1] != batch:
        raise ValueError(
            f"reference log-probs {tuple(stack_chosen.shape)}/{tuple(stack_rejected.shape)} do not match a "
            f"batch of {batch} pairs"
        )
    return aggregate_references(stack_chosen, stack_rejected, *aggregation)


def _row_factors(
    scale: Tensor | None,
    dispersion: Tensor | None,
    prompt_embeddings: Tensor | None,
    pairing: str,
    link: Link | str | tuple[str, ...],
    like: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """The per-row scale ``c`` and Mallows dispersion ``φ`` ``[B]`` (None where unused), checked."""
    batch, dtype, device = like.shape[0], like.dtype, like.device
    links = (link,) if isinstance(link, str) else tuple(link)
    if prompt_embeddings is not None and pairing != "rpo":
        raise ValueError(f"prompt_embeddings are only used by pairing='rpo', not {pairing!r}")
    if dispersion is not None and "mallows_phi" not in links:  # the only link that takes φ
        raise ValueError(f"dispersion (φ) is only used by link='mallows_phi', not {link!r}")
    row_scale = None if scale is None else _row_vector(scale, "scale", batch, dtype, device)
    phi = None
    if "mallows_phi" in links:
        if dispersion is None:
            raise ValueError("link='mallows_phi' needs dispersion φ [B]")
        phi = _row_vector(dispersion, "dispersion", batch, dtype, device)
    return row_scale, phi


@dataclass(frozen=True)
class _LinkInputs:
    """What the links of one :func:`preference_loss` call are computed from: per-row tensors, settings."""

    policy_chosen: Tensor  # [B] logp_θ(y_w), with grad
    policy_rejected: Tensor
    references: ReferenceAggregate  # [K', B] reference log-probs (and MDPO's α)
    scores_chosen: Tensor  # [K', B] ψ(r(y_w)) (the rewards r unless an f-divergence is set)
    scores_rejected: Tensor
    contrast_weight: Tensor | None  # RPO's W [B, B]
    scale: Tensor | None  # MallowsPO-θ's c [B]
    phi: Tensor | None  # MallowsPO-ϕ's φ [B]
    chosen_lengths: Tensor | None
    beta: float
    label_smoothing: float
    gamma: float
    pairing: Pairing
    diagonal_weight: float
    link_options: dict | None


def _link_loss(component: Component, inputs: _LinkInputs) -> Tensor:
    """``ℓ_t`` ``[B]`` of one link, by its kind: a margin, a pair's rewards or the whole batch."""
    beta, references, scale = inputs.beta, inputs.references, inputs.scale
    if component.takes == "margin":
        losses = _contrast_losses(
            contrasts(inputs.scores_chosen, inputs.scores_rejected, inputs.pairing),
            weight=inputs.contrast_weight,
            gamma=inputs.gamma,
            scale=scale,
            link=cast(Link, component.value),
            beta=beta,
            label_smoothing=inputs.label_smoothing,
            phi=inputs.phi,
            ref_weights=references.weights,
            link_options=inputs.link_options,
        )
        return reduce_rows(losses, inputs.pairing, inputs.diagonal_weight)
    if component.takes == "unpaired":
        raise ValueError(f"the {component.value} link is for unpaired data (unpaired rows, not pairs)")
    if inputs.pairing != "diagonal":
        raise ValueError(f"the {component.value} link takes whole pairs, not RPO's contrasts")
    options = component.own_options(inputs.link_options)
    if component.takes == "rewards":
        if scale is None:
            stacked = component.impl(inputs.scores_chosen, inputs.scores_rejected, beta, **options)
        else:
            stacked = component.impl(
                inputs.scores_chosen * scale, inputs.scores_rejected * scale, beta, **options
            )
    else:
        if scale is not None:
            raise ValueError(f"the {component.value} link sorts or pools the batch: no per-pair scale")
        logps = (inputs.policy_chosen, inputs.policy_rejected, references.chosen, references.rejected)
        stacked = component.impl(*logps, beta, inputs.label_smoothing, inputs.chosen_lengths, **options)
    return _mix(stacked, references.weights)


def _summed_links(
    components: list[Component], loss_weights: tuple[float, ...] | list[float], inputs: _LinkInputs
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Σ_t w_t ℓ_t`` ``[B]`` over the links, and each ``ℓ_t`` by its pipeline value."""
    losses: Tensor | None = None
    per_link: dict[str, Tensor] = {}
    for component, weight in zip(components, loss_weights, strict=True):
        ell = _link_loss(component, inputs)
        per_link[component.value] = ell
        losses = weight * ell if losses is None else losses + weight * ell
    assert losses is not None
    return losses, per_link


def _metrics(
    inputs: _LinkInputs,
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    per_link: dict[str, Tensor],
    sft: Tensor | None,
    sft_weight: float,
    omega: Tensor | None,
) -> dict[str, Tensor]:
    """TRL's reward metrics and each component's own (``mallows/*``, ``rpo/*``, ``loss/<link>``...)."""
    if not inputs.policy_chosen.shape[0]:
        return {}
    metrics = {
        **reward_metrics(
            inputs.beta, logratio_chosen, logratio_rejected, inputs.policy_chosen, inputs.policy_rejected
        ),
        **inputs.references.metrics,
    }
    if inputs.scale is not None:
        metrics["mallows/neg_log_dispersion"] = inputs.scale.mean()
    if inputs.phi is not None:
        metrics["mallows/dispersion"] = inputs.phi.mean()
    if inputs.contrast_weight is not None:
        metrics["rpo/weight_diag"] = torch.diagonal(inputs.contrast_weight).mean()
    if sft is not None:
        # the SFT term's NLL (token mean of −log π(y_w|x)), before λ: TRL's CPO/ORPO ``nll_loss``
        metrics["nll_loss"] = (sft / sft_weight).mean()
    if len(per_link) > 1 or sft is not None:
        # A loss of several terms logs each: keyed by each link's pipeline value, TRL's loss_type name
        # (``loss/sigmoid`` for ``dpo``), the names metrics.jsonl and dashboards already carry. Without
        # pair weights, loss = Σ_t w_t·loss/<link> + λ·nll_loss.
        metrics.update({f"loss/{name}": ell.detach().mean() for name, ell in per_link.items()})
    if omega is not None:
        metrics["wpo/weight"] = omega.mean()
    link_options = inputs.link_options
    if link_options and "delta" in link_options and "bco_pair" in per_link:
        metrics["bco/delta"] = (
            torch.as_tensor(link_options["delta"], dtype=logratio_chosen.dtype).detach().clone()
        )
    return metrics


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    refs_chosen: Tensor | None,
    refs_rejected: Tensor | None,
    *,
    beta: float = 0.1,
    reference: ReferenceMode = "single",
    pairing: Pairing = "diagonal",
    scale: Tensor | None = None,
    link: Link | str | tuple[str, ...] = "sigmoid",
    dispersion: Tensor | None = None,
    prompt_embeddings: Tensor | None = None,
    tau: float = 0.5,
    diagonal_weight: float = 0.8,
    weights: WeightSpec = "adaptive",
    clip_eps: float = 0.1,
    clip: ClipMode = "adaptive",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
    chosen_lengths: Tensor | None = None,
    loss_weights: tuple[float, ...] | list[float] | None = None,
    link_options: dict | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    pair_weights: Tensor | None = None,
) -> LossOutput:
    """Every paired preference loss of preftune, as one configurable pipeline (docs/methods.md#one-pipeline-many-methods).

    Args:
        policy_chosen: ``[B]`` summed completion log-probs ``logp_θ(y_w|x)`` of the policy (with grad).
            Length-normalise beforehand for the links that ask for it (IPO, ``sigmoid_norm``, SimPO, ORPO).
        policy_rejected: ``[B]`` ``logp_θ(y_l|x)``.
        refs_chosen: ``[K, B]`` (or ``[B]`` = one reference) ``logp_k(y_w|x)``, index 0 the primary
            reference. ``reference="single"`` uses only index 0. May be None with ``reference_free``.
        refs_rejected: ``[K, B]`` (or ``[B]``) ``logp_k(y_l|x)``.
        beta: β, the inverse temperature of the implicit reward (IPO: its τ).
        reference: ``"single"`` (primary reference), ``"mrpo"`` (virtual reference, docs/methods.md#mrpo) or
            ``"mdpo"`` (``Σ_k α_k ·`` single-reference loss with reference k, docs/methods.md#mdpo).
        pairing: ``"diagonal"`` (the B pairs), ``"rpo"`` (all B×B contrasts weighted by prompt
            similarity), ``"rpo_uniform"`` (``W ≡ 1/B``) or ``"rpo_diagonal"`` (docs/methods.md#rpo).
        scale: ``[B]`` MallowsPO-θ neg-log dispersion ``c(x)`` multiplying the margin (row ``i``
            for RPO pairings); None means 1.
        link: the pipeline value of a registered paired link, or a tuple of them (a sum, ``loss_weights``).
            Of a margin: ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"``, ``"mallows_phi"``, ``"robust"``,
            ``"exo_pair"``, ``"discopop"``, ``"sigmoid_norm"``, ``"simpo"``; of a pair's rewards:
            ``"nca_pair"``, ``"bco_pair"``, ``"sppo_hard"``, ``"apo_zero"``, ``"apo_down"``, ``"orpo"``;
            of the batch: ``"aot"``, ``"aot_unpaired"``, ``"sft"`` (docs/methods.md#links, #the-dpo-family).
        dispersion: ``[B]`` Mallows dispersion ``φ(x) ∈ (0, 1)`` (link ``mallows_phi`` only).
        prompt_embeddings: ``[B, d]`` prompt sentence embeddings (pairing ``rpo`` only).
        tau: RPO temperature τ of the similarity softmax.
        diagonal_weight: ``w`` of ``rpo_diagonal``: ``ℓ_i = w·ℓ_ii + (1−w)·mean_{j≠i} ℓ_ij``.
        weights: MRPO/MDPO reference weights: ``"adaptive"`` (ARWC) or K fixed numbers (normalised).
        clip_eps: CTRO radius ε (relative to ``|logp_0|``).
        clip: CTRO radius mode ``"adaptive"`` (split ε between chosen and rejected), ``"fixed"`` or ``"none"``.
        label_smoothing: ε, for the links that take one (``Component.label_smoothing``).
        reference_free: Use ``logp_ref := 0`` (SimPO style); needs ``reference="single"``.
        gamma: Target margin γ subtracted from every contrast, in log-prob units (SimPO's γ is β·γ).
        sft_weight: λ of the SFT add-on ``λ·(−logp_θ(y_w)/|y_w|)`` per row.
        chosen_lengths: ``[B]`` completion-token counts ``|y_w|`` (``sft_weight > 0``, the ``sft`` link).
        loss_weights: ``w_t`` per link when ``link`` is a tuple (default all 1): ``Σ_t w_t ℓ_t``.
        link_options: keywords of the links' own implementations (``{"tau": 0.05}`` for discopop);
            each link receives those it declares.
        f_divergence, f_alpha: ψ applied to every reward before the contrast
            (:func:`~preftune.losses.divergences.f_divergence_score`); ``reverse_kl`` is the identity.
        pair_weights: ``[B]`` per-row weights ω_i (WPO), detached, multiplying the row's loss.

    Returns:
        :class:`LossOutput` with per-row ``losses`` ``[B]``; metrics use TRL's names, rewards are
        relative to the (virtual) reference and use the diagonal pairs.
    """
    components, loss_weights = _checked_links(link, pairing, loss_weights, f_divergence, beta)
    dtype = compute_dtype(policy_chosen, policy_rejected, refs_chosen, refs_rejected)
    policy_chosen, policy_rejected = _policy_logps(policy_chosen, policy_rejected, dtype)
    batch, device = policy_chosen.shape[0], policy_chosen.device
    references = _references(
        refs_chosen, refs_rejected, policy_chosen, reference_free, (reference, weights, clip_eps, clip)
    )
    row_scale, phi = _row_factors(scale, dispersion, prompt_embeddings, pairing, link, policy_chosen)
    divergence = cast(FDivergence, f_divergence)  # checked against the registry's names upstream
    scores_chosen = f_divergence_score(policy_chosen - references.chosen, divergence, f_alpha)  # [K', B]
    scores_rejected = f_divergence_score(policy_rejected - references.rejected, divergence, f_alpha)
    contrast_weight = _pair_weights(pairing, batch, prompt_embeddings, tau, dtype, device)
    inputs = _LinkInputs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, references=references,
        scores_chosen=scores_chosen, scores_rejected=scores_rejected, contrast_weight=contrast_weight,
        scale=row_scale, phi=phi, chosen_lengths=chosen_lengths, beta=beta, label_smoothing=label_smoothing,
        gamma=gamma, pairing=pairing, diagonal_weight=diagonal_weight, link_options=link_options,
    )  # fmt: skip
    losses, per_link = _summed_links(components, loss_weights, inputs)
    omega = None if pair_weights is None else _row_vector(pair_weights, "pair_weights", batch, dtype, device)
    if omega is not None:
        losses = losses * omega
    sft = sft_term(policy_chosen, chosen_lengths, sft_weight)
    if sft is not None:
        losses = losses + sft
    with torch.no_grad():
        logratio_chosen = policy_chosen.detach() - references.reward_chosen
        logratio_rejected = policy_rejected.detach() - references.reward_rejected
        metrics = _metrics(inputs, logratio_chosen, logratio_rejected, per_link, sft, sft_weight, omega)
    return LossOutput(
        loss=safe_mean(losses),
        losses=losses,
        metrics=metrics,
        chosen_rewards=beta * logratio_chosen,
        rejected_rewards=beta * logratio_rejected,
    )


def unpaired_preference_loss(
    policy_chosen: Tensor,
    ref_chosen: Tensor | None,
    chosen_embeddings: Tensor | None,
    policy_rejected: Tensor,
    ref_rejected: Tensor | None,
    rejected_embeddings: Tensor | None,
    *,
    beta: float = 0.1,
    tau: float = 0.5,
    pairing: Pairing = "rpo",
    link: Link = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
    chosen_lengths: Tensor | None = None,
) -> LossOutput:
    """Unpaired RPO (docs/methods.md#rpo_unpaired): every chosen item against every rejected item of the batch.

    ``S_ij = r(y+_i) − r(y−_j)`` over ``C × R``, ``W`` = row softmax over j of ``−D(x_i, x'_j)/τ``
    (``pairing="rpo"``) or ``1/|R|`` (``"rpo_uniform"``), ``ℓ_i = mean_j link(W_ij S_ij)``. A batch with
    no chosen or no rejected item gives loss 0, still attached to the inputs' graph.

    Args:
        policy_chosen: ``[Nc]`` policy log-probs of the chosen items (with grad).
        ref_chosen: ``[Nc]`` (or ``[1, Nc]``) reference log-probs of the chosen items.
        chosen_embeddings: ``[Nc, d]`` prompt embeddings of the chosen items (``rpo`` only).
        policy_rejected, ref_rejected, rejected_embeddings: the same for the ``Nr`` rejected items.
        beta, tau, link, label_smoothing, reference_free, gamma, sft_weight, chosen_lengths: as in
            :func:`preference_loss` (``link`` may be sigmoid, ipo or hinge).
    """
    if pairing not in ("rpo", "rpo_uniform"):
        raise ValueError(f"unpaired RPO supports pairing 'rpo' or 'rpo_uniform', got {pairing!r}")
    if not lookup("link", link).supports_unpaired:
        raise ValueError(f"the {link} link needs per-pair inputs and is not defined for unpaired data")
    dtype = compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    policy_chosen = as_float(policy_chosen, dtype, detach=False)
    policy_rejected = as_float(policy_rejected, dtype, detach=False)
    if policy_chosen.dim() != 1 or policy_rejected.dim() != 1:
        raise ValueError(
            f"policy log-probs must be 1-D, got {tuple(policy_chosen.shape)} and {tuple(policy_rejected.shape)}"
        )
    num_chosen, num_rejected, device = policy_chosen.shape[0], policy_rejected.shape[0], policy_chosen.device

    def _ref(ref: Tensor | None, n: int, side: str) -> Tensor:
        if reference_free:
            return torch.zeros(n, dtype=dtype, device=device)
        if ref is None:
            raise ValueError(f"ref_{side} is required unless reference_free=True")
        stack = as_ref_stack(ref, dtype).to(device)
        if stack.shape != (1, n):
            raise ValueError(f"ref_{side} must have shape [{n}] (one reference), got {tuple(stack.shape)}")
        return stack[0]

    logratio_chosen = policy_chosen - _ref(ref_chosen, num_chosen, "chosen")
    logratio_rejected = policy_rejected - _ref(ref_rejected, num_rejected, "rejected")
    sft = sft_term(policy_chosen, chosen_lengths, sft_weight)

    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        metrics["rpo/num_chosen"] = torch.tensor(float(num_chosen), dtype=dtype, device=device)
        metrics["rpo/num_rejected"] = torch.tensor(float(num_rejected), dtype=dtype, device=device)
        if num_chosen:
            metrics["rewards/chosen"] = beta * logratio_chosen.detach().mean()
            metrics["logps/chosen"] = policy_chosen.detach().mean()
        if num_rejected:
            metrics["rewards/rejected"] = beta * logratio_rejected.detach().mean()
            metrics["logps/rejected"] = policy_rejected.detach().mean()
        if num_chosen and num_rejected:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            every_chosen, every_rejected = (
                beta * logratio_chosen.detach()[:, None],
                beta * logratio_rejected.detach()[None, :],
            )
            metrics["rewards/accuracies"] = preference_accuracy(every_chosen, every_rejected).to(dtype)
            metrics["rewards/accuracies_strict"] = preference_accuracy(
                every_chosen, every_rejected, strict=True
            ).to(dtype)

    if num_chosen == 0 or num_rejected == 0:
        # Nothing to contrast: a zero loss that is still connected to every input that needs grad.
        zero = (policy_chosen.sum() + policy_rejected.sum()) * 0.0
        losses = policy_chosen * 0.0 + zero
        return LossOutput(
            zero, losses, metrics, beta * logratio_chosen.detach(), beta * logratio_rejected.detach()
        )

    if pairing == "rpo":
        if chosen_embeddings is None or rejected_embeddings is None:
            raise ValueError("unpaired RPO needs chosen_embeddings [Nc, d] and rejected_embeddings [Nr, d]")
        if chosen_embeddings.shape[0] != num_chosen or rejected_embeddings.shape[0] != num_rejected:
            raise ValueError(
                f"embeddings have {chosen_embeddings.shape[0]}/{rejected_embeddings.shape[0]} rows for "
                f"{num_chosen} chosen / {num_rejected} rejected items"
            )
        weight = rpo_weights(
            chosen_embeddings.to(device), rejected_embeddings.to(device), tau=tau, dtype=dtype
        )
    else:
        weight = torch.full((num_chosen, num_rejected), 1.0 / num_rejected, dtype=dtype, device=device)
    losses = _contrast_losses(
        contrasts(logratio_chosen[None], logratio_rejected[None], "rpo"),
        weight=weight,
        gamma=gamma,
        scale=None,
        link=link,
        beta=beta,
        label_smoothing=label_smoothing,
        phi=None,
        ref_weights=None,
    ).mean(dim=1)
    if sft is not None:
        losses = losses + sft
        metrics["nll_loss"] = (sft.detach() / sft_weight).mean()
    return LossOutput(
        losses.mean(), losses, metrics, beta * logratio_chosen.detach(), beta * logratio_rejected.detach()
    )
