"""Tiny reference "language models" whose next-token entropy is controlled per prompt.

Each prompt gets a bigram model over a vocabulary of V tokens: random logits W[prev, next]
(row V is the start-of-response state) divided by a temperature tau. tau is solved by bisection so
that the average normalised next-token entropy over all states hits a target h in (0, 1); the target
is tied to the prompt's Mallows dispersion phi. Responses are sampled from the model itself and the
dispersion features are computed exactly as preftune does (docs/methods.md#dispersion): teacher-force the
reference along the response and average H(. | prefix) / log V over the response's tokens. Because a
response visits only some states, its H differs from the target: that is the estimator's noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of softmax(logits) along the last axis, divided by log(vocabulary size)."""
    logp = _log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=-1) / np.log(logits.shape[-1])


@dataclass
class TinyRefLM:
    logits: np.ndarray  # [V + 1, V]: next-token logits given the previous token (row V = start)
    tau: float

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[1]

    def state_entropies(self) -> np.ndarray:
        return normalized_entropy(self.logits / self.tau)

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`num` responses of `length` tokens sampled from the model, shape [num, length]."""
        probs = np.exp(_log_softmax(self.logits / self.tau))
        cdf = np.cumsum(probs, axis=1)
        tokens = np.empty((num, length), dtype=np.int64)
        prev = np.full(num, self.vocab_size)
        for t in range(length):
            u = rng.random(num)[:, None]
            tok = (cdf[prev] < u).sum(axis=1)
            tokens[:, t] = np.minimum(tok, self.vocab_size - 1)
            prev = tokens[:, t]
        return tokens

    def response_entropy(self, tokens: np.ndarray) -> np.ndarray:
        """H(y) of docs/methods.md#dispersion: mean over the response's positions of the normalised
        entropy of the next-token distribution given the prefix (teacher forcing).
        tokens [num, length] -> [num]."""
        prev = np.concatenate([np.full((tokens.shape[0], 1), self.vocab_size), tokens[:, :-1]], axis=1)
        return self.state_entropies()[prev].mean(axis=1)


def build_tiny_ref(target_entropy: float, vocab_size: int, rng: np.random.Generator) -> TinyRefLM:
    """A bigram model whose mean normalised next-token entropy (over its states) is the target."""
    if not 0.0 < target_entropy < 1.0:
        raise ValueError(f"target entropy must lie in (0, 1), got {target_entropy}")
    logits = rng.standard_normal((vocab_size + 1, vocab_size)) * 3.0
    lo, hi = np.log(1e-3), np.log(1e4)  # entropy is increasing in log tau
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if normalized_entropy(logits / np.exp(mid)).mean() < target_entropy:
            lo = mid
        else:
            hi = mid
    return TinyRefLM(logits=logits, tau=float(np.exp(0.5 * (lo + hi))))


def entropy_target(phi: np.ndarray, kappa: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """The tie between dispersion and reference entropy: log h = log(phi) / kappa + noise * N(0, 1),
    i.e. h = phi ** (1 / kappa) up to prompt-level noise, clipped into (0.02, 0.98).

    With noise 0 and a perfectly followed target this is exactly the model of docs/methods.md#dispersion,
    phi = h ** phi_star with phi_star = kappa; `phi_star: auto` must recover c up to that scale."""
    log_h = np.log(phi) / kappa + noise * rng.standard_normal(np.shape(phi))
    return np.clip(np.exp(log_h), 0.02, 0.98)
