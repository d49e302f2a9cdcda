"""MallowsPO pieces: the dispersion estimate and the Mallows pairwise link (docs/methods.md#mallowspo).

The link. Under a Mallows model with Kendall's tau distance and dispersion φ ∈ (0, 1), the item of
central rank i beats the item of rank i + s with probability

    h(k) = k / (1 − φ^k),      g_φ(s) = h(s + 1) − h(s)        (s ≥ 0),
    g_φ(s) = 1 − g_φ(−s)                                       (s < 0).

Writing a = −log φ > 0, x = a·|s| and the complement c(t) = 1 − g_φ(t) for t ≥ 0, a little algebra
gives a form with no cancellation anywhere:

    c(t) = e^{−a} · f(x) · (P(a) + Q(x)) / (1 − e^{−(x + a)})
    f(x) = x / (e^x − 1),  P(a) = (e^a − 1 − a) / a,  Q(x) = (e^{−x} − 1 + x) / x,

where P, Q ≥ 0 (P > 0) are summed, never subtracted; each is a Taylor series below 1 and a closed
form above. In log space every factor is finite for all t ≥ 0 and a > 0 (t = 0 included: f(0) = 1,
Q(0) = 0), and ``log g`` is ``log1p(−c)`` for s ≥ 0 (c ≤ 1/2 there) or ``log c`` for s < 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .components import Component, Option, register

__all__ = [
    "mallows_link",
    "mallows_log_link",
    "neg_log_dispersion",
    "calibrate_phi_star",
]

_SERIES_TERMS = 20  # Taylor terms for arguments below 1: 1/21! ≈ 2e-20, beyond float64 precision
_SERIES_CUT = 1.0
_LN2 = math.log(2.0)


def _series(z: Tensor, coeffs: list[float]) -> Tensor:
    """``Σ_m coeffs[m] · z^m`` by Horner's rule."""
    out = torch.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * z + c
    return out


_INV_FACT = [1.0 / math.factorial(n) for n in range(_SERIES_TERMS + 3)]
# P(a) = Σ_{m≥1} a^m / (m+1)!
_P_COEFFS = [0.0] + [_INV_FACT[m + 1] for m in range(1, _SERIES_TERMS + 1)]
# Q(x) = Σ_{m≥1} (−1)^{m+1} x^m / (m+1)!
_Q_COEFFS = [0.0] + [(-1.0) ** (m + 1) * _INV_FACT[m + 1] for m in range(1, _SERIES_TERMS + 1)]
# expm1(x)/x = Σ_{m≥0} x^m / (m+1)!
_E_COEFFS = [_INV_FACT[m + 1] for m in range(_SERIES_TERMS + 1)]


