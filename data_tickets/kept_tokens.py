"""Kept-token forward of a timm ViT: train and evaluate on a subset of each image's patch tokens.

* :func:`forward_kept_tokens` runs a timm ``VisionTransformer`` on a subset of patch tokens per image:
  patch embedding, gather of the kept patch tokens and their position embeddings, prefix (class/register)
  tokens, blocks, final norm and head. Blocks see ``prefix + K`` tokens instead of ``prefix + N``, so the
  compute of every block really drops (attention quadratically, MLPs linearly).
* :class:`KeptPatchTokens` / :func:`apply_patch_tickets` do the same through the model's own ``forward``
  (timm's ``patch_drop`` slot), so wrapped models (DDP, FSDP2, ``torch.compile``) train on kept tokens too.
  Each timm family calls that slot its own way: ``VisionTransformer`` (and subclasses such as DeiT's
  distilled model) expects a tensor back; ``Eva`` (EVA-02 and the other rotary-embedding ViTs in
  ``timm.models.eva``) expects ``(x, keep_indices)`` and slices its rotary embedding with the indices.
  ``VisionTransformerSAM`` (windowed attention on the patch grid) and ``NaFlexVit`` (variable-resolution
  sequences, no fixed grid) are refused.

Kept indices are ``(B, K)`` (or ``(K,)`` shared by the batch) integer indices into the row-major patch grid,
e.g. from :meth:`data_tickets.PatchTicket.keep_from_rank`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

__all__ = ["forward_kept_tokens", "KeptPatchTokens", "apply_patch_tickets", "patch_count"]


def _families() -> tuple[tuple[type, bool | str], ...]:
    """(timm class, contract) in lookup order: True = the caller unpacks ``(x, keep_indices)`` from
    ``patch_drop``, False = it takes a tensor, a string = why the family is refused."""
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return (
        (Eva, True),
        (
            VisionTransformerSAM,
            "its blocks run windowed attention on the (H, W) patch grid, so tokens cannot be dropped",
        ),
        (NaFlexVit, "it embeds variable-resolution patch sequences, with no fixed patch grid to keep patches of"),
        (VisionTransformer, False),
    )


def _family_contract(model: nn.Module) -> bool | str | None:
    """The contract of ``model``'s timm family (see :func:`_families`), or None for another class."""
    for cls, contract in _families():
        if isinstance(model, cls):
            return contract
    return None


def _patch_drop_contract(model: nn.Module, what: str) -> bool:
    """Whether ``model``'s forward expects ``(x, keep_indices)`` (True) or a tensor (False) from its
    ``patch_drop`` slot; a ``ValueError`` naming the class when kept tokens cannot be supported."""
    from timm.layers import PatchDropout, PatchDropoutWithIndices

    contract = _family_contract(model)
    if isinstance(contract, str):
        raise ValueError(f"{what}: {type(model).__name__} is not supported ({contract})")
    if contract is not None:
        return contract
    slot = getattr(model, "patch_drop", None)
    if isinstance(slot, PatchDropoutWithIndices):  # another family: its own module says what its caller expects
        return True
    if isinstance(slot, (PatchDropout, nn.Identity)):
        return False
    raise ValueError(
        f"{what}: {type(model).__name__} is not supported (cannot tell what its forward expects "
        f"from its patch_drop slot, a {type(slot).__name__})"
    )


def _require_vit(model: nn.Module, what: str) -> None:
    """Raise a ``ValueError`` (prefixed ``what``) unless ``model`` has a timm VisionTransformer's parts."""
    missing = [
        a for a in ("patch_embed", "blocks", "norm", "forward_head", "num_prefix_tokens") if not hasattr(model, a)
    ]
    if missing:
        raise ValueError(
            f"{what}: expected a timm VisionTransformer (patch_embed, pos_embed, blocks, norm, forward_head), "
            f"got {type(model).__name__} without {', '.join(missing)}"
        )


def _num_patches(model: nn.Module, images: torch.Tensor) -> int:
    """Patch count of ``model`` for ``images`` (the input's grid under ``dynamic_img_size``)."""
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size(tuple(images.shape[-2:]))
        return int(gh * gw)
    return int(pe.num_patches)


