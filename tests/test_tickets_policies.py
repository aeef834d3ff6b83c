"""data_tickets selection policies: budgets, ordering, CCS coverage, class balance, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tickets import POLICIES, select
from data_tickets.policies import budget, class_quotas, uses_class_balance

ALL = sorted(POLICIES)


@pytest.fixture
def scores():
    return np.random.default_rng(1).gamma(2.0, 1.0, size=1000)  # skewed, like real difficulty scores


@pytest.mark.parametrize("policy", ALL)
@pytest.mark.parametrize(
    "fraction,count,expected",
    [(0.3, None, 300), (0.5, None, 500), (None, 123, 123), (1.0, None, 1000), (0.0004, None, 1)],
)
def test_counts_sorted_unique(policy, fraction, count, expected, scores):
    idx = select(scores, policy, fraction=fraction, count=count, seed=0)
    assert idx.dtype == np.int64 and idx.shape == (expected,)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 1000


@pytest.mark.parametrize("policy", ALL)
def test_deterministic_by_seed(policy, scores):
    a = select(scores, policy, fraction=0.3, seed=7)
    assert np.array_equal(a, select(torch.tensor(scores), policy, fraction=0.3, seed=7))  # tensors accepted
    if policy in ("random", "ccs"):
        assert not np.array_equal(a, select(scores, policy, fraction=0.3, seed=8))


def test_top_bottom_moderate_orderings(scores):
    k = 200
    order = np.argsort(scores)
    assert set(select(scores, "top", count=k)) == set(order[-k:])
    assert set(select(scores, "bottom", count=k)) == set(order[:k])
    mod = select(scores, "moderate", count=k)
    dist = np.abs(scores - np.median(scores))
    assert dist[mod].max() <= np.sort(dist)[k - 1] + 1e-12
    assert np.median(scores[mod]) == pytest.approx(np.median(scores), abs=0.2)


def test_ties_are_broken_randomly_not_by_index():
    s = np.zeros(1000)
    s[:10] = 1.0
    a = select(s, "top", count=100, seed=0)
    assert set(range(10)) <= set(a)  # the strictly higher scores first
    assert not np.array_equal(a, np.arange(100))  # ties are not resolved to the lowest indices
    assert not np.array_equal(a, select(s, "top", count=100, seed=1))
    assert (a >= 500).sum() > 20  # spread over the whole index range


def test_random_ignores_scores(scores):
    assert np.array_equal(
        select(scores, "random", fraction=0.3, seed=3), select(-scores, "random", fraction=0.3, seed=3)
    )


def test_ccs_drops_hardest_and_covers_strata():
    s = np.arange(1000, dtype=float)  # uniform scores: CCS strata are equally full
    idx = select(s, "ccs", fraction=0.3, seed=0, beta=0.1, strata=10)
    assert idx.max() < 900  # hardest 10% dropped
    per_stratum = np.histogram(s[idx], bins=10, range=(0, 900))[0]
    assert per_stratum.min() >= 29 and per_stratum.max() <= 31  # budget spread evenly


def test_ccs_budget_allocation_on_skewed_scores(scores):
    """Small strata are taken whole, the rest of the budget is split evenly (Zheng et al., Alg. 1)."""
    k, beta, strata = 300, 0.1, 20
    idx = select(scores, "ccs", count=k, seed=0, beta=beta, strata=strata)
    n_drop = int(beta * scores.size)
    kept_pool = np.argsort(-scores, kind="stable")[n_drop:]
    assert set(idx) <= set(kept_pool.tolist())
    s = scores[kept_pool]
    edges = np.linspace(s.min(), s.max(), strata + 1)
    sizes = np.histogram(s, bins=edges)[0]
    got = np.histogram(scores[idx], bins=edges)[0]
    # expected allocation: water-filling over strata sorted by size
    expect = np.zeros(strata, dtype=int)
    left, nonempty = k, [b for b in np.argsort(sizes, kind="stable") if sizes[b]]
    for i, b in enumerate(nonempty):
        expect[b] = min(sizes[b], left // (len(nonempty) - i))
        left -= expect[b]
    assert abs(got - expect).sum() <= 2 * max(left, 1)  # bin-edge float rounding may move a sample
    # compared with random, CCS over-represents the rare (hard) tail and under-represents the dense mode
    rnd = select(scores, "random", count=k, seed=0)
    assert np.percentile(scores[idx], 75) > np.percentile(scores[rnd], 75)


def test_ccs_caps_beta_when_budget_needs_it():
    s = np.arange(100, dtype=float)
    idx = select(s, "ccs", fraction=0.95, beta=0.1)
    assert idx.size == 95 and idx.max() <= 94  # only the 5 hardest can be dropped


@pytest.mark.parametrize("policy", ALL)
def test_class_balanced_keeps_class_proportions(policy):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    rng.shuffle(labels)
    s = rng.normal(size=labels.size) + labels * 3.0  # classes differ in scores: unbalanced policies skew
    idx = select(s, policy, fraction=0.3, labels=labels, class_balanced=True, seed=0)
    assert idx.size == 300
    assert np.bincount(labels[idx], minlength=4).tolist() == [150, 90, 45, 15]
    if policy == "top":
        assert np.bincount(labels[select(s, "top", fraction=0.3)], minlength=4)[0] == 0


def test_class_balanced_largest_remainder_is_exact():
    labels = np.array([0] * 7 + [1] * 7 + [2] * 7)
    idx = select(np.arange(21.0), "top", count=10, labels=labels, class_balanced=True)
    counts = np.bincount(labels[idx])
    assert counts.sum() == 10 and sorted(counts.tolist()) == [3, 3, 4]


@pytest.mark.parametrize("policy", ALL)
def test_class_balance_is_the_default_with_labels(policy):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), [60, 30, 10])
    s = rng.normal(size=100) + labels * 10.0  # class 2 scores highest: score-driven policies skew without balance
    default = select(s, policy, fraction=0.4, labels=labels, seed=1)
    assert np.array_equal(default, select(s, policy, fraction=0.4, labels=labels, class_balanced=True, seed=1))
    assert np.bincount(labels[default], minlength=3).tolist() == [24, 12, 4]
    off = select(s, policy, fraction=0.4, labels=labels, class_balanced=False, seed=1)
    assert np.array_equal(off, select(s, policy, fraction=0.4, seed=1))  # opt-out = no labels at all
    if policy == "top":
        assert np.bincount(labels[off], minlength=3).tolist() == [0, 30, 10]


def test_class_quotas_largest_remainder_exact():
    assert class_quotas(np.repeat([0, 1, 2], [5, 3, 2]), 5) == {0: 3, 1: 1, 2: 1}  # .5/.5 tie -> lower class
    assert class_quotas(np.array(["b", "a", "a", "c"]), 2) == {"a": 1, "b": 1, "c": 0}
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 40, size=rng.integers(2, 12))
        labels = np.repeat(np.arange(sizes.size), sizes)
        k = int(rng.integers(0, labels.size + 1))
        q = np.array(list(class_quotas(labels, k).values()))
        exact = sizes * k / labels.size
        assert q.sum() == k and (q <= sizes).all() and (np.abs(q - exact) < 1).all()
        # largest remainder: every class that got the extra unit had a remainder >= every class that did not
        up = q > np.floor(exact)
        if up.any() and (~up).any():
            assert (exact - np.floor(exact))[up].min() >= (exact - np.floor(exact))[~up].max() - 1e-12
    with pytest.raises(ValueError, match="count: expected an integer in 0..4"):
        class_quotas(np.zeros(4), 5)


def test_ccs_is_stratified_within_each_class():
    """Balanced ccs drops each class's own hardest beta and spreads over that class's score range."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    s = np.concatenate([rng.random(200), 10 + rng.random(200)])  # class 1 is uniformly harder
    idx = select(s, "ccs", fraction=0.5, labels=labels, beta=0.2, strata=5, seed=0)
    for c in (0, 1):
        pos = np.flatnonzero(labels == c)
        kept = np.intersect1d(idx, pos)
        hardest = pos[np.argsort(-s[pos])[:40]]  # beta * 200
        assert kept.size == 100 and np.intersect1d(kept, hardest).size == 0
        lo, hi = s[pos].min(), np.sort(s[pos])[-41]
        bins = np.minimum(((s[kept] - lo) / (hi - lo) * 5).astype(int), 4)
        assert np.bincount(bins, minlength=5).min() >= 15  # every stratum of the class is covered
    off = select(s, "ccs", fraction=0.5, labels=labels, beta=0.2, strata=5, class_balanced=False, seed=0)
    hardest0 = np.argsort(-s[:200])[:40]
    assert np.intersect1d(off, hardest0).size > 0  # whole-set ccs drops only class 1's hardest


