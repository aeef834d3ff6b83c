"""Patch tickets: rank each image's patches (by a scorer ViT's CLS attention, or seeded at random) and keep
the best ones; :class:`PatchTicket` ties scoring, keep selection and the kept-token forward together.

* :func:`patch_attention` computes, for every image, how much attention the CLS token pays to each patch
  (last layer, or attention rollout over all layers; mean over heads). timm's fused attention
  (``F.scaled_dot_product_attention``) never materialises the weights, so a forward *pre*-hook on each
  block's attention module captures its input and the weights are recomputed as
  ``softmax(q k^T / sqrt(d))`` from the module's own ``qkv`` projection (and ``q_norm``/``k_norm``), see
  :mod:`data_tickets.attention`. Nothing is monkey-patched; the hooks are removed when the call returns.
* :func:`random_patch_scores` is the seeded random baseline; :func:`rank_patches` sorts patches best first.
* :class:`PatchTicket` selects kept patches (:meth:`PatchTicket.keep_from_rank`,
  :meth:`PatchTicket.keep_from_scores`: ``(B, K)`` indices in the layout the kept-token forward expects)
  and computes patch tickets for a whole dataset offline (a per-sample ranking that a ticket file can store).

The kept-token forward lives in :mod:`data_tickets.kept_tokens`, :func:`num_kept` and
:class:`KeepRateSchedule` in :mod:`data_tickets.keep_rate`; they are re-exported here for existing imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

# re-exported so existing ``from data_tickets.patches import ...`` lines keep working (lotus uses them)
from .keep_rate import (
    KeepRateSchedule,  # noqa: F401
    num_kept,
)
from .kept_tokens import (  # noqa: F401
    KeptPatchTokens,
    _num_patches,
    _require_vit,
    apply_patch_tickets,
    forward_kept_tokens,
)

__all__ = ["PatchTicket", "patch_attention", "random_patch_scores", "rank_patches"]

Scorer = Literal["cls_attention", "random"]


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def patch_attention(model: nn.Module, images: torch.Tensor, rollout: bool = False) -> torch.Tensor:
    """CLS attention over the patches of each image, mean over heads: ``(B, num_patches)``.

    Delegates to :func:`data_tickets.attention.cls_attention` (q/k recomputed from each block's ``qkv`` via
    a forward pre-hook; last block, or attention rollout) and runs the model in eval mode (no dropout or
    drop-path noise in the ranking), restoring its mode afterwards.
    """
    from .attention import cls_attention

    was_training = model.training
    try:
        model.eval()
        return cls_attention(model, images, layer="rollout" if rollout else -1)
    finally:
        model.train(was_training)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def random_patch_scores(index: Any, num_patches: int, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """Seeded uniform scores in [0, 1) per (sample index, patch): ``(B, num_patches)`` float32.

    A counter-based hash of ``(seed, epoch, sample index, patch)``, so a sample's random patch ticket does
    not depend on the batch it lands in or on the number of workers.
    """
    idx = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    idx = idx.reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix(_splitmix(np.array([seed], dtype=np.uint64)) ^ np.array([epoch], dtype=np.uint64))
        z = _splitmix(_splitmix(idx ^ key)[:, None] + np.arange(num_patches, dtype=np.uint64)[None, :])
    return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) / float(1 << 24))


def rank_patches(scores: torch.Tensor) -> torch.Tensor:
    """Patch indices sorted by descending score (ties broken by lower index): ``(B, N)`` int64."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _keep_from_rank(rank: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` columns of a best-first ranking, sorted spatially (see :meth:`PatchTicket.keep_from_rank`)."""
    if rank.dim() != 2:
        raise ValueError(f"rank: expected a (batch, patches) ranking, got shape {tuple(rank.shape)}")
    if k < 1:
        raise ValueError(f"keep_idx: expected at least one kept patch per image, got k={k}")
    if k > rank.shape[1]:
        raise ValueError(f"keep_idx: {k} patches requested but the ranking stores only {rank.shape[1]}")
    return torch.sort(rank[:, :k].long(), dim=1).values  # spatial order (deterministic)