patch_count = _num_patches  # public name: the patch count of ``model`` for a batch of ``images``


def _check_keep_idx(keep_idx: torch.Tensor, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """``keep_idx`` as a checked ``(batch, K)`` int64 tensor on ``device`` (a ``(K,)`` one is broadcast)."""
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
    contract = _family_contract(model)
    if contract is not None and contract is not False:  # Eva (rotary embeddings), or a refused family
        why = contract if isinstance(contract, str) else "its forward applies rotary position embeddings"
        raise ValueError(
            f"forward_kept_tokens: {type(model).__name__} is not supported ({why}); "
            "use apply_patch_tickets(model) and model(images) for Eva models"
        )
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

            pos = resample_abs_pos_embed(
                pos, new_size=grid, old_size=model.patch_embed.grid_size, num_prefix_tokens=pos_prefix
            )
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
    x = model.patch_drop(x) if getattr(model, "patch_drop", None) is not None else x
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

    ``with_indices`` follows the caller's contract: ``False`` returns the tokens (timm ``VisionTransformer``),
    ``True`` returns ``(tokens, keep_indices)`` with ``(B, K)`` patch indices, or ``None`` when all are kept
    (timm ``Eva``, which slices its rotary embedding with them). The model's original module (``inner``,
    e.g. timm's random patch dropout) runs on the kept tokens; indices it returns are composed with ours.
    """

    def __init__(self, num_prefix_tokens: int, inner: nn.Module | None = None, with_indices: bool = False) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.inner = inner if inner is not None else nn.Identity()  # the model's original patch_drop
        self.with_indices = bool(with_indices)
        self.keep_idx: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        idx = None
        if self.keep_idx is not None:
            npt = self.num_prefix_tokens
            B, L, C = x.shape
            idx = _check_keep_idx(self.keep_idx, B, L - npt, x.device)
            patches = torch.gather(x[:, npt:], 1, idx.unsqueeze(-1).expand(-1, -1, C))
            x = torch.cat([x[:, :npt], patches], dim=1) if npt else patches
        out = self.inner(x)
        if not self.with_indices:
            return out
        x, inner_idx = out if isinstance(out, tuple) else (out, None)
        if inner_idx is not None:  # the original dropout kept a subset of our kept patches
            idx = inner_idx if idx is None else torch.gather(idx, 1, inner_idx)
        return x, idx

    @contextmanager
    def keep(self, keep_idx: torch.Tensor | None) -> Iterator[None]:
        """Within the block, forwards keep ``keep_idx`` ((B, K) or (K,)) patch tokens; ``None`` keeps all."""
        prev, self.keep_idx = self.keep_idx, keep_idx
        try:
            yield
        finally:
            self.keep_idx = prev

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, with_indices={self.with_indices}"


def apply_patch_tickets(model: nn.Module) -> KeptPatchTokens:
    """Install :class:`KeptPatchTokens` in ``model.patch_drop`` (idempotent) and return it.

    Supports timm ``VisionTransformer`` (and subclasses) and ``Eva``; raises a ``ValueError`` naming the class
    for families whose forward cannot run on kept tokens (see the module docstring). Usage::

        kept = apply_patch_tickets(model)
        with kept.keep(keep_idx):
            logits = model(images)        # blocks see the kept tokens only
    """
    current = getattr(model, "patch_drop", None)
    if isinstance(current, KeptPatchTokens):
        return current
    reason = _family_contract(model)
    if isinstance(reason, str):  # a refused family: say why before listing missing parts
        raise ValueError(f"apply_patch_tickets: {type(model).__name__} is not supported ({reason})")
    _require_vit(model, "apply_patch_tickets")
    if not hasattr(model, "patch_drop"):
        raise ValueError(f"apply_patch_tickets: {type(model).__name__} has no patch_drop slot (timm VisionTransformer)")
    with_indices = _patch_drop_contract(model, "apply_patch_tickets")
    module = KeptPatchTokens(int(model.num_prefix_tokens), inner=current, with_indices=with_indices)
    model.patch_drop = module
    return module
