"""Patch tickets: rank each image's patches by a scorer ViT's CLS attention and train on the kept tokens only.

* :func:`patch_attention` computes, for every image, how much attention the CLS token pays to each patch
  (last layer, or attention rollout over all layers; mean over heads). timm's fused attention
  (``F.scaled_dot_product_attention``) never materialises the weights, so a forward *pre*-hook on each
  block's attention module captures its input and the weights are recomputed as
  ``softmax(q k^T / sqrt(d))`` from the module's own ``qkv`` projection (and ``q_norm``/``k_norm``), see
  :mod:`data_tickets.attention`. Nothing is monkey-patched; the hooks are removed when the call returns.
* :func:`forward_kept_tokens` runs a timm ``VisionTransformer`` on a subset of patch tokens per image:
  patch embedding, gather of the kept patch tokens and their position embeddings, prefix (class/register)
  tokens, blocks, final norm and head. Blocks see ``prefix + K`` tokens instead of ``prefix + N``, so the
  compute of every block really drops (attention quadratically, MLPs linearly).
* :class:`KeptPatchTokens` / :func:`apply_patch_tickets` do the same through the model's own ``forward``
  (timm's ``patch_drop`` slot), so wrapped models (DDP, FSDP2, ``torch.compile``) train on kept tokens too.
* :class:`PatchTicket` ties both together (plus a seeded random-patch baseline with the same keep rate) and
  computes patch tickets for a whole dataset offline (a per-sample ranking that a ticket file can store).
* :class:`KeepRateSchedule` gives the keep rate per epoch (step or linear between points).

The kept count for N patches and keep rate k is ``K = max(1, floor(k * N + 0.5))``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "PatchTicket", "KeepRateSchedule", "KeptPatchTokens", "apply_patch_tickets", "patch_attention",
    "forward_kept_tokens", "random_patch_scores",
    "num_kept", "rank_patches",
]

Scorer = Literal["cls_attention", "random"]


# ---------------------------------------------------------------------------------------------- helpers
def num_kept(num_patches: int, keep_rate: float) -> int:
    """Number of patches kept out of ``num_patches`` at ``keep_rate``: ``max(1, floor(k*N + 0.5))``."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate: expected a float in (0, 1], got {keep_rate!r}")
    return max(1, min(num_patches, int(math.floor(keep_rate * num_patches + 0.5))))


def _require_vit(model: nn.Module, what: str) -> None:
    missing = [a for a in ("patch_embed", "blocks", "norm", "forward_head", "num_prefix_tokens") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"{what}: expected a timm VisionTransformer (patch_embed, pos_embed, blocks, norm, forward_head), "
            f"got {type(model).__name__} without {', '.join(missing)}"
        )


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
    if k > rank.shape[1]:
        raise ValueError(f"keep_idx: {k} patches requested but the ranking stores only {rank.shape[1]}")
    return torch.sort(rank[:, :k].long(), dim=1).values  # spatial order (deterministic)


# ---------------------------------------------------------------------------------------------- forward
def _check_keep_idx(keep_idx: torch.Tensor, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    if not isinstance(keep_idx, torch.Tensor):
        keep_idx = torch.as_tensor(np.asarray(keep_idx))
    if keep_idx.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"keep_idx: expected integer patch indices, got dtype {keep_idx.dtype}")
    keep_idx = keep_idx.to(device=device, dtype=torch.long)
    if keep_idx.dim() == 1:
        keep_idx = keep_idx.unsqueeze(0).expand(batch, -1)
    if keep_idx.dim() != 2 or keep_idx.shape[0] != batch:
        raise ValueError(f"keep_idx: expected shape (K,) or ({batch}, K), got {tuple(keep_idx.shape)}")
    if keep_idx.shape[1] == 0:
        raise ValueError("keep_idx: expected at least one kept patch per image")
    lo, hi = int(keep_idx.min()), int(keep_idx.max())
    if lo < 0 or hi >= num_patches:
        raise ValueError(f"keep_idx: expected patch indices in [0, {num_patches - 1}], got range [{lo}, {hi}]")
    return keep_idx


