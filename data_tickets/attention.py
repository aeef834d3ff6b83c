"""CLS-token attention of timm-style ViTs, recovered from q and k.

timm's ``Attention`` uses fused ``scaled_dot_product_attention`` and never materialises the attention
weights. We register a forward *pre*-hook on each block's attention module, take its input tokens ``x``
(already normed by the block), and recompute ``softmax(q k^T * scale)`` from the module's own ``qkv``,
``q_norm`` and ``k_norm`` layers. Nothing in the model is patched or replaced; the hooks are removed on exit.

Works with any attention module exposing ``qkv`` (Linear to 3*heads*head_dim), ``num_heads`` and
optionally ``head_dim``/``scale``/``q_norm``/``k_norm``/``softcap`` (timm ``Attention`` and subclasses such
as the OP block's soft-capped attention), inside a model
with ``blocks`` (each holding ``.attn``), ``num_prefix_tokens`` and a class token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["cls_attention", "capture_attention"]


def _attn_modules(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(
            f"cls_attention needs a ViT with a `blocks` list (timm VisionTransformer), got {type(model).__name__}"
        )
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
            raise ValueError(
                f"cls_attention: blocks[{i}].attn has no fused `qkv` Linear and `num_heads` "
                "(expected a timm Attention module)"
            )
        mods.append(attn)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("cls_attention needs a ViT with a class token (class_token=True)")
    return mods


def _attention_probs(attn: nn.Module, x: torch.Tensor, cls_only: bool) -> torch.Tensor:
    """softmax(q k^T * scale) per head: [B, H, 1 or N, N]."""
    B, N, _ = x.shape
    H = attn.num_heads
    hd = getattr(attn, "head_dim", attn.qkv.out_features // (3 * H))
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    if cls_only:
        q = q[:, :, :1]
    scale = getattr(attn, "scale", hd**-0.5)
    logits = q.float() @ k.float().transpose(-2, -1) * scale
    cap = getattr(attn, "softcap", None)
    if isinstance(cap, (int, float)) and cap > 0:  # soft-capped logits (e.g. lotus' OP block attention)
        logits = cap * torch.tanh(logits / cap)
    return logits.softmax(dim=-1)


@contextmanager
def capture_attention(model: nn.Module, layers: list[int] | None = None, cls_only: bool = True):
    """Context manager collecting attention probabilities of the chosen blocks during forwards.

    Yields a dict ``{layer: [B, H, 1 or N, N] tensor}`` filled by the next forward pass.
    """
    mods = _attn_modules(model)
    chosen = range(len(mods)) if layers is None else [i % len(mods) for i in layers]
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            store[i] = _attention_probs(module, x, cls_only)

        return hook

    try:
        for i in chosen:
            handles.append(mods[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor, layer: int | str = -1) -> torch.Tensor:
    """Attention of the CLS token over the patch tokens, mean over heads: ``[B, num_patches]``.

    ``layer``: a block index (default the last block) or ``"rollout"`` (Abnar & Zuidema attention rollout:
    per layer ``0.5*A + 0.5*I`` renormalised, multiplied through all blocks). Rows sum to 1 over patches
    (prefix tokens such as CLS/register tokens are dropped and the rest renormalised). Runs one forward pass.
    """
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    rollout = isinstance(layer, str)
    if rollout and layer != "rollout":
        raise ValueError(f"layer: expected a block index or 'rollout', got {layer!r}")
    with capture_attention(model, None if rollout else [int(layer)], cls_only=not rollout) as store:
        model(images)
    if rollout:
        joint = None
        for i in sorted(store):
            a = store[i].mean(dim=1)  # [B, N, N]
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = a / a.sum(dim=-1, keepdim=True)
            joint = a if joint is None else a @ joint
        cls = joint[:, 0]
    else:
        cls = next(iter(store.values())).mean(dim=1)[:, 0]  # [B, N]
    patches = cls[:, n_prefix:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
