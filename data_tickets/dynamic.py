"""Dynamic data pruning: a sampler that asks a data rule which samples to train on each epoch, plus loss
re-weighting.

Each sample's score is the last loss seen for it during training (recorded from the per-sample losses of
every batch). At the start of every epoch the pruner freezes a *plan* for that epoch from a registered
:class:`~data_tickets.rules.DataRule` (``rule=``, default ``"infobatch"``: drop a seeded random share ``ratio``
of the pool's below-mean-score samples and up-weight the kept below-mean ones by ``1 / (1 - ratio)``, see
:mod:`data_tickets.dynamic_plan`), and trains the final ``anneal`` share of epochs on all data. The pruner owns
what every rule shares: scores, pool, epoch, anneal, sharding, resume.

Typical use in a plain PyTorch loop::

    pruner = DynamicPruner(len(train_set), ratio=0.5, num_epochs=epochs, seed=0)
    loader = DataLoader(train_set, batch_size=64, sampler=pruner)
    for epoch in range(epochs):
        pruner.set_epoch(epoch)
        for images, labels, index in loader:
            loss_vec = F.cross_entropy(model(images), labels, reduction="none")
            loss = pruner.reweight(loss_vec, index).mean()   # records scores, applies the weights
            ...

Distributed: pass ``num_replicas``/``rank`` (or pass your ``DistributedSampler`` as ``sampler`` and the
pruner adopts its sharding); every rank computes the same plan and takes an equal-length shard, exactly
like ``DistributedSampler``. Scores recorded on each rank are merged across ranks at every ``set_epoch``
(one ``all_reduce`` of two vectors of length ``num_samples``) so all ranks keep identical plans.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from .dynamic_plan import check_sharding, per_rank_count, prune_epochs, shard_order
from .rules import DEFAULT_RULE, DataRule, RuleState, make_rule

__all__ = ["DynamicPruner"]


def _as_index_array(index: Any, name: str = "index") -> np.ndarray:
    """``index`` (tensor, array or sequence of integers) as a flat int64 array; ``name`` prefixes errors."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    arr = np.asarray(index)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer sample indices, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