def forward_kept_tokens(
    model: nn.Module,
    images: torch.Tensor,
    keep_idx: torch.Tensor,
    pre_logits: bool = False,
) -> torch.Tensor:
    """Logits of a timm ``VisionTransformer`` that sees only the patches ``keep_idx`` of each image.

    ``keep_idx`` is ``(B, K)`` (or ``(K,)`` shared by the batch) indices into the row-major patch grid.
    Equivalent to ``model(images)`` when every patch is kept (any order: attention is permutation
    equivariant and the patch's position embedding travels with it). Handles class and register tokens,
    ``no_embed_class``, ``dynamic_img_size`` (position embeddings resampled to the input grid), pre-norm,
    patch dropout and gradient checkpointing.
    """
    _require_vit(model, "forward_kept_tokens")
    x = model.patch_embed(images)
    grid = None
    if x.dim() == 4:  # dynamic_img_size: NHWC
        B, H, W, C = x.shape
        grid = (H, W)
        x = x.reshape(B, H * W, C)
    B, N, C = x.shape
    keep_idx = _check_keep_idx(keep_idx, B, N, x.device)
    x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, C))

    npt = int(model.num_prefix_tokens)
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    prefix = []
    if getattr(model, "cls_token", None) is not None:
        prefix.append(model.cls_token.expand(B, -1, -1))
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(B, -1, -1))
    prefix_x = torch.cat(prefix, dim=1) if prefix else None

    pos = getattr(model, "pos_embed", None)
    if pos is not None:
        pos_prefix = 0 if no_embed_class else npt
        if grid is not None and getattr(model, "dynamic_img_size", False):
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=model.patch_embed.grid_size,
                                         num_prefix_tokens=pos_prefix)
        if pos.shape[1] != N + pos_prefix:
            raise ValueError(
                f"forward_kept_tokens: pos_embed has {pos.shape[1]} positions, expected {N + pos_prefix} "
                f"for {N} patches (image size differs from the model's; build it with dynamic_img_size=True)"
            )
        x = x + pos[0, pos_prefix:][keep_idx]
        if prefix_x is not None and pos_prefix:
            prefix_x = prefix_x + pos[:, :pos_prefix]
    if prefix_x is not None:
        x = torch.cat([prefix_x, x], dim=1)
    x = model.pos_drop(x) if hasattr(model, "pos_drop") else x
    x = model.patch_drop(x) if hasattr(model, "patch_drop") else x
    x = model.norm_pre(x) if hasattr(model, "norm_pre") else x
    if getattr(model, "grad_checkpointing", False) and not torch.jit.is_scripting():
        from timm.models import checkpoint_seq

        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    x = model.norm(x)
    return model.forward_head(x, pre_logits=pre_logits)