def _split(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Branch mask and the argument clamped into each branch (so the unused branch stays finite)."""
    small = z < _SERIES_CUT
    return small, z.clamp(max=_SERIES_CUT), z.clamp(min=_SERIES_CUT)


def _log1mexp(y: Tensor) -> Tensor:
    """``log(1 − e^{−y})`` for y > 0 (Mächler's two-branch form)."""
    near = y < _LN2
    y_near = y.clamp(max=_LN2)
    y_far = y.clamp(min=_LN2)
    return torch.where(near, torch.log(-torch.expm1(-y_near)), torch.log1p(-torch.exp(-y_far)))


def _log_f(x: Tensor) -> Tensor:
    """``log(x / (e^x − 1))`` for x ≥ 0 (0 at x = 0)."""
    small, xs, xl = _split(x)
    return torch.where(small, -torch.log(_series(xs, _E_COEFFS)), torch.log(xl) - xl - _log1mexp(xl))


def _q(x: Tensor) -> Tensor:
    """``Q(x) = (e^{−x} − 1 + x) / x`` for x ≥ 0 (0 at x = 0, → 1 as x → ∞)."""
    small, xs, xl = _split(x)
    return torch.where(small, _series(xs, _Q_COEFFS), 1.0 + torch.expm1(-xl) / xl)


def _log_p_plus_q(a: Tensor, q: Tensor) -> Tensor:
    """``log(P(a) + Q)`` for a > 0; P is formed in log space for large a (e^a may overflow)."""
    small, a_s, a_l = _split(a)
    log_p_large = a_l + torch.log1p(-(1.0 + a_l) * torch.exp(-a_l)) - torch.log(a_l)
    large = log_p_large + torch.log1p(q * torch.exp(-log_p_large))
    return torch.where(small, torch.log(_series(a_s, _P_COEFFS) + q), large)


def _neg_log_phi(phi: Tensor) -> Tensor:
    """``a = −log φ``, kept inside ``[tiny, 1e3]`` so φ = 1 gives g = 1/2 and φ = 0 stays finite."""
    a_min = math.sqrt(torch.finfo(phi.dtype).tiny)
    return (-torch.log(phi)).clamp(min=a_min, max=1e3)


def _log_complement(t: Tensor, a: Tensor) -> Tensor:
    """``log(1 − g_φ(t))`` for t ≥ 0 and a = −log φ > 0."""
    x = a * t
    return _log_f(x) - a + _log_p_plus_q(a, _q(x)) - _log1mexp(x + a)


def _float(x: Tensor | float, like: Tensor | None = None) -> Tensor:
    x = torch.as_tensor(x, device=None if like is None else like.device)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    return x


def mallows_log_link(s: Tensor, phi: Tensor | float) -> Tensor:
    """``log g_φ(s)``, elementwise and numerically stable (see the module docstring).

    Args:
        s: Scaled margins (the loss passes ``β·Δ``); any real values, any shape.
        phi: Dispersion φ ∈ (0, 1), broadcastable against ``s``. Values are clamped so that φ = 1
            gives ``log(1/2)``; φ near 0 is a near-deterministic ranking.

    Returns:
        ``log g_φ(s)`` with the broadcast shape, finite for every finite ``s``, with finite gradients
        w.r.t. ``s`` and ``φ``. Computed in float32 (float64 if either input is float64).
    """
    s = _float(s)
    # a Python number takes the dtype of s (a float32 detour would round φ = 0.8)
    phi = (
        _float(phi, s)
        if isinstance(phi, Tensor)
        else torch.tensor(float(phi), dtype=s.dtype, device=s.device)
    )
    dtype = torch.promote_types(s.dtype, phi.dtype)
    s, phi = s.to(dtype), phi.to(dtype)
    a = _neg_log_phi(phi)
    nonneg = s >= 0
    t = torch.where(nonneg, s, -s)  # |s| with the one-sided derivative at 0 taken from the right
    log_c = _log_complement(t, a)
    return torch.where(nonneg, torch.log1p(-torch.exp(log_c)), log_c)


def mallows_link(s: Tensor, phi: Tensor | float) -> Tensor:
    """The Mallows pairwise link ``g_φ(s)`` ∈ [0, 1] (docs/methods.md#mallows_phi).

    ``g_φ(s) = h(s+1) − h(s)`` with ``h(k) = k/(1 − φ^k)`` for ``s ≥ 0`` and ``1 − g_φ(−s)`` for
    ``s < 0``. At integer ``s ≥ 1`` it is the probability that, under a Mallows–Kendall ranking model
    with dispersion φ, an item beats the item ``s`` places below it (e.g. ``g_φ(1) = 1/(1+φ)``).
    ``g_φ(s) + g_φ(−s) = 1``; ``g`` jumps at ``s = 0`` from ``1 − g_φ(0⁺)`` to
    ``g_φ(0⁺) = 1/(1−φ) + 1/log φ > 1/2`` (its derivative is continuous there); ``g → 1/2`` as φ → 1.
    """
    return torch.exp(mallows_log_link(s, phi))


def neg_log_dispersion(entropy_chosen: Tensor, entropy_rejected: Tensor, phi_star: float | Tensor) -> Tensor:
    """MallowsPO neg-log dispersion ``c(x) = −φ* · log((H(y_w) + H(y_l)) / 2)`` (docs/methods.md#dispersion).

    Args:
        entropy_chosen: ``[B]`` mean next-token entropy of the primary reference along ``y_w``,
            normalised by ``log V`` (so in (0, 1)).
        entropy_rejected: ``[B]`` the same along ``y_l``.
        phi_star: The scale φ* > 0 (a number, or :func:`calibrate_phi_star` for ``phi_star: auto``).

    Returns:
        Detached ``c`` ``[B]`` (float32, or float64 for float64 input); ``φ(x) = exp(−c)``. The mean
        entropy is clamped into ``[tiny, 1]`` so ``c`` is finite and ``≥ 0``.
    """
    entropy_w, entropy_l = _float(entropy_chosen).detach(), _float(entropy_rejected).detach()
    dtype = torch.promote_types(entropy_w.dtype, entropy_l.dtype)
    h_bar = ((entropy_w.to(dtype) + entropy_l.to(dtype)) / 2).clamp(min=torch.finfo(dtype).tiny, max=1.0)
    # A Python float goes straight to the compute dtype (via float32 it would lose digits in float64).
    phi_star = torch.as_tensor(phi_star, dtype=dtype, device=h_bar.device).detach()
    return -phi_star * torch.log(h_bar)


def calibrate_phi_star(entropy_chosen_all: Tensor, entropy_rejected_all: Tensor) -> float:
    """``phi_star: auto``: ``1 / mean_x(−log H̄(x))`` over the training set, so that mean ``c`` is 1.

    Args:
        entropy_chosen_all, entropy_rejected_all: normalised entropies of every training pair.
    """
    c1 = neg_log_dispersion(
        torch.as_tensor(entropy_chosen_all).to(torch.float64),
        torch.as_tensor(entropy_rejected_all).to(torch.float64),
        1.0,
    )
    if c1.numel() == 0:
        raise ValueError("calibrate_phi_star needs at least one pair")
    mean = float(c1.mean())
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(
            f"cannot calibrate phi_star: mean of -log(mean entropy) is {mean} (entropies must lie in (0, 1))"
        )
    return 1.0 / mean


def _scale_from_c(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"scale": inputs["c"]}


register(
    Component(
        "mallows_theta",
        "scale",
        "mallows_theta",
        neg_log_dispersion,
        summary="MallowsPO-θ: margin scaled by the per-prompt neg-log dispersion c(x)",
        formula="m = c(x) · Δ,  c(x) = −φ* · log((H(y_w) + H(y_l)) / 2)",
        paper="Chen et al. 2024, MallowsPO: Fine-Tune Your LLM with Preference Dispersions (arXiv:2405.14953)",
        needs=frozenset({"entropy"}),
        options=(Option("mallows.phi_star"),),
        step_inputs=_scale_from_c,
    )
)
