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

from typing import cast

import torch
from torch import Tensor

from .aggregation import ClipMode, ReferenceMode, WeightSpec, aggregate_references
from .components import lookup
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
        **_own_options(link, link_options),
    )
    return _mix(losses, None if ref_weights is None else ref_weights[..., None])


def _mix(losses: Tensor, alpha: Tensor | None) -> Tensor:
    """MDPO: ``Σ_k α_k ℓ^k`` over the leading reference dimension (``K' = 1``: the one loss)."""
    if losses.shape[0] == 1:
        return losses[0]
    if alpha is None:
        raise ValueError("several reference stacks need their mixing weights (ref_weights)")
    return torch.where(alpha > 0, alpha * losses, torch.zeros_like(losses)).sum(dim=0)


def _own_options(link: str, link_options: dict | None) -> dict:
    """The link options that ``link``'s implementation declares (``discopop.tau`` → ``tau``)."""
    if not link_options:
        return {}
    names = {o.kwarg for o in lookup("link", link).options if o.link}
    return {k: v for k, v in link_options.items() if k in names}


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
            Length-normalise beforehand for IPO / SimPO-style training.
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
        link: ``"sigmoid"`` (DPO), ``"ipo"``, ``"hinge"`` or ``"mallows_phi"`` (docs/methods.md#links).
        dispersion: ``[B]`` Mallows dispersion ``φ(x) ∈ (0, 1)`` (link ``mallows_phi`` only).
        prompt_embeddings: ``[B, d]`` prompt sentence embeddings (pairing ``rpo`` only).
        tau: RPO temperature τ of the similarity softmax.
        diagonal_weight: ``w`` of ``rpo_diagonal``: ``ℓ_i = w·ℓ_ii + (1−w)·mean_{j≠i} ℓ_ij``.
        weights: MRPO/MDPO reference weights: ``"adaptive"`` (ARWC) or K fixed numbers (normalised).
        clip_eps: CTRO radius ε (relative to ``|logp_0|``).
        clip: CTRO radius mode ``"adaptive"`` (split ε between chosen and rejected), ``"fixed"``
            or ``"none"``.
        label_smoothing: ε, assumed label-flip probability (sigmoid and mallows_phi links).
        reference_free: Use ``logp_ref := 0`` (SimPO style); needs ``reference="single"``.
        gamma: Target margin γ subtracted from every contrast, in log-prob units (SimPO's γ is β·γ).
        sft_weight: λ of the SFT add-on ``λ·(−logp_θ(y_w)/|y_w|)`` per row.
        chosen_lengths: ``[B]`` completion-token counts ``|y_w|`` (needed when ``sft_weight > 0``).
        loss_weights: ``w_t`` per link when ``link`` is a tuple (default all 1): ``Σ_t w_t ℓ_t``.
        link_options: keywords of the links' own implementations (``{"tau": 0.05}`` for discopop);
            each link receives those it declares.
        f_divergence, f_alpha: ψ applied to every reward before the contrast
            (:func:`~preftune.losses.family.f_divergence_score`); ``reverse_kl`` is the identity.
        pair_weights: ``[B]`` per-row weights ω_i (WPO), detached, multiplying the row's loss.

    Returns:
        :class:`LossOutput` with per-row ``losses`` ``[B]``; metrics use TRL's names, rewards are
        relative to the (virtual) reference and use the diagonal pairs.
    """
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
    dtype = compute_dtype(policy_chosen, policy_rejected, refs_chosen, refs_rejected)
    pc = as_float(policy_chosen, dtype, detach=False)
    pr = as_float(policy_rejected, dtype, detach=False)
    if pc.dim() != 1 or pc.shape != pr.shape:
        raise ValueError(f"policy log-probs must both be [B], got {tuple(pc.shape)} and {tuple(pr.shape)}")
    batch, device = pc.shape[0], pc.device

    if reference_free:
        if reference != "single":
            raise ValueError(f"reference_free=True cannot be combined with reference={reference!r}")
        zeros = torch.zeros(1, batch, dtype=dtype, device=device)
        agg = aggregate_references(zeros, zeros, "single")
    else:
        if refs_chosen is None or refs_rejected is None:
            raise ValueError("reference log-probs are required unless reference_free=True")
        rc = as_ref_stack(refs_chosen, dtype).to(device)
        rr = as_ref_stack(refs_rejected, dtype).to(device)
        if rc.shape[1] != batch or rr.shape[1] != batch:
            raise ValueError(
                f"reference log-probs {tuple(rc.shape)}/{tuple(rr.shape)} do not match a batch of {batch} pairs"
            )
        agg = aggregate_references(rc, rr, reference, weights, clip_eps, clip)

    if prompt_embeddings is not None and pairing != "rpo":
        raise ValueError(f"prompt_embeddings are only used by pairing='rpo', not {pairing!r}")
    if dispersion is not None and "mallows_phi" not in links:  # the only link that takes φ
        raise ValueError(f"dispersion (φ) is only used by link='mallows_phi', not {link!r}")
    c = None if scale is None else _row_vector(scale, "scale", batch, dtype, device)
    phi = None
    if "mallows_phi" in links:
        if dispersion is None:
            raise ValueError("link='mallows_phi' needs dispersion φ [B]")
        phi = _row_vector(dispersion, "dispersion", batch, dtype, device)

    divergence = cast(FDivergence, f_divergence)  # checked against the registry's names upstream
    rewards_c = f_divergence_score(pc - agg.chosen, divergence, f_alpha)  # [K', B]
    rewards_r = f_divergence_score(pr - agg.rejected, divergence, f_alpha)
    weight = _pair_weights(pairing, batch, prompt_embeddings, tau, dtype, device)
    losses = None
    per_link: dict[str, Tensor] = {}
    for component, w in zip(components, loss_weights, strict=True):
        if component.takes == "margin":
            ell = _contrast_losses(
                contrasts(rewards_c, rewards_r, pairing),
                weight=weight,
                gamma=gamma,
                scale=c,
                link=cast(Link, component.value),
                beta=beta,
                label_smoothing=label_smoothing,
                phi=phi,
                ref_weights=agg.weights,
                link_options=link_options,
            )
            ell = reduce_rows(ell, pairing, diagonal_weight)
        elif component.takes in ("rewards", "batch"):
            if pairing != "diagonal":
                raise ValueError(f"the {component.value} link takes whole pairs, not RPO's contrasts")
            options = _own_options(component.value, link_options)
            if component.takes == "rewards":
                rc_, rr_ = (rewards_c, rewards_r) if c is None else (rewards_c * c, rewards_r * c)
                stacked = component.impl(rc_, rr_, beta, **options)
            else:
                if c is not None:
                    raise ValueError(
                        f"the {component.value} link sorts or pools the batch: no per-pair scale"
                    )
                stacked = component.impl(
                    pc, pr, agg.chosen, agg.rejected, beta, label_smoothing, chosen_lengths, **options
                )
            ell = _mix(stacked, agg.weights)
        else:
            raise ValueError(f"the {component.value} link is for unpaired data (unpaired rows, not pairs)")
        per_link[component.value] = ell
        losses = w * ell if losses is None else losses + w * ell
    assert losses is not None
    omega = None
    if pair_weights is not None:
        omega = _row_vector(pair_weights, "pair_weights", batch, dtype, device)
        losses = losses * omega
    sft = sft_term(pc, chosen_lengths, sft_weight)
    if sft is not None:
        losses = losses + sft

    with torch.no_grad():
        r_c = pc.detach() - agg.reward_chosen
        r_r = pr.detach() - agg.reward_rejected
        metrics = {**reward_metrics(beta, r_c, r_r, pc, pr), **agg.metrics} if batch else {}
        if c is not None and batch:
            metrics["mallows/neg_log_dispersion"] = c.mean()
        if phi is not None and batch:
            metrics["mallows/dispersion"] = phi.mean()
        if weight is not None and batch:
            metrics["rpo/weight_diag"] = torch.diagonal(weight).mean()
        if sft is not None and batch:
            metrics["sft/loss"] = (sft / sft_weight).mean()
        if len(per_link) > 1 and batch:
            metrics.update({f"loss/{name}": ell.detach().mean() for name, ell in per_link.items()})
        if omega is not None and batch:
            metrics["wpo/weight"] = omega.mean()
        if link_options and "delta" in link_options and "bco_pair" in per_link and batch:
            metrics["bco/delta"] = torch.as_tensor(link_options["delta"], dtype=dtype).detach().clone()
    return LossOutput(
        loss=safe_mean(losses),
        losses=losses,
        metrics=metrics,
        chosen_rewards=beta * r_c,
        rejected_rewards=beta * r_r,
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
    pc = as_float(policy_chosen, dtype, detach=False)
    pr = as_float(policy_rejected, dtype, detach=False)
    if pc.dim() != 1 or pr.dim() != 1:
        raise ValueError(f"policy log-probs must be 1-D, got {tuple(pc.shape)} and {tuple(pr.shape)}")
    n_c, n_r, device = pc.shape[0], pr.shape[0], pc.device

    def _ref(ref: Tensor | None, n: int, side: str) -> Tensor:
        if reference_free:
            return torch.zeros(n, dtype=dtype, device=device)
        if ref is None:
            raise ValueError(f"ref_{side} is required unless reference_free=True")
        stack = as_ref_stack(ref, dtype).to(device)
        if stack.shape != (1, n):
            raise ValueError(f"ref_{side} must have shape [{n}] (one reference), got {tuple(stack.shape)}")
        return stack[0]

    r_c = pc - _ref(ref_chosen, n_c, "chosen")
    r_r = pr - _ref(ref_rejected, n_r, "rejected")
    sft = sft_term(pc, chosen_lengths, sft_weight)

    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        metrics["rpo/num_chosen"] = torch.tensor(float(n_c), dtype=dtype, device=device)
        metrics["rpo/num_rejected"] = torch.tensor(float(n_r), dtype=dtype, device=device)
        if n_c:
            metrics["rewards/chosen"] = beta * r_c.detach().mean()
            metrics["logps/chosen"] = pc.detach().mean()
        if n_r:
            metrics["rewards/rejected"] = beta * r_r.detach().mean()
            metrics["logps/rejected"] = pr.detach().mean()
        if n_c and n_r:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            every_c, every_r = beta * r_c.detach()[:, None], beta * r_r.detach()[None, :]
            metrics["rewards/accuracies"] = preference_accuracy(every_c, every_r).to(dtype)
            metrics["rewards/accuracies_strict"] = preference_accuracy(every_c, every_r, strict=True).to(
                dtype
            )

    if n_c == 0 or n_r == 0:
        # Nothing to contrast: a zero loss that is still connected to every input that needs grad.
        zero = (pc.sum() + pr.sum()) * 0.0
        losses = pc * 0.0 + zero
        return LossOutput(zero, losses, metrics, beta * r_c.detach(), beta * r_r.detach())

    if pairing == "rpo":
        if chosen_embeddings is None or rejected_embeddings is None:
            raise ValueError("unpaired RPO needs chosen_embeddings [Nc, d] and rejected_embeddings [Nr, d]")
        if chosen_embeddings.shape[0] != n_c or rejected_embeddings.shape[0] != n_r:
            raise ValueError(
                f"embeddings have {chosen_embeddings.shape[0]}/{rejected_embeddings.shape[0]} rows for "
                f"{n_c} chosen / {n_r} rejected items"
            )
        weight = rpo_weights(
            chosen_embeddings.to(device), rejected_embeddings.to(device), tau=tau, dtype=dtype
        )
    else:
        weight = torch.full((n_c, n_r), 1.0 / n_r, dtype=dtype, device=device)
    losses = _contrast_losses(
        contrasts(r_c[None], r_r[None], "rpo"),
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
        metrics["sft/loss"] = (sft.detach() / sft_weight).mean()
    return LossOutput(losses.mean(), losses, metrics, beta * r_c.detach(), beta * r_r.detach())
