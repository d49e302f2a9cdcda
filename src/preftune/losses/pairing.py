"""Pairing: which (chosen, rejected) contrasts enter the loss, and with what weight.

See docs/methods.md#rpo. A new pairing is its weight function here, one :func:`register` call, and its
row reduction in :func:`reduce_rows`.

* ``diagonal``: the B preference pairs themselves (DPO and friends).
* ``rpo``: every chosen i against every rejected j of the batch, ``S_ij = r(y_w,i) − r(y_l,j)``,
  weighted inside the link by ``W_ij`` = row softmax over j of ``−D_ij/τ`` (cosine distance of the
  prompt embeddings); per-row loss ``mean_j ℓ_ij``.
* ``rpo_uniform``: the same with ``W ≡ 1/M``.
* ``rpo_diagonal``: no weight inside the link; per-row loss ``w·ℓ_ii + (1−w)·mean_{j≠i} ℓ_ij``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .components import Component, Option, lookup, register, registered

__all__ = ["Pairing", "PAIRINGS", "rpo_weights", "contrasts", "pair_weights", "reduce_rows"]

Pairing = Literal["diagonal", "rpo", "rpo_uniform", "rpo_diagonal"]


def rpo_weights(
    query_embeddings: Tensor,
    key_embeddings: Tensor | None = None,
    tau: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RPO contrast weights ``W_ij = exp(−D_ij/τ) / Σ_k exp(−D_ik/τ)``, ``D_ij = 1 − ê_i·ê_j``.

    Args:
        query_embeddings: ``[M, d]`` prompt embeddings of the chosen side (rows).
        key_embeddings: ``[N, d]`` prompt embeddings of the rejected side (columns); defaults to
            ``query_embeddings`` (paired RPO, where the diagonal ``D_ii = 0`` is included).
        tau: Temperature τ > 0; τ → 0 with distinct prompts gives ``W → I``.
        dtype: Compute dtype, at least float32 (never bf16: the softmax over distances is sensitive).

    Returns:
        Detached ``[M, N]`` row-stochastic weights, invariant to the scale of the embeddings.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    q = F.normalize(query_embeddings.detach().to(dtype), dim=-1)
    k = q if key_embeddings is None else F.normalize(key_embeddings.detach().to(dtype), dim=-1)
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"embeddings must be [M, d] and [N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    distance = 1.0 - q @ k.T
    return torch.softmax(-distance / tau, dim=1)


def contrasts(rewards_chosen: Tensor, rewards_rejected: Tensor, pairing: Pairing) -> Tensor:
    """Contrasts ``S`` from implicit rewards ``[..., B]``: ``[..., B, 1]`` (diagonal) or ``[..., B, B]``."""
    if pairing == "diagonal":
        return (rewards_chosen - rewards_rejected).unsqueeze(-1)
    return rewards_chosen.unsqueeze(-1) - rewards_rejected.unsqueeze(-2)


def pair_weights(
    pairing: Pairing | str,
    batch_size: int,
    prompt_embeddings: Tensor | None,
    tau: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The weight ``W`` multiplying each contrast inside the link (None means 1)."""
    return lookup("pairing", pairing).impl(batch_size, prompt_embeddings, tau, dtype, device)


