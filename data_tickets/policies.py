"""Selection policies: turn per-sample scores into a subset of dataset indices.

All policies are deterministic for a given ``seed`` (ties in the scores are broken by a seeded random
permutation, so equal scores never favour low indices) and return sorted unique ``int64`` indices.

=========== ===================================================================================
policy      keeps
=========== ===================================================================================
top         the highest scores (most informative)
bottom      the lowest scores (easiest / most typical)
random      a uniform random subset (ignores the scores; the baseline every policy must beat)
ccs         coverage-centric coreset selection (Zheng et al., ICLR 2023): drop the hardest ``beta``
            fraction, split the remaining score range into ``strata`` equal-width bins and spend the
            budget evenly across bins (smallest bins first, leftover budget passed on), sampling at
            random inside each bin. ``beta`` is capped at ``1 - budget/n`` so the budget stays reachable;
            left out, it follows the pruning rate as in the CCS paper (:func:`ccs_beta`).
moderate    the samples whose score is closest to the median (Xia et al., ICLR 2023)
=========== ===================================================================================

Budget: exactly one of ``fraction`` (0 < f <= 1, rounded to the nearest count, at least 1) or ``count``.

Class balance (the default whenever ``labels`` are given): the budget is split over classes in proportion to
their frequencies in the full set (:func:`class_quotas`, largest-remainder rounding, so the total is exact)
and the policy runs inside each class (for ``ccs``: the ``beta`` cut and the strata are per class). Without
it a score-driven policy can skew the classes badly (a 30 % ccs ticket of 10 balanced classes with 75 of one
class and 160 of another); ``class_balanced=False`` turns it off, ``True`` requires labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["POLICIES", "register_policy", "select", "budget", "class_quotas", "uses_class_balance", "ccs_beta"]

PolicyFn = Callable[..., np.ndarray]
POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator: ``fn(scores: np.ndarray, k: int, rng: np.random.Generator, **opts) -> positions (k,)``."""

    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn

    return deco


def _order(scores: np.ndarray, rng: np.random.Generator, descending: bool) -> np.ndarray:
    """Positions sorted by score with seeded random tie-breaking."""
    perm = rng.permutation(scores.size)
    key = -scores[perm] if descending else scores[perm]
    return perm[np.argsort(key, kind="stable")]


