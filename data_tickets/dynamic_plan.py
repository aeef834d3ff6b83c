"""The per-epoch plan of InfoBatch-style dynamic pruning, as pure functions over score arrays.

:class:`data_tickets.DynamicPruner` keeps the state (scores, epoch, sharding) and calls these; keeping
the rule here makes it testable on plain arrays. Each sample's score is the last loss seen for it; for an
epoch the plan is:

* **pool**: the candidate indices (the whole dataset, a given base index set, or what a user sampler yields);
* **below-mean set B**: pool samples that have been seen and whose score is strictly below the mean score
  of the pool's seen samples (samples never seen yet have no score and are always kept, so epoch 0 uses
  all data);
* **ratio r** (``ratio``): exactly ``round(r * |B|)`` samples of B are dropped, drawn uniformly at random
  without replacement (seeded by ``(seed, epoch)``). So r is the fraction of the *below-mean* samples
  dropped, not of the dataset; the fraction of the dataset skipped in an epoch is ``round(r * |B|) / |pool|``;
* **weights**: the kept samples of B get loss weight ``1 / (1 - r)`` (so the expected gradient
  contribution of B is unchanged, as in InfoBatch); every other sample gets weight 1;
* **anneal** (InfoBatch's ``1 - delta``): epochs ``e >= ceil((1 - anneal) * num_epochs)`` use all data with
  weight 1, so the final epochs train on the full (unbiased) data (:func:`prune_epochs`).

:class:`InfoBatchRule` is this plan as the registered data rule ``infobatch`` (:mod:`data_tickets.rules`).
The epoch's index order is then sharded across ranks exactly like ``DistributedSampler``
(:func:`check_sharding`, :func:`shard_order`, :func:`per_rank_count`), whatever the rule.

Reference: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR 2024.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .rules import DataRule, RulePlan, RuleState, register_rule

__all__ = [
    "prune_epochs",
    "infobatch_plan",
    "below_mean",
    "InfoBatchRule",
    "check_sharding",
    "shard_order",
    "per_rank_count",
]


def prune_epochs(num_epochs: int | None, anneal: float) -> int | None:
    """Number of leading epochs in which pruning is active (``None`` when ``num_epochs`` is: every epoch)."""
    if num_epochs is None:
        return None
    return int(math.ceil(num_epochs * (1.0 - anneal) - 1e-9))


def infobatch_plan(
    scores: np.ndarray,
    seen: np.ndarray,
    pool: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    annealing: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One epoch's plan: (kept mask over the dataset, float32 loss weights, counts).

    ``scores``/``seen`` cover the whole dataset; ``pool`` holds the candidate indices; ``rng`` draws the
    dropped below-mean samples; ``annealing`` keeps the whole pool with weight 1. The counts are ``pool``,
    ``kept``, ``pruned``, ``below_mean``, ``weight`` (of the kept below-mean samples) and ``annealing``.
    """
    n = scores.shape[0]
    keep = np.zeros(n, dtype=bool)
    keep[pool] = True
    weights = np.ones(n, dtype=np.float32)
    below = np.zeros(0, dtype=np.int64)
    dropped = np.zeros(0, dtype=np.int64)
    pool_seen = pool[seen[pool]]
    if not annealing and ratio > 0 and pool_seen.size:
        mean = float(scores[pool_seen].astype(np.float64).mean())
        below = pool_seen[scores[pool_seen] < mean]
        n_drop = int(round(ratio * below.size))
        if n_drop:
            dropped = rng.choice(below, size=n_drop, replace=False)
            keep[dropped] = False
            kept_below = below[keep[below]]
            weights[kept_below] = 1.0 / (1.0 - ratio)
    stats = {
        "pool": int(pool.size),
        "kept": int(pool.size - dropped.size),
        "pruned": int(dropped.size),
        "below_mean": int(below.size),
        "weight": float(1.0 / (1.0 - ratio)) if dropped.size else 1.0,
        "annealing": bool(annealing),
    }
    return keep, weights, stats


def below_mean(losses: np.ndarray) -> np.ndarray:
    """The losses strictly below their mean (what InfoBatch may drop)."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    return losses[losses < losses.mean()] if losses.size else losses


@register_rule("infobatch")
class InfoBatchRule(DataRule):
    """InfoBatch: skip a seeded random share ``ratio`` of the pool's below-mean-loss samples, up-weight the
    kept below-mean ones by ``1 / (1 - ratio)`` (:func:`infobatch_plan`)."""

    def epoch_plan(self, epoch: int, pool: np.ndarray, state: RuleState) -> RulePlan:
        rng = np.random.default_rng([self.seed, epoch, 0])
        keep, weights, stats = infobatch_plan(state.scores, state.seen, pool, self.ratio, rng, state.annealing)
        return RulePlan(np.flatnonzero(keep), weights, stats)

    def drop_candidates(self, losses: np.ndarray) -> np.ndarray | None:
        return below_mean(losses)


def check_sharding(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Validated ``(num_replicas, rank)``; both ``None`` means unsharded, ``(1, 0)``."""
    if (num_replicas is None) != (rank is None):
        raise ValueError("num_replicas and rank: pass both or neither")
    num_replicas = 1 if num_replicas is None else int(num_replicas)
    rank = 0 if rank is None else int(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas: expected an int >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank: expected an int in [0, {num_replicas - 1}], got {rank}")
    return num_replicas, rank


def per_rank_count(n: int, num_replicas: int, drop_last: bool) -> int:
    """Indices each rank gets out of an epoch order of ``n`` (``DistributedSampler``'s rule)."""
    if num_replicas == 1:
        return n
    if drop_last and n % num_replicas:
        return max(0, math.ceil((n - num_replicas) / num_replicas))
    return math.ceil(n / num_replicas)


def shard_order(order: np.ndarray, num_replicas: int, rank: int, drop_last: bool) -> np.ndarray:
    """``rank``'s strided share of ``order``: padded by repeating from the start, or cut with ``drop_last``."""
    if num_replicas == 1:
        return order
    n = order.size
    total = per_rank_count(n, num_replicas, drop_last) * num_replicas
    if total > n:  # pad by repeating from the start, like DistributedSampler
        order = np.resize(order, total) if n else order
    else:
        order = order[:total]
    return order[rank:total:num_replicas]
