"""DynamicPruner (InfoBatch-style dynamic data pruning): counts, weights, annealing, determinism, sharding, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from data_tickets.dynamic import DynamicPruner
from data_tickets.dynamic_plan import infobatch_plan, per_rank_count, prune_epochs, shard_order

N = 100


def _scored(ratio=0.5, num_epochs=10, anneal=0.2, seed=0, **kw) -> DynamicPruner:
    """A pruner whose scores put exactly 40 samples (indices 0..39) strictly below the mean."""
    p = DynamicPruner(N, ratio=ratio, num_epochs=num_epochs, anneal=anneal, seed=seed, **kw)
    losses = np.where(np.arange(N) < 40, 0.1, 1.0).astype(np.float32)  # mean 0.64
    p.update(torch.arange(N), torch.from_numpy(losses))
    return p


def test_first_epoch_uses_all_data_and_weight_one():
    p = DynamicPruner(N, ratio=0.5, num_epochs=5, seed=0)
    p.set_epoch(0)
    idx = list(p)
    assert sorted(idx) == list(range(N)) and len(p) == N
    assert torch.equal(p.weights(torch.arange(N)), torch.ones(N))
    assert p.stats["pruned"] == 0


def test_counts_and_weights_per_epoch():
    p = _scored(ratio=0.5)
    p.set_epoch(1)
    idx = np.array(list(p))
    st = p.stats
    assert st["below_mean"] == 40 and st["pruned"] == 20 and st["kept"] == 80
    assert len(idx) == len(p) == 80 and len(set(idx.tolist())) == 80
    assert set(range(40, N)) <= set(idx.tolist())  # above-mean samples are never dropped
    kept_below = sorted(set(idx.tolist()) & set(range(40)))
    assert len(kept_below) == 20
    w = p.weights(torch.arange(N))
    assert torch.allclose(w[kept_below], torch.full((20,), 2.0))  # 1 / (1 - r)
    assert torch.equal(w[40:], torch.ones(60))
    # re-weighting multiplies the per-sample loss and records the unweighted loss as the new score
    loss = torch.full((4,), 3.0)
    batch = torch.tensor([kept_below[0], kept_below[1], 50, 60])
    out = p.reweight(loss, batch)
    assert torch.allclose(out, torch.tensor([6.0, 6.0, 3.0, 3.0]))
    assert p.scores[kept_below[0]] == pytest.approx(3.0)


@pytest.mark.parametrize("ratio,expected_drop", [(0.3, 12), (0.25, 10), (0.0, 0), (0.9, 36)])
def test_ratio_definition_fraction_of_below_mean(ratio, expected_drop):
    p = _scored(ratio=ratio)
    p.set_epoch(1)
    assert p.stats["pruned"] == expected_drop == round(ratio * 40)
    assert len(p) == N - expected_drop


def test_annealing_uses_all_data_in_last_epochs():
    p = _scored(num_epochs=10, anneal=0.2)
    assert p.prune_epochs == 8
    for epoch in range(10):
        p.set_epoch(epoch)
        if epoch < 8:
            assert len(p) == 80 and not p.stats["annealing"], epoch
        else:
            assert len(p) == N and p.stats["annealing"], epoch
            assert torch.equal(p.weights(torch.arange(N)), torch.ones(N))
    # InfoBatch default: delta = 0.875 -> anneal = 0.125; with 10 epochs only the last one is full-data
    q = _scored(num_epochs=10, anneal=0.125)
    assert q.prune_epochs == 9 and q.is_annealing(9) and not q.is_annealing(8)
    assert _scored(num_epochs=None).prune_epochs is None


def test_deterministic_by_seed_and_epoch():
    a, b, c = _scored(seed=3), _scored(seed=3), _scored(seed=4)
    for p in (a, b, c):
        p.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert set(a.kept_indices().tolist()) != set(c.kept_indices().tolist())


def test_unseen_samples_are_always_kept_and_nan_losses_ignored():
    p = DynamicPruner(N, ratio=0.9, num_epochs=10, seed=0)
    p.update(np.arange(50), np.linspace(0, 1, 50))
    p.update(np.array([60, 61]), np.array([np.nan, np.inf]))
    p.set_epoch(1)
    kept = set(p.kept_indices().tolist())
    assert set(range(50, N)) <= kept
    assert not p.seen[60] and not p.seen[61]


def test_base_index_set_restricts_the_pool():
    base = np.arange(0, N, 2)  # 50 even indices: 20 below-mean (0..38 even) + 30 above
    p = _scored(indices=base)
    p.set_epoch(1)
    idx = list(p)
    assert set(idx) <= set(base.tolist())
    assert p.stats["pool"] == 50 and p.stats["below_mean"] == 20 and p.stats["pruned"] == 10
    assert len(idx) == 40


def test_wraps_user_sampler_keeping_its_order():
    class Reversed(SequentialSampler):
        def __iter__(self):
            return iter(range(N - 1, -1, -1))

    p = _scored(sampler=Reversed(range(N)))
    p.set_epoch(1)
    idx = list(p)
    assert idx == sorted(idx, reverse=True) and len(idx) == 80


@pytest.mark.parametrize("replicas,drop_last", [(4, False), (3, False), (3, True)])
def test_sharding_covers_every_kept_index(replicas, drop_last):
    shards = []
    for rank in range(replicas):
        p = _scored(num_replicas=replicas, rank=rank, drop_last=drop_last)
        p.set_epoch(1)
        shards.append(list(p))
        assert len(shards[-1]) == len(p)
    kept = set(_kept_reference().tolist())
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # equal per-rank lengths, as DDP needs
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(flat) == 78 and len(set(flat)) == 78 and set(flat) <= kept
    else:
        assert set(flat) == kept
        if 80 % replicas == 0:
            assert len(flat) == 80 and len(set(flat)) == 80  # each kept index exactly once
        else:
            assert len(flat) == math.ceil(80 / replicas) * replicas  # padded by repetition


def _kept_reference() -> np.ndarray:
    p = _scored()
    p.set_epoch(1)
    return p.kept_indices()


def test_infobatch_plan_on_plain_arrays():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 0.5, 0.0], dtype=np.float32)
    seen = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)  # mean of the seen = 26.5 / 7 ~ 3.79
    keep, w, c = infobatch_plan(scores, seen, np.arange(8), 0.4, np.random.default_rng(0))
    below = np.array([0, 1, 2, 3, 6])
    assert c == {"pool": 8, "kept": 6, "pruned": 2, "below_mean": 5, "weight": 1 / 0.6, "annealing": False}
    assert keep[[4, 5, 7]].all() and keep[below].sum() == 3  # above mean and unseen: always kept
    assert np.allclose(w[below[keep[below]]], 1 / 0.6) and (w[~np.isin(np.arange(8), below)] == 1).all()
    keep, w, c = infobatch_plan(scores, seen, np.arange(8), 0.4, np.random.default_rng(0), annealing=True)
    assert keep.all() and (w == 1).all() and c["pruned"] == 0 and c["annealing"]
    keep, _, c = infobatch_plan(scores, seen, np.array([0, 4, 5]), 0.5, np.random.default_rng(0))
    assert c["pool"] == 3 and c["below_mean"] == 1 and not keep[[1, 2, 3, 6, 7]].any()  # only the pool
    assert (prune_epochs(10, 0.2), prune_epochs(None, 0.2)) == (8, None)


@pytest.mark.parametrize("n,replicas,drop_last", [(10, 3, False), (10, 3, True), (12, 4, False), (5, 1, False)])
def test_shard_order_matches_distributed_sampler(n, replicas, drop_last):
    for rank in range(replicas):
        ref = list(DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=False, drop_last=drop_last))
        assert shard_order(np.arange(n), replicas, rank, drop_last).tolist() == ref
        assert per_rank_count(n, replicas, drop_last) == len(ref)


def test_adopts_distributed_sampler_settings():
    ds = DistributedSampler(range(N), num_replicas=4, rank=2, shuffle=True, seed=0)
    p = _scored(sampler=ds)
    assert (p.num_replicas, p.rank, p.sampler) == (4, 2, None)
    p.set_epoch(1)
    assert len(list(p)) == 20


def test_state_round_trip_resumes_identically():
    a = _scored(seed=7)
    a.set_epoch(1)
    first = list(a)
    a.update(torch.tensor(first[:10]), torch.rand(10))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = DynamicPruner(N, ratio=0.1, num_epochs=3, seed=0)
    b.load_state_dict(state)
    assert (b.ratio, b.num_epochs, b.seed, b.epoch) == (0.5, 10, 7, 1)
    assert list(b) == first  # mid-epoch resume replays the frozen plan
    assert torch.equal(a.weights(torch.arange(N)), b.weights(torch.arange(N)))
    for p in (a, b):
        p.set_epoch(2)
    assert list(a) == list(b)
    with pytest.raises(ValueError, match="saved for 100 samples"):
        DynamicPruner(N + 1).load_state_dict(state)


def test_auto_advance_without_set_epoch():
    p = _scored(num_epochs=4, anneal=0.25)
    assert len(list(p)) == 80  # epoch 0 plan (scores already recorded)
    list(p)
    list(p)
    assert p.epoch == 2
    assert len(list(p)) == N and p.epoch == 3  # annealing epoch


def test_score_merge_across_ranks():
    p = DynamicPruner(4, ratio=0.5)
    p.update([0], [5.0])
    p._merge(np.array([2.0, 6.0, 0.0, 0.0]), np.array([1.0, 2.0, 0.0, 0.0]))
    assert p.scores.tolist() == [2.0, 3.0, 0.0, 0.0]
    assert p.seen.tolist() == [True, True, False, False]


def _sync_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p = DynamicPruner(N, ratio=0.5, num_epochs=10, seed=0, num_replicas=world, rank=rank)
        p.set_epoch(0)
        mine = list(p)
        losses = np.where(np.array(mine) < 40, 0.1, 1.0)
        p.update(mine, losses)
        p.set_epoch(1)  # merges the scores of both ranks
        torch.save({"shard": torch.tensor(list(p)), "scores": torch.from_numpy(p.scores)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_after_sync(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'pg'}"
    # fork: no re-import of torch in the workers (spawn costs ~10 s on a busy 2-core machine)
    mp.start_processes(_sync_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["scores"], r1["scores"])
    union = set(r0["shard"].tolist()) | set(r1["shard"].tolist())
    assert union == set(_kept_reference().tolist())
    assert len(r0["shard"]) == len(r1["shard"]) == 40


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"anneal": 1.5}, "anneal"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"num_replicas": 2}, "num_replicas and rank"),
        ({"num_replicas": 2, "rank": 2}, "rank"),
        ({"indices": [0, N]}, "indices"),
        ({"indices": []}, "indices"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicPruner(N, **kwargs)


def test_update_validates_shapes_and_range():
    p = DynamicPruner(N)
    with pytest.raises(ValueError, match="losses"):
        p.update([1, 2], [0.1])
    with pytest.raises(ValueError, match="index"):
        p.update([N], [0.1])
    with pytest.raises(ValueError, match="loss_vec"):
        p.reweight(torch.zeros(2, 2), [0, 1])


def test_final_kept_set_and_ticket_export(tmp_path):
    from data_tickets import TicketFile

    p = _scored(seed=1)
    kept = p.final_kept_indices()
    assert kept.size == 80 and set(range(40, N)) <= set(kept.tolist())
    path = tmp_path / "dyn.npz"
    p.export_ticket(str(path))
    loaded = TicketFile.load(str(path))
    assert np.array_equal(np.asarray(loaded.indices), kept)
    assert loaded.policy == "infobatch" and loaded.fraction == pytest.approx(0.8)
    assert loaded.extra["dynamic"]["ratio"] == 0.5
    assert np.allclose(loaded.scores, p.scores)
    labels = np.arange(N) % 10
    fp = p.to_ticket(labels=labels)
    assert fp.fingerprint["size"] == N
