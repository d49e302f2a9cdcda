"""Exact sampling from the Mallows-phi model with Kendall's tau distance, and pair drawing.

Items are named by their rank in the central ranking: item 0 is the best, item n-1 the worst.
A sampled ranking is stored as `positions[item]` (0 = top), which makes pair comparisons a lookup.
"""

from __future__ import annotations

import itertools

import numpy as np


def sample_positions(n: int, phi: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `size` rankings of n items with P(sigma) proportional to phi ** Kendall(sigma, identity).

    Repeated insertion: items 0, 1, ..., n-1 are inserted in central order; item i goes to
    position j in {0..i} of the current list with probability proportional to phi ** (i - j).
    Placing item i at j puts it above i - j better items, i.e. adds exactly i - j inversions, and
    later insertions never change the relative order of earlier items, so the product of the
    insertion probabilities is phi ** Kendall / Z. Returns int positions, shape [size, n].
    """
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must lie in [0, 1], got {phi}")
    positions = np.zeros((size, n), dtype=np.int64)
    for i in range(1, n):
        weights = float(phi) ** (i - np.arange(i + 1, dtype=np.float64))
        slot = rng.choice(i + 1, size=size, p=weights / weights.sum())
        # Items already at or below the slot move down one place.
        positions[:, :i] += positions[:, :i] >= slot[:, None]
        positions[:, i] = slot
    return positions


def kendall_from_positions(positions: np.ndarray) -> np.ndarray:
    """Kendall distance of each sampled ranking to the identity (number of inverted item pairs)."""
    n = positions.shape[-1]
    i, j = np.triu_indices(n, k=1)
    return (positions[..., i] > positions[..., j]).sum(axis=-1)


def draw_pairs(n: int, phi: float, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One preference pair per sampled ranking: two distinct items chosen uniformly at random, the
    preferred one being the item placed higher in that ranking. Returns (winner, loser) item ids."""
    positions = sample_positions(n, phi, size, rng)
    a = rng.integers(0, n, size=size)
    b = (a + rng.integers(1, n, size=size)) % n  # uniform over the other n-1 items
    rows = np.arange(size)
    a_wins = positions[rows, a] < positions[rows, b]
    return np.where(a_wins, a, b), np.where(a_wins, b, a)


def brute_force_pairwise(n: int, phi: float) -> np.ndarray:
    """P[i, j] = probability that item i is ranked above item j, by enumerating all n! rankings.
    For checks only (n <= 8)."""
    if n > 8:
        raise ValueError("brute force enumeration is for n <= 8")
    perms = np.array(list(itertools.permutations(range(n))))  # perms[k, position] = item
    positions = np.argsort(perms, axis=1)
    weights = float(phi) ** kendall_from_positions(positions).astype(np.float64)
    weights /= weights.sum()
    above = positions[:, :, None] < positions[:, None, :]
    return np.einsum("k,kij->ij", weights, above)


def empirical_gap_win_rate(winner: np.ndarray, loser: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each central-rank gap s = 1..n-1: the fraction of pairs with that gap won by the better
    item, and the number of pairs with that gap."""
    gap = np.abs(winner - loser)
    better_won = winner < loser
    rates = np.full(n - 1, np.nan)
    counts = np.zeros(n - 1, dtype=np.int64)
    for s in range(1, n):
        mask = gap == s
        counts[s - 1] = mask.sum()
        if counts[s - 1]:
            rates[s - 1] = better_won[mask].mean()
    return rates, counts