def test_uses_class_balance():
    assert uses_class_balance(None, np.zeros(3)) and not uses_class_balance(None, None)
    assert not uses_class_balance(False, np.zeros(3)) and uses_class_balance(True, [0, 1])
    with pytest.raises(ValueError, match="class_balanced: needs labels"):
        uses_class_balance(True, None)
    with pytest.raises(ValueError, match="class_balanced: expected True, False or None"):
        uses_class_balance("yes", np.zeros(3))


def test_budget_rounding():
    assert budget(10, fraction=0.25) == 2  # round half to even, never 0
    assert budget(10, fraction=0.01) == 1
    assert budget(10, count=10) == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "exactly one of fraction"),
        (dict(fraction=0.5, count=3), "exactly one of fraction"),
        (dict(fraction=0.0), r"fraction: expected a number in \(0, 1\]"),
        (dict(fraction=1.5), r"fraction: expected a number in \(0, 1\]"),
        (dict(count=0), "count: expected an integer in 1..100"),
        (dict(count=101), "count: expected an integer in 1..100"),
        (dict(count=2.5), "count: expected an integer"),
        (dict(fraction=0.5, policy="best"), "policy: expected one of"),
        (dict(fraction=0.5, class_balanced=True), "class_balanced: needs labels"),
        (dict(fraction=0.5, class_balanced=True, labels=np.zeros(5)), "labels: expected 100 labels"),
        (dict(fraction=0.5, policy="ccs", beta=1.0), "ccs beta"),
        (dict(fraction=0.5, policy="ccs", strata=0), "ccs strata"),
        (dict(fraction=0.5, policy="top", beta=0.1), "policy 'top': bad option"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(np.arange(100.0), **kwargs)


def test_bad_scores():
    with pytest.raises(ValueError, match="non-finite"):
        select(np.array([1.0, np.nan, 2.0]), "top", count=1)
    with pytest.raises(ValueError, match="1-D"):
        select(np.zeros((3, 3)), "top", count=1)


def test_ccs_beta_follows_the_share_kept():
    from data_tickets.policies import ccs_beta

    assert [ccs_beta(k) for k in (1.0, 0.5, 0.49, 0.2, 0.19, 0.05)] == [0.0, 0.0, 0.1, 0.1, 0.3, 0.3]
    scores = np.arange(1000, dtype=float)  # higher = harder
    # keeping 10 %: the hardest 30 % are never chosen; keeping 50 %: nothing is cut, the hardest can be kept
    assert select(scores, "ccs", fraction=0.1, seed=0).max() < 700
    assert select(scores, "ccs", fraction=0.1, seed=0, beta=0.0).max() >= 700
    assert select(scores, "ccs", fraction=0.6, seed=0).max() >= 900