@register_policy("top")
def _top(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return _order(scores, rng, descending=True)[:k]


@register_policy("bottom")
def _bottom(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return _order(scores, rng, descending=False)[:k]


@register_policy("random")
def _random(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(scores.size, size=k, replace=False)


@register_policy("moderate")
def _moderate(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return _order(np.abs(scores - np.median(scores)), rng, descending=False)[:k]


def ccs_beta(keep: float) -> float:
    """The share of hardest samples ccs drops when keeping ``keep`` of the data: 0 down to 50 % kept, 0.1
    below it, 0.3 below 20 % (Zheng et al., ICLR 2023, CIFAR-10 settings: the fewer samples kept, the more
    the hardest, often mislabelled or atypical ones cost the coverage of the rest)."""
    return 0.0 if keep >= 0.5 else 0.1 if keep >= 0.2 else 0.3


@register_policy("ccs")
def _ccs(
    scores: np.ndarray, k: int, rng: np.random.Generator, beta: float | None = None, strata: int = 50
) -> np.ndarray:
    if beta is None:
        beta = ccs_beta(k / scores.size)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ccs beta: expected 0 <= beta < 1 (fraction of hardest samples dropped), got {beta}")
    if strata < 1:
        raise ValueError(f"ccs strata: expected int >= 1, got {strata}")
    n = scores.size
    n_drop = min(int(np.floor(beta * n)), n - k)  # never drop so many that the budget is unreachable
    pool = _order(scores, rng, descending=True)[n_drop:]
    s = scores[pool]
    lo, hi = float(s.min()), float(s.max())
    if hi > lo:
        bins = np.minimum(((s - lo) / (hi - lo) * strata).astype(np.int64), strata - 1)
    else:
        bins = np.zeros(s.size, dtype=np.int64)
    members = [pool[bins == b] for b in range(strata)]
    members = [m for m in members if m.size]
    members.sort(key=lambda m: m.size)  # smallest strata first; leftovers flow to larger ones
    chosen, left = [], k
    for i, m in enumerate(members):
        take = min(m.size, left // (len(members) - i))
        if take:
            chosen.append(rng.choice(m, size=take, replace=False))
        left -= take
    if left:  # integer division remainders: fill from the largest strata
        rest = np.setdiff1d(pool, np.concatenate(chosen) if chosen else np.empty(0, np.int64))
        chosen.append(rng.choice(rest, size=left, replace=False))
    return np.concatenate(chosen)


def budget(n: int, fraction: float | None = None, count: int | None = None) -> int:
    """Number of samples to keep out of ``n`` (exactly one of ``fraction``/``count``)."""
    if (fraction is None) == (count is None):
        raise ValueError("select: give exactly one of fraction (0 < f <= 1) or count (1..n)")
    if fraction is not None:
        if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
        return max(1, min(n, int(round(float(fraction) * n))))
    if isinstance(count, bool) or int(count) != count or not 1 <= int(count) <= n:
        raise ValueError(f"count: expected an integer in 1..{n} (dataset size), got {count!r}")
    return int(count)


def class_quotas(labels: Any, k: int) -> dict[Any, int]:
    """Per-class budget ``{class: count}`` summing to ``k``, proportional to the class frequencies of ``labels``.

    Largest-remainder rounding: every class gets ``floor(k * n_c / n)``, the leftover units go to the largest
    fractional parts (ties: lower class first). Quotas never exceed a class's size.
    """
    lab = _as_labels(labels)
    if not 0 <= int(k) <= lab.size:
        raise ValueError(f"count: expected an integer in 0..{lab.size} (number of labels), got {k!r}")
    classes, sizes = np.unique(lab, return_counts=True)
    exact = sizes * (int(k) / lab.size)
    q = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(classes.size), -(exact - q)))  # largest remainder first, ties by class order
    q[order[: int(k) - int(q.sum())]] += 1
    return {c: int(v) for c, v in zip(classes.tolist(), q)}


def uses_class_balance(class_balanced: bool | None, labels: Any) -> bool:
    """Whether :func:`select` balances classes: ``class_balanced`` if given, else whenever labels exist."""
    if class_balanced is None:
        return labels is not None
    if not isinstance(class_balanced, (bool, np.bool_)):
        raise ValueError(
            f"class_balanced: expected True, False or None (auto: on when labels are given), got {class_balanced!r}"
        )
    if class_balanced and labels is None:
        raise ValueError("class_balanced: needs labels= aligned with the scores")
    return bool(class_balanced)


def _as_labels(labels: Any) -> np.ndarray:
    return np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)


def select(
    scores: Any,
    policy: str = "ccs",
    fraction: float | None = None,
    count: int | None = None,
    labels: Any = None,
    class_balanced: bool | None = None,
    seed: int = 0,
    **kw: Any,
) -> np.ndarray:
    """Indices (sorted, int64) of the samples kept by ``policy`` under the budget.

    ``scores`` is any 1-D array/tensor aligned with dataset indices; policy options go in ``**kw``
    (``beta``/``strata`` for ccs). With ``labels`` the selection is class-balanced unless
    ``class_balanced=False`` (see the module docstring; :func:`uses_class_balance` tells which applies).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(sorted(POLICIES))}, got {policy!r}")
    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores: expected a non-empty 1-D array, got shape {tuple(s.shape)}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores: {int((~np.isfinite(s)).sum())} non-finite values (NaN/inf)")
    k = budget(s.size, fraction, count)
    balanced = uses_class_balance(class_balanced, labels)
    fn = POLICIES[policy]
    rng = np.random.default_rng(seed)
    try:
        if balanced:
            lab = _as_labels(labels)
            if lab.size != s.size:
                raise ValueError(f"labels: expected {s.size} labels (one per score), got {lab.size}")
            parts = []
            for c, q in class_quotas(lab, k).items():
                if q:
                    pos = np.flatnonzero(lab == c)
                    parts.append(pos[np.asarray(fn(s[pos], q, rng, **kw), dtype=np.int64)])
            out = np.concatenate(parts)
        else:
            out = np.asarray(fn(s, k, rng, **kw), dtype=np.int64)
    except TypeError as e:
        raise ValueError(f"policy '{policy}': bad option ({e})") from None
    out = np.unique(out)
    if out.size != k:
        raise RuntimeError(f"policy '{policy}' returned {out.size} unique indices, expected {k}")
    return out
