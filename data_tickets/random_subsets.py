"""Random data subsets, the baselines every selection method must beat.

* :func:`fixed_subset`: one seeded random (class-stratified when labels are given) subset for the whole run.
* :func:`rs2_subset`: RS2 without replacement (Okanovic et al., "Repeated Random Sampling for Minimizing the
  Time-to-Accuracy of Learning", ICLR 2024): each epoch takes the next ``fraction`` of a seeded permutation
  of the data, a new permutation starting when one is used up, so every sample is seen once before any is
  seen twice. Both are pure functions of (size, fraction, epoch, seed): a resumed run draws the same subsets.

Both are also registered data rules (``fixed``, ``rs2``: :mod:`data_tickets.rules`) drawing within the pool,
with ``fraction = 1 - ratio`` unless given; over the whole dataset they draw exactly the functions' subsets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .rules import DataRule, RulePlan, RuleState, register_rule

__all__ = ["fixed_subset", "rs2_subset", "subset_size", "RandomSubsetRule", "FixedSubsetRule", "RS2Rule"]


def subset_size(n: int, fraction: float) -> int:
    """Samples per epoch for a share ``fraction`` of ``n`` (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a share in (0, 1], got {fraction}")
    return max(1, min(n, round(fraction * n)))


def fixed_subset(n: int, fraction: float, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of one random subset of ``fraction`` of ``n`` samples (stratified by ``labels``)."""
    m = subset_size(n, fraction)
    rng = np.random.default_rng([seed, 0x5EED])
    if labels is None or m == n:
        return np.sort(rng.permutation(n)[:m])
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * m / n  # largest remainder: class counts sum to m
    take = np.floor(share).astype(int)
    take[np.argsort(-(share - take), kind="stable")[: m - take.sum()]] += 1
    out = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(out))


def rs2_subset(n: int, fraction: float, epoch: int, seed: int = 0) -> np.ndarray:
    """Sorted indices RS2 (without replacement) trains on in ``epoch`` (0-based)."""
    m = subset_size(n, fraction)
    start, stop = epoch * m, (epoch + 1) * m
    parts = []
    for r in range(start // n, (stop - 1) // n + 1):
        perm = np.random.default_rng([seed, 0x252, r]).permutation(n)
        lo, hi = max(start - r * n, 0), min(stop - r * n, n)
        parts.append(perm[lo:hi])
    out = np.concatenate(parts)
    return np.unique(out) if len(out) > n else np.sort(out)


class RandomSubsetRule(DataRule):
    """A random share ``fraction`` of the pool, weight 1 (the whole pool while annealing); no losses used."""

    uses_losses = False

    def __init__(self, num_samples: int, *, fraction: float | None = None, **common: Any) -> None:
        super().__init__(num_samples, **common)
        if fraction is not None:
            self.ratio = 1.0 - float(fraction)
        self.fraction = 1.0 - self.ratio if fraction is None else float(fraction)
        subset_size(self.num_samples, self.fraction)  # validates the fraction

    def set_ratio(self, ratio: float) -> None:
        super().set_ratio(ratio)
        self.fraction = 1.0 - self.ratio

    def draw(self, epoch: int, pool: np.ndarray) -> np.ndarray:
        """Sorted positions into ``pool`` kept in ``epoch``."""
        raise NotImplementedError

    def epoch_plan(self, epoch: int, pool: np.ndarray, state: RuleState) -> RulePlan:
        kept = pool if state.annealing else pool[self.draw(epoch, pool)]
        stats = {
            "pool": int(pool.size),
            "kept": int(kept.size),
            "pruned": int(pool.size - kept.size),
            "weight": 1.0,
            "annealing": bool(state.annealing),
        }
        return RulePlan(kept, np.ones(state.num_samples, dtype=np.float32), stats)


@register_rule("fixed")
class FixedSubsetRule(RandomSubsetRule):
    """One seeded random subset of the pool for the whole run (class-stratified when ``labels`` are given)."""

    _cache: tuple[np.ndarray, float, int, np.ndarray] | None = None  # (pool, fraction, seed) -> draw

    def draw(self, epoch: int, pool: np.ndarray) -> np.ndarray:
        c = self._cache
        if c is None or (c[1], c[2]) != (self.fraction, self.seed) or not np.array_equal(c[0], pool):
            labels = None if self.labels is None else self.labels[pool]
            draw = fixed_subset(pool.size, self.fraction, self.seed, labels)
            c = self._cache = (pool.copy(), self.fraction, self.seed, draw)
        return c[3]


@register_rule("rs2")
class RS2Rule(RandomSubsetRule):
    """RS2 without replacement over the pool: each epoch the next share of a seeded permutation."""

    def draw(self, epoch: int, pool: np.ndarray) -> np.ndarray:
        return rs2_subset(pool.size, self.fraction, epoch, self.seed)