def _no_weight(
    batch_size: int, prompt_embeddings: Tensor | None, tau: float, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    return None


def _similarity_weight(
    batch_size: int, prompt_embeddings: Tensor | None, tau: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    if prompt_embeddings is None:
        raise ValueError("pairing='rpo' needs prompt_embeddings [B, d]")
    if prompt_embeddings.shape[0] != batch_size:
        raise ValueError(
            f"prompt_embeddings has {prompt_embeddings.shape[0]} rows for a batch of {batch_size} pairs"
        )
    return rpo_weights(prompt_embeddings.to(device), tau=tau, dtype=dtype)


def _uniform_weight(
    batch_size: int, prompt_embeddings: Tensor | None, tau: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    return torch.full((batch_size, batch_size), 1.0 / max(batch_size, 1), dtype=dtype, device=device)


def _embeddings(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"prompt_embeddings": inputs["embeddings"]}


_RPO_PAPER = "Yin et al. 2024, Relative Preference Optimization (arXiv:2402.10958)"
# LD-DPO splits a pair's responses at their shared length and WPO weights a pair: a contrast (i, j) of
# two different pairs has neither, and no paper defines one.
_RPO_REFUSES = {
    "ld_alpha": "a contrast of y_w,i with y_l,j (i ≠ j) has no shared length for LD-DPO to split at",
    "wpo": "WPO weights a pair w(y_w)·w(y_l); a contrast of two different pairs has no defined weight",
}
register(
    Component(
        "diagonal",
        "pairing",
        "diagonal",
        _no_weight,
        summary="the B preference pairs themselves (default)",
        formula="S_i = r(y_w,i) − r(y_l,i)",
        supports_unpaired=False,
        selectable=False,
    )
)
register(
    Component(
        "rpo",
        "pairing",
        "rpo",
        _similarity_weight,
        summary="Relative PO: every chosen × every rejected of the batch, weighted by prompt similarity",
        formula="S_ij = r(y_w,i) − r(y_l,j),  W_ij = softmax_j(−D_ij/τ),  ℓ_i = mean_j ℓ(W_ij S_ij)",
        paper=_RPO_PAPER,
        needs=frozenset({"embeddings"}),
        options=(Option("rpo.tau", "tau"), Option("rpo.embedder"), Option("rpo.contrast_scope")),
        step_inputs=_embeddings,
        refuses=_RPO_REFUSES,
    )
)
register(
    Component(
        "rpo_uniform",
        "pairing",
        "rpo_uniform",
        _uniform_weight,
        summary="RPO ablation: all B×B contrasts with uniform weights 1/B (no embeddings)",
        formula="W_ij = 1/B,  ℓ_i = mean_j ℓ(S_ij / B)",
        paper=_RPO_PAPER,
        options=(Option("rpo.contrast_scope"),),
        refuses=_RPO_REFUSES,
    )
)
register(
    Component(
        "rpo_diagonal",
        "pairing",
        "rpo_diagonal",
        _no_weight,
        summary="RPO ablation: w · own pair + (1 − w) · mean of the other contrasts",
        formula="ℓ_i = w·ℓ(S_ii) + (1−w)·mean_{j≠i} ℓ(S_ij)",
        paper=_RPO_PAPER,
        options=(Option("rpo.diagonal_weight", "diagonal_weight"), Option("rpo.contrast_scope")),
        refuses=_RPO_REFUSES,
    )
)
register(
    Component(
        "rpo_unpaired",
        "pairing",
        "rpo",
        _similarity_weight,
        summary="Relative PO on unpaired (KTO-style) rows: every desirable × every undesirable item",
        formula="S_ij = r(y+_i) − r(y−_j),  W_ij = softmax_j(−D(x_i, x'_j)/τ),  ℓ_i = mean_j ℓ(W_ij S_ij)",
        paper=_RPO_PAPER,
        needs=frozenset({"embeddings", "unpaired"}),
        options=(Option("rpo.tau", "tau"), Option("rpo.embedder"), Option("rpo.contrast_scope")),
        unpaired=True,
    )
)

#: The pipeline values of the pairings registered here.
PAIRINGS: tuple[str, ...] = tuple(
    dict.fromkeys(c.value for c in registered().values() if c.slot == "pairing")
)


def reduce_rows(losses: Tensor, pairing: Pairing, diagonal_weight: float = 0.8) -> Tensor:
    """Per-row loss from the ``[B, N]`` contrast losses (``N = 1`` for the diagonal pairing)."""
    if pairing == "diagonal":
        return losses[:, 0]
    if pairing in ("rpo", "rpo_uniform"):
        return losses.mean(dim=1)
    if pairing == "rpo_diagonal":
        m = losses.shape[0]
        diag = torch.diagonal(losses)
        if m <= 1:
            return diag
        eye = torch.eye(m, dtype=torch.bool, device=losses.device)
        off = losses.masked_fill(eye, 0.0).sum(dim=1) / (m - 1)
        return diagonal_weight * diag + (1.0 - diagonal_weight) * off
    lookup("pairing", pairing)  # a registered pairing without a reduction here is a programming error
    raise ValueError(f"pairing {pairing!r} has no row reduction")