class KeptPatchTokens(nn.Module):
    """Drop-in for a timm ViT's ``patch_drop`` slot that keeps only chosen patch tokens of each image.

    timm's ``VisionTransformer.forward_features`` calls ``self.patch_drop(x)`` right after the position
    embedding (the slot timm's own random ``PatchDropout`` uses), so putting this module there makes the
    model's *own* forward run its blocks on ``prefix + K`` tokens. Unlike :func:`forward_kept_tokens` this
    goes through ``model(images)``, so DDP/FSDP2 wrappers, activation-checkpoint wrappers and
    ``torch.compile`` keep working. No keep set = identity (full tokens, e.g. for evaluation). The module
    has no parameters, so state dicts are unchanged. Install it with :func:`apply_patch_tickets`.
    """

    def __init__(self, num_prefix_tokens: int, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.inner = inner if inner is not None else nn.Identity()  # the model's original patch_drop
        self.keep_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_idx is not None:
            npt = self.num_prefix_tokens
            B, L, C = x.shape
            idx = _check_keep_idx(self.keep_idx, B, L - npt, x.device)
            patches = torch.gather(x[:, npt:], 1, idx.unsqueeze(-1).expand(-1, -1, C))
            x = torch.cat([x[:, :npt], patches], dim=1) if npt else patches
        return self.inner(x)

    @contextmanager
    def keep(self, keep_idx: torch.Tensor | None) -> Iterator[None]:
        """Within the block, forwards keep ``keep_idx`` ((B, K) or (K,)) patch tokens; ``None`` keeps all."""
        prev, self.keep_idx = self.keep_idx, keep_idx
        try:
            yield
        finally:
            self.keep_idx = prev

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


def apply_patch_tickets(model: nn.Module) -> KeptPatchTokens:
    """Install :class:`KeptPatchTokens` in ``model.patch_drop`` (idempotent) and return it.

    Usage::

        kept = apply_patch_tickets(model)
        with kept.keep(keep_idx):
            logits = model(images)        # blocks see the kept tokens only
    """
    _require_vit(model, "apply_patch_tickets")
    current = getattr(model, "patch_drop", None)
    if isinstance(current, KeptPatchTokens):
        return current
    if not hasattr(model, "patch_drop"):
        raise ValueError(f"apply_patch_tickets: {type(model).__name__} has no patch_drop slot (timm VisionTransformer)")
    module = KeptPatchTokens(int(model.num_prefix_tokens), inner=current)
    model.patch_drop = module
    return module


# ---------------------------------------------------------------------------------------------- schedule
@dataclass
class KeepRateSchedule:
    """Keep rate per epoch from ``(epoch, keep_rate)`` points.

    ``mode="step"``: the rate of the last point whose epoch is <= the current epoch (before the first point:
    the first point's rate). ``mode="linear"``: linear interpolation between points, constant outside.
    Example: ``[(0, 1.0), (2, 0.5), (9, 1.0)]`` = full tokens for 2 epochs, half until epoch 9, full after.
    """

    points: Sequence[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.5)])
    mode: Literal["step", "linear"] = "step"

    def __post_init__(self) -> None:
        pts = []
        for i, p in enumerate(self.points):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f"schedule[{i}]: expected an [epoch, keep_rate] pair, got {p!r}")
            try:
                e, r = float(p[0]), float(p[1])
            except (TypeError, ValueError):
                raise ValueError(f"schedule[{i}]: expected numbers [epoch, keep_rate], got {list(p)!r}") from None
            if e < 0:
                raise ValueError(f"schedule[{i}]: epoch must be >= 0, got {p[0]!r}")
            if not 0.0 < r <= 1.0:
                raise ValueError(f"schedule[{i}]: keep_rate must be in (0, 1], got {p[1]!r}")
            if pts and e <= pts[-1][0]:
                raise ValueError(f"schedule[{i}]: epochs must increase, got {p[0]!r} after {pts[-1][0]!r}")
            pts.append((e, r))
        if not pts:
            raise ValueError("schedule: expected at least one [epoch, keep_rate] point")
        if self.mode not in ("step", "linear"):
            raise ValueError(f"schedule mode: expected 'step' or 'linear', got {self.mode!r}")
        self.points = pts

    def __call__(self, epoch: float) -> float:
        pts = self.points
        if epoch <= pts[0][0]:
            return pts[0][1]
        for (e0, r0), (e1, r1) in zip(pts, pts[1:]):
            if epoch < e1:
                if self.mode == "step":
                    return r0
                return r0 + (r1 - r0) * (epoch - e0) / (e1 - e0)
        return pts[-1][1]

    @property
    def min_rate(self) -> float:
        return min(r for _, r in self.points)


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
    stored one.
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

    def select(self, model: nn.Module, images: torch.Tensor, index: Any = None, epoch: int = 0,
               keep_rate: float | None = None) -> torch.Tensor:
        """Kept patch indices ``(B, K)`` (sorted spatially) for a batch."""
        rank = self.rank(model, images, index=index, epoch=epoch)
        return _keep_from_rank(rank, self.num_kept(rank.shape[1], keep_rate))

    @staticmethod
    def keep_from_rank(rank: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
        """First ``k`` patches of a stored ranking, sorted spatially: ``(B, k)`` int64."""
        if isinstance(rank, np.ndarray):
            rank = torch.from_numpy(rank.astype(np.int64))
        return _keep_from_rank(rank, k)

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
        info = {"patches": {"keep_rate": self.keep_rate, "scorer": self.scorer, "rollout": self.rollout,
                            "num_patches": num_patches, "stored": stored}}
        info.update(extra or {})
        fields = dict(scorer=f"patch_{self.scorer}", policy="top" if self.scorer == "cls_attention" else "random",
                      fraction=float(idx.size / n), seed=self.seed, patch_indices=rank, extra=info)
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
            raise ValueError(f"{where}: patch tickets were made for {made_for} patches per image, "
                             f"the model has {num_patches}")
        if rank.size and int(rank.max()) >= num_patches:
            raise ValueError(f"{where}: patch index {int(rank.max())} out of range for {num_patches} patches")
        if keep_rate is not None and num_kept(num_patches, keep_rate) > rank.shape[1]:
            raise ValueError(f"{where}: stores {rank.shape[1]} patches per image, keep_rate {keep_rate} needs "
                             f"{num_kept(num_patches, keep_rate)}")
        return rank


def _num_patches(model: nn.Module, images: torch.Tensor) -> int:
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size(tuple(images.shape[-2:]))
        return int(gh * gw)
    return int(pe.num_patches)