# ---------------------------------------------------------------------------------------------- ticket
@dataclass
class PatchTicket:
    """Choose and use per-image patch tickets.

    Args:
        keep_rate: fraction of patches kept (see :func:`num_kept` for the rounding).
        scorer: ``"cls_attention"`` (a scorer ViT's CLS attention) or ``"random"`` (the baseline: seeded
            uniform choice with the same keep rate, fresh every epoch).
        rollout: use attention rollout over all blocks instead of the last block's attention.
        seed: seeds the random baseline.

    Typical use (on the fly)::

        ticket = PatchTicket(keep_rate=0.5)
        keep = ticket.select(scorer_model, images)            # (B, K) patch indices
        logits = ticket.forward(model, images, keep)           # compute on K of N tokens

    Offline: ``rank = ticket.compute(scorer_model, dataset)`` gives a ``(len(dataset), N)`` ranking per
    sample (best patch first); ``PatchTicket.keep_from_rank(rank[index], k)`` recovers any keep rate <= the
    stored one. From per-patch scores of your own: ``PatchTicket.keep_from_scores(scores, k)``.
    """

    keep_rate: float = 0.5
    scorer: Scorer = "cls_attention"
    rollout: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        num_kept(1, self.keep_rate)  # validates
        if self.scorer not in ("cls_attention", "random"):
            raise ValueError(f"scorer: expected 'cls_attention' or 'random', got {self.scorer!r}")

    def num_kept(self, num_patches: int, keep_rate: float | None = None) -> int:
        """Kept patch count for ``num_patches`` at ``keep_rate`` (default: this ticket's rate)."""
        return num_kept(num_patches, self.keep_rate if keep_rate is None else keep_rate)

    def scores(self, model: nn.Module, images: torch.Tensor, index: Any = None, epoch: int = 0) -> torch.Tensor:
        """Per-patch scores ``(B, N)``; higher = more informative (random: uniform by seed/epoch/index)."""
        if self.scorer == "cls_attention":
            return patch_attention(model, images, rollout=self.rollout)
        _require_vit(model, "PatchTicket")
        n = _num_patches(model, images)
        if index is None:
            index = torch.arange(images.shape[0])
        return random_patch_scores(index, n, seed=self.seed, epoch=epoch).to(images.device)

    def rank(self, model: nn.Module, images: torch.Tensor, index: Any = None, epoch: int = 0) -> torch.Tensor:
        """All patches of each image sorted best first: ``(B, N)`` int64."""
        return rank_patches(self.scores(model, images, index=index, epoch=epoch))

    def select(
        self, model: nn.Module, images: torch.Tensor, index: Any = None, epoch: int = 0, keep_rate: float | None = None
    ) -> torch.Tensor:
        """Kept patch indices ``(B, K)`` (sorted spatially) for a batch."""
        rank = self.rank(model, images, index=index, epoch=epoch)
        return _keep_from_rank(rank, self.num_kept(rank.shape[1], keep_rate))

    @staticmethod
    def keep_from_rank(rank: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
        """Kept patch indices from a best-first ranking: its first ``k`` columns, sorted spatially.

        ``rank`` is ``(B, S)`` patch indices, best first (from :meth:`rank`, :meth:`compute` or a ticket
        file; any integer dtype, torch or numpy; ``S`` may be fewer than all patches if ``k <= S``). Returns
        ``(B, k)`` int64 on ``rank``'s device, each row ascending, which is the layout
        :func:`~data_tickets.kept_tokens.forward_kept_tokens` and ``KeptPatchTokens.keep`` expect (spatial
        token order, whatever the ranking order). Raises ``ValueError`` when ``rank`` is not 2-D, ``k < 1``
        or ``k > S``.
        """
        if isinstance(rank, np.ndarray):
            rank = torch.from_numpy(rank.astype(np.int64))
        return _keep_from_rank(rank, k)

    @staticmethod
    def keep_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
        """Kept patch indices ``(B, k)`` from per-patch scores ``(B, N)`` (higher = kept first).

        The ``k`` best-scoring patches of each image (ties: lower index first), in the layout of
        :meth:`keep_from_rank`; e.g. ``keep_from_scores(random_patch_scores(index, N, seed, epoch), k)``.
        """
        if scores.dim() != 2:
            raise ValueError(f"scores: expected (batch, patches) scores, got shape {tuple(scores.shape)}")
        return _keep_from_rank(rank_patches(scores), k)

    def forward(self, model: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """:func:`forward_kept_tokens` (logits from the kept tokens only)."""
        return forward_kept_tokens(model, images, keep_idx)

    @torch.no_grad()
    def compute(
        self,
        model: nn.Module,
        dataset: Dataset,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        epoch: int = 0,
        store: int | None = None,
        progress: bool = True,
        num_workers: int = 0,
    ) -> np.ndarray:
        """Rank the patches of every sample of ``dataset`` (offline patch tickets).

        Dataset items are ``(image, ...)`` tuples (or bare images); row i of the result belongs to dataset
        index i. ``store`` limits the stored columns (the best ``store`` patches; default all, so any keep
        rate can be served later). Returns int16 (int32 for >= 32768 patches), shape ``(len(dataset), store)``.
        """
        from tqdm.auto import tqdm

        if device is None:
            device = next(model.parameters()).device
        if hasattr(dataset, "get_batch"):  # in-memory datasets (lotus): slice whole batches, no per-item work
            n = len(dataset)
            loader = (dataset.get_batch(torch.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size))
            total = -(-n // batch_size)
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            total = len(loader)
        out: list[np.ndarray] = []
        pos = 0
        for batch in tqdm(loader, total=total, desc="patch tickets", disable=not progress, leave=False):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            images = images.to(device)
            index = torch.arange(pos, pos + images.shape[0])
            pos += images.shape[0]
            rank = self.rank(model, images, index=index, epoch=epoch).cpu()
            if store is not None:
                rank = rank[:, :store]
            out.append(rank.numpy())
        if not out:
            raise ValueError("dataset: expected at least one sample to rank")
        ranks = np.concatenate(out)
        dtype = np.int16 if ranks.shape[1] <= np.iinfo(np.int16).max else np.int32
        return ranks.astype(dtype)

    def to_ticket(
        self,
        rank: np.ndarray,
        num_patches: int | None = None,
        indices: Any = None,
        dataset: Dataset | None = None,
        labels: Any = None,
        extra: dict[str, Any] | None = None,
    ):
        """Store a :meth:`compute` ranking as a :class:`data_tickets.TicketFile` (``patch_indices``).

        ``indices`` is the sample subset the ticket keeps (default: every sample). ``num_patches`` (the
        model's patch count; default ``rank.shape[1]``) is recorded so a model with another grid is refused.
        Pass ``dataset``/``labels`` to fingerprint the dataset.
        """
        from .ticket_file import TicketFile

        rank = np.asarray(rank)
        if rank.ndim != 2:
            raise ValueError(f"rank: expected a (num_samples, patches) array, got shape {list(rank.shape)}")
        n, stored = rank.shape
        num_patches = stored if num_patches is None else int(num_patches)
        idx = np.arange(n) if indices is None else np.asarray(indices)
        info = {
            "patches": {
                "keep_rate": self.keep_rate,
                "scorer": self.scorer,
                "rollout": self.rollout,
                "num_patches": num_patches,
                "stored": stored,
            }
        }
        info.update(extra or {})
        fields = dict(
            scorer=f"patch_{self.scorer}",
            policy="top" if self.scorer == "cls_attention" else "random",
            fraction=float(idx.size / n),
            seed=self.seed,
            patch_indices=rank,
            extra=info,
        )
        if dataset is None and labels is None:
            return TicketFile(idx, **fields).check()
        return TicketFile.create(idx, dataset=dataset, labels=labels, **fields)

    @staticmethod
    def rank_from_ticket(ticket: Any, num_patches: int, keep_rate: float | None = None) -> np.ndarray:
        """The per-sample patch ranking stored in a ticket file, checked against the model's patch count.

        ``keep_rate`` (optional) checks that the ranking stores enough patches for that rate.
        """
        where = f"ticket file {getattr(ticket, 'path', None) or ''}".strip()
        rank = getattr(ticket, "patch_indices", None)
        if rank is None:
            raise ValueError(f"{where}: has no patch tickets (patch_indices); compute them with PatchTicket.compute")
        info = (getattr(ticket, "extra", None) or {}).get("patches", {})
        made_for = info.get("num_patches")
        if made_for is not None and int(made_for) != num_patches:
            raise ValueError(
                f"{where}: patch tickets were made for {made_for} patches per image, the model has {num_patches}"
            )
        if rank.size and int(rank.max()) >= num_patches:
            raise ValueError(f"{where}: patch index {int(rank.max())} out of range for {num_patches} patches")
        if keep_rate is not None and num_kept(num_patches, keep_rate) > rank.shape[1]:
            raise ValueError(
                f"{where}: stores {rank.shape[1]} patches per image, keep_rate {keep_rate} needs "
                f"{num_kept(num_patches, keep_rate)}"
            )
        return rank