class DynamicPruner(Sampler[int]):
    """Sampler over dataset indices that keeps, each epoch, what its data rule plans (InfoBatch by default).

    Args:
        num_samples: size of the dataset the indices refer to (or a sized dataset).
        ratio: r in [0, 1): the rule's strength; InfoBatch drops this share of the below-mean-score samples.
        num_epochs: total training epochs (needed for the anneal); ``None`` never anneals.
        anneal: fraction of the final epochs trained on all data (InfoBatch's ``1 - delta``; 0.125 default).
        seed: seeds the rule's per-epoch draws and the shuffle; same seed + same scores = same plan.
        indices: optional base index set (e.g. a static data ticket); pruning acts within it.
        sampler: optional user sampler over dataset indices; its order is kept and pruned indices are skipped.
            Its ``set_epoch`` is forwarded. A ``DistributedSampler`` here is *not* iterated: the pruner
            adopts its ``num_replicas``, ``rank``, ``shuffle`` and ``drop_last`` instead (see module doc).
        shuffle: shuffle the kept indices each epoch (ignored when ``sampler`` orders them).
        num_replicas, rank: shard each epoch's index list across ranks like ``DistributedSampler``.
        drop_last: with sharding, drop the tail instead of padding with repeated indices.
        sync_scores: merge scores across ranks at ``set_epoch`` when ``torch.distributed`` is initialised with
            more than one rank (also when the pruner itself is not sharded and the training loop shards its
            index list, as ``lotus`` does).
        rule: a registered rule name (:func:`data_tickets.rules.rule_names`) built with ``num_samples``, ``seed``,
            ``num_epochs``, ``ratio`` and ``rule_options``, or a :class:`DataRule` instance (its own ratio and seed).
    """

    def __init__(
        self,
        num_samples: int | Sequence,
        ratio: float = 0.5,
        num_epochs: int | None = None,
        anneal: float = 0.125,
        seed: int = 0,
        indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        sampler: Sampler[int] | None = None,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        sync_scores: bool = True,
        rule: str | DataRule = DEFAULT_RULE,
        rule_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(num_samples, (int, np.integer)):
            if hasattr(num_samples, "__len__"):
                num_samples = len(num_samples)
            else:
                raise ValueError(f"num_samples: expected an int or a sized dataset, got {type(num_samples).__name__}")
        num_samples = int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples}")
        if not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) < 1.0):
            raise ValueError(f"ratio: expected a float in [0, 1), got {ratio!r}")
        if not (isinstance(anneal, (int, float)) and 0.0 <= float(anneal) <= 1.0):
            raise ValueError(f"anneal: expected a float in [0, 1], got {anneal!r}")
        if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
            raise ValueError(f"num_epochs: expected an int >= 1 or None, got {num_epochs!r}")
        if isinstance(sampler, DistributedSampler):
            num_replicas = sampler.num_replicas if num_replicas is None else num_replicas
            rank = sampler.rank if rank is None else rank
            shuffle = bool(sampler.shuffle)
            drop_last = bool(sampler.drop_last)
            sampler = None
        num_replicas, rank = check_sharding(num_replicas, rank)

        self.num_samples = num_samples
        self.num_epochs = None if num_epochs is None else int(num_epochs)
        if not isinstance(rule, DataRule):
            opts = dict(seed=int(seed), num_epochs=self.num_epochs, ratio=float(ratio), **(rule_options or {}))
            rule = make_rule(rule, num_samples, **opts)
        self.rule = rule
        self.anneal = float(anneal)
        self.sampler = sampler
        self.shuffle = bool(shuffle)
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = bool(drop_last)
        self.sync_scores = bool(sync_scores)
        self.pool = self._check_pool(indices)

        self.scores = np.zeros(num_samples, dtype=np.float32)
        self.seen = np.zeros(num_samples, dtype=bool)
        self._updated = np.zeros(num_samples, dtype=bool)  # scores changed since the last cross-rank sync
        self.epoch = 0
        self._epoch_set = False
        self._version = 0  # bumped whenever scores or the pool change; a plan is reused while it is current
        self._plan_version = -1
        self._plan_epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)  # this epoch's full (unsharded) index order
        self._weights = np.ones(num_samples, dtype=np.float32)
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up helpers
    def _check_pool(self, indices: Any) -> np.ndarray | None:
        if indices is None:
            return None
        arr = _as_index_array(indices, "indices")
        if arr.size == 0:
            raise ValueError("indices: expected a non-empty base index set")
        if arr.min() < 0 or arr.max() >= self.num_samples:
            raise ValueError(
                f"indices: expected values in [0, {self.num_samples - 1}], got range [{arr.min()}, {arr.max()}]"
            )
        return np.unique(arr)

    def set_indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor | None) -> None:
        """Change the base index set (takes effect at the next plan, i.e. the next ``set_epoch``)."""
        self.pool = self._check_pool(indices)
        self._version += 1

    @property
    def ratio(self) -> float:
        """The rule's strength (``DataRule.ratio``)."""
        return self.rule.ratio

    @property
    def seed(self) -> int:
        """The rule's seed, also the shuffle's."""
        return self.rule.seed

    def set_ratio(self, ratio: float) -> None:
        """Change ``ratio`` (takes effect at the next plan, i.e. the next ``set_epoch``), e.g. from a schedule
        that picks it per epoch; ``0.0`` keeps all data."""
        if not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) < 1.0):
            raise ValueError(f"ratio: expected a float in [0, 1), got {ratio!r}")
        if float(ratio) != self.ratio:
            self.rule.set_ratio(float(ratio))
            self._version += 1

    @property
    def prune_epochs(self) -> int | None:
        """Number of leading epochs in which pruning is active (``None``: every epoch)."""
        return prune_epochs(self.num_epochs, self.anneal)

    def is_annealing(self, epoch: int) -> bool:
        """True when ``epoch`` is in the final full-data phase."""
        pe = self.prune_epochs
        return pe is not None and epoch >= pe

    # ------------------------------------------------------------------ scores
    def update(self, index: Any, losses: Any) -> None:
        """Record the per-sample (unweighted) losses of a batch as the samples' scores."""
        idx = _as_index_array(index)
        if isinstance(losses, torch.Tensor):
            vals = losses.detach().float().cpu().numpy().reshape(-1)
        else:
            vals = np.asarray(losses, dtype=np.float32).reshape(-1)
        if vals.shape[0] != idx.shape[0]:
            raise ValueError(f"losses: expected {idx.shape[0]} values (one per index), got {vals.shape[0]}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(
                f"index: expected values in [0, {self.num_samples - 1}], got range [{idx.min()}, {idx.max()}]"
            )
        ok = np.isfinite(vals)  # a NaN/inf loss would poison the mean; keep the previous score
        idx, vals = idx[ok], vals[ok]
        self.rule.observe(idx, vals)
        self.scores[idx] = vals
        self.seen[idx] = True
        self._updated[idx] = True
        self._version += 1

    def weights(self, index: Any, device: torch.device | str | None = None) -> torch.Tensor:
        """Loss weights of this epoch's plan for a batch of sample indices (float32 tensor)."""
        self._ensure_plan()
        idx = _as_index_array(index)
        w = torch.from_numpy(self._weights[idx])
        return w.to(device) if device is not None else w

    def reweight(self, loss_vec: torch.Tensor, index: Any, update: bool = True) -> torch.Tensor:
        """Record ``loss_vec`` as the batch's scores (if ``update``) and return it times the plan's weights."""
        if loss_vec.dim() != 1:
            raise ValueError(
                f"loss_vec: expected a 1-D per-sample loss (reduction='none'), got shape {tuple(loss_vec.shape)}"
            )
        if update:
            self.update(index, loss_vec)
        return loss_vec * self.weights(index, device=loss_vec.device).to(loss_vec.dtype)

    def sync(self, group: Any = None) -> None:
        """Merge the scores recorded on every rank since the last sync (collective: call on all ranks)."""
        import torch.distributed as dist

        upd = torch.from_numpy(self._updated.astype(np.float64))
        val = torch.from_numpy(np.where(self._updated, self.scores, 0.0).astype(np.float64))
        backend = dist.get_backend(group)
        if backend == "nccl":
            upd, val = upd.cuda(), val.cuda()
        dist.all_reduce(upd, group=group)
        dist.all_reduce(val, group=group)
        self._merge(val.cpu().numpy(), upd.cpu().numpy())

    def _merge(self, value_sum: np.ndarray, count: np.ndarray) -> None:
        """Apply summed per-rank updates: samples updated on k ranks get the mean of their k losses."""
        hit = count > 0
        self.scores[hit] = (value_sum[hit] / count[hit]).astype(np.float32)
        self.seen |= hit
        self._updated[:] = False
        self._version += 1

    # ------------------------------------------------------------------ planning
    def set_epoch(self, epoch: int) -> None:
        """Freeze the plan for ``epoch`` from the scores recorded so far (call at each epoch start)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        if self.sync_scores:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.sync()
        self._epoch_set = True
        if self._plan_epoch == epoch and self._plan_version == self._version:
            return  # nothing changed since this epoch's plan was made (e.g. set_epoch called twice)
        self.epoch = int(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self._make_plan()

    def _ensure_plan(self) -> None:
        if self._plan_epoch != self.epoch:
            self._make_plan()

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream])

    def keep_mask(
        self, epoch: int, pool: np.ndarray | None = None, anneal: bool = True
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Plan for ``epoch`` from the current scores: (kept mask over the dataset, weights, stats).

        Pure (no state change). ``anneal=False`` ignores the full-data phase.
        """
        pool = (np.arange(self.num_samples) if self.pool is None else self.pool) if pool is None else pool
        state = RuleState(self.scores, self.seen, annealing=anneal and self.is_annealing(epoch))
        plan = self.rule.epoch_plan(int(epoch), pool, state)
        keep = np.zeros(self.num_samples, dtype=bool)
        keep[plan.indices] = True
        stats = {"epoch": int(epoch), **plan.stats}
        stats.setdefault("annealing", state.annealing)
        return keep, plan.weights, stats

    def _make_plan(self) -> None:
        epoch = self.epoch
        if self.sampler is not None:
            base = _as_index_array(list(iter(self.sampler)), "sampler")
            if base.size and (base.min() < 0 or base.max() >= self.num_samples):
                raise ValueError(
                    f"sampler: yielded indices outside [0, {self.num_samples - 1}] (range [{base.min()}, {base.max()}])"
                )
            if self.pool is not None:
                base = base[np.isin(base, self.pool)]
            pool = np.unique(base)
            if pool.size == 0:
                raise ValueError("sampler: yielded no indices for this epoch")
            keep, weights, stats = self.keep_mask(epoch, pool)
            order = base[keep[base]]
        else:
            keep, weights, stats = self.keep_mask(epoch)
            order = np.flatnonzero(keep)
            if self.shuffle:
                order = self._rng(epoch, 1).permutation(order)
        stats["yielded"] = int(order.size)
        self._order = order.astype(np.int64)
        self._weights = weights
        self._stats = stats
        self._plan_epoch = epoch
        self._plan_version = self._version

    # ------------------------------------------------------------------ Sampler protocol
    def epoch_indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, in iteration order."""
        self._ensure_plan()
        return shard_order(self._order, self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        if not self._epoch_set and self._plan_epoch is not None:
            # set_epoch was not called since the last pass: advance automatically (epoch 0, 1, 2, ...)
            self.epoch = self._plan_epoch + 1
            self._make_plan()
        self._epoch_set = False
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        self._ensure_plan()
        return per_rank_count(self._order.size, self.num_replicas, self.drop_last)

    # ------------------------------------------------------------------ introspection / export
    @property
    def stats(self) -> dict[str, Any]:
        """Counts of the current plan: pool, kept, pruned, below_mean, weight, annealing, yielded."""
        self._ensure_plan()
        return dict(self._stats)

    def kept_indices(self) -> np.ndarray:
        """Sorted dataset indices kept in the current epoch's plan (all ranks together)."""
        self._ensure_plan()
        return np.unique(self._order)

    def final_kept_indices(self) -> np.ndarray:
        """The kept set a pruning epoch would use with the final scores (anneal ignored), sorted.

        For InfoBatch: every seen sample at or above the mean loss, every unseen sample, and a seeded random
        ``1 - r`` share of the below-mean ones. Deterministic by ``seed`` and the scores.
        """
        epoch = self.num_epochs if self.num_epochs is not None else self.epoch + 1
        keep, _, _ = self.keep_mask(epoch, anneal=False)
        return np.flatnonzero(keep)

    def to_ticket(self, dataset: Any = None, labels: Any = None, extra: dict[str, Any] | None = None):
        """Export :meth:`final_kept_indices` as a :class:`data_tickets.TicketFile`.

        ``scores`` holds the last seen loss of every dataset index (``nan`` for samples never seen). Pass the
        ``dataset`` (and/or ``labels``) to store its fingerprint so training refuses a mismatched dataset.
        """
        from .dynamic_ticket import dynamic_ticket

        return dynamic_ticket(self, dataset=dataset, labels=labels, extra=extra)

    def export_ticket(
        self, path: str, dataset: Any = None, labels: Any = None, extra: dict[str, Any] | None = None
    ) -> str:
        """Write :meth:`to_ticket` to ``path`` (a ``.npz`` ticket file, atomically) and return the path."""
        self.to_ticket(dataset=dataset, labels=labels, extra=extra).save(path)
        return str(path)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-run (tensors/numbers only, loadable with ``weights_only=True``)."""
        from .dynamic_state import pruner_state

        self._ensure_plan()
        return pruner_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the dataset size and the rule must match."""
        from .dynamic_state import load_pruner_state

        load_pruner_state(self, state)
        self._plan_epoch = self.epoch
        self._version += 1
        self._plan_version = self._version
        self._epoch_set = True

    def __repr__(self) -> str:
        return (
            f"DynamicPruner(num_samples={self.num_samples}, ratio={self.ratio}, num_epochs={self.num_epochs}, "
            f"anneal={self.anneal}, seed={self.seed}, num_replicas={self.num_replicas}, rank={self.rank}, "
            f"rule={self.rule.name!r})"
        )
