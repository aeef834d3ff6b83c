"""Outlier-Protected (OP) transformer block for timm ViTs (He et al., NeurIPS 2024, "Understanding and
Minimising Outlier Features in Transformer Training").

Pre-LN blocks are a main source of outlier features (neurons whose activations are far above the width's
average), which hurt int8 quantisation. The OP block removes the normalisation layers inside each block and
keeps training stable with:

- an entropy regulation mechanism in attention: per-head QK-RMSNorm (``qk_norm: rms``) or tanh soft-capping
  of the attention logits (``qk_norm: tanh``, as in Grok-1 / Gemma 2), so attention cannot collapse;
- down-weighted residual branches ``x + beta * f(x)`` with ``beta`` about ``1/sqrt(depth)`` (optionally
  trainable; stored as 1-D parameters so Lotus' optimiser puts them in the no-weight-decay group);
- one norm after the patch embedding (timm's ``pre_norm``) and an optional trainable input scale ``alpha``;
- a switch for the final norm before the head.

The block is a drop-in ``block_fn`` for ``timm.models.vision_transformer.VisionTransformer``: its attention is
timm's own :class:`~timm.layers.Attention` (``qk_norm=True`` with ``RmsNorm`` for QK-RMSNorm; a small subclass
only for tanh soft-capping) and its MLP is timm's ``Mlp`` (``fc1``/``fc2``), so structured head/neuron
pruning, 2:4 masks, patch tickets (any token count) and forward hooks work exactly as on the Pre-LN block.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, LayerScale, Mlp, RmsNorm
from timm.models.vision_transformer import VisionTransformer

from lotus.features.outliers.op_config import OPConfig

__all__ = ["OPConfig", "SoftcapAttention", "OPBlock", "op_model_kwargs", "build_op_vit", "resolve_beta"]


def resolve_beta(op_cfg: OPConfig, depth: int) -> float:
    """The residual-branch gain: ``op_cfg.beta`` or ``1/sqrt(depth)``."""
    if op_cfg.beta is not None:
        return float(op_cfg.beta)
    if depth < 1:
        raise ValueError(f"model.op.beta: cannot derive 1/sqrt(depth) for depth {depth}; set model.op.beta")
    return 1.0 / math.sqrt(depth)


def _gain(value: float, trainable: bool) -> nn.Parameter:
    # 1-D (not 0-D) so checkpoints, FSDP sharding and the ndim<=1 no-weight-decay rule all treat it alike.
    return nn.Parameter(torch.full((1,), float(value)), requires_grad=trainable)


class SoftcapAttention(Attention):
    """timm ``Attention`` whose logits are soft-capped: ``softcap * tanh(logits / softcap)`` (Grok-1, Gemma 2).

    The tanh alternative to QK-RMSNorm as the OP block's entropy regulation. Same parameters, names and
    ``num_heads``/``head_dim`` bookkeeping as timm's ``Attention``; only the logits differ, so it needs the
    explicit (non-SDPA) attention path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        softcap: float = 30.0,
        **dd: Any,
    ) -> None:
        if not softcap > 0:
            raise ValueError(f"model.op.softcap: expected a float > 0, got {softcap!r}")
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
        )
        self.softcap = float(softcap)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, softcap={self.softcap}"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        # num_heads * head_dim (not a cached attn_dim) so structured head pruning only has to update num_heads.
        inner = self.num_heads * self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if is_causal:
            logits = logits + logits.new_full((N, N), float("-inf")).triu_(1)
        elif attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        x = self.attn_drop(logits.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, inner)
        x = getattr(self, "norm", nn.Identity())(x)
        x = self.proj(x)
        return self.proj_drop(x)


def _attention(
    dim: int,
    num_heads: int,
    qkv_bias: bool,
    proj_bias: bool,
    attn_drop: float,
    proj_drop: float,
    qk_norm: str,
    softcap: float,
    dd: dict,
) -> nn.Module:
    """Plain timm ``Attention`` (with per-head RmsNorm on q and k for ``rms``) or :class:`SoftcapAttention`.

    Using timm's own class wherever it can express the mode keeps structured pruning, checkpoint keys and
    fused SDPA exactly as for standard ViTs.
    """
    common = dict(
        num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd
    )
    if qk_norm == "rms":
        return Attention(dim, qk_norm=True, norm_layer=RmsNorm, **common)
    if qk_norm == "none":
        return Attention(dim, **common)
    if qk_norm == "tanh":
        return SoftcapAttention(dim, softcap=softcap, **common)
    raise ValueError(f"model.op.qk_norm: expected 'rms' | 'tanh' | 'none', got {qk_norm!r}")


class OPBlock(nn.Module):
    """Outlier-Protected block: ``x + beta_attn * attn(x)``, then ``x + beta_mlp * mlp(x)``, with no norms.

    Accepts every keyword timm's ``VisionTransformer`` passes to ``block_fn``; ``norm_layer``, the boolean
    ``qk_norm`` and ``attn_layer`` from timm are ignored (the OP settings are ``qk_norm_type``/``softcap``).
    ``norm1``/``norm2`` exist as ``nn.Identity`` so code written for timm's ``Block`` (``blk.attn(blk.norm1(x))``)
    keeps working.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,  # timm's switch; superseded by qk_norm_type
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        mlp_layer: type[nn.Module] = Mlp,
        depth: int = 0,
        *,
        beta: float = 1.0,
        trainable_beta: bool = True,
        qk_norm_type: Literal["rms", "tanh", "none"] = "rms",
        softcap: float = 30.0,
        input_scale: float | None = None,
        trainable_input_scale: bool = True,
        device: Any = None,
        dtype: Any = None,
        **_ignored: Any,  # scale_attn_norm, scale_mlp_norm, attn_layer, ... of newer/older timm
    ) -> None:
        super().__init__()
        dd = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if not beta > 0:
            raise ValueError(f"model.op.beta: expected a float > 0, got {beta!r}")
        self.layer_index = depth
        # Optional trainable input scale alpha, held by the first block so it applies after the embedding norm.
        if input_scale is not None and depth == 0:
            self.input_scale = _gain(input_scale, trainable_input_scale)
        else:
            self.register_parameter("input_scale", None)
        self.norm1 = nn.Identity()
        self.attn = _attention(dim, num_heads, qkv_bias, proj_bias, attn_drop, proj_drop, qk_norm_type, softcap, dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.beta_attn = _gain(beta, trainable_beta)

        self.norm2 = nn.Identity()
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.beta_mlp = _gain(beta, trainable_beta)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        a = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(a) * self.beta_attn)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))) * self.beta_mlp)
        return x


def op_model_kwargs(op_cfg: OPConfig, depth: int) -> dict:
    """kwargs for ``timm.create_model`` of any ``VisionTransformer`` that switch its blocks to OP blocks."""
    block_fn = partial(
        OPBlock,
        beta=resolve_beta(op_cfg, depth),
        trainable_beta=op_cfg.trainable_beta,
        qk_norm_type=op_cfg.qk_norm,
        softcap=op_cfg.softcap,
        input_scale=op_cfg.input_scale,
        trainable_input_scale=op_cfg.trainable_input_scale,
    )
    return {"block_fn": block_fn, "pre_norm": op_cfg.embed_norm, "final_norm": op_cfg.final_norm}


def build_op_vit(op_cfg: OPConfig | None = None, **timm_kwargs: Any) -> nn.Module:
    """A timm ``VisionTransformer`` with OP blocks; ``timm_kwargs`` as for ``VisionTransformer(...)``."""
    op_cfg = op_cfg or OPConfig()
    depth = int(timm_kwargs.get("depth", 12))
    return VisionTransformer(**{**timm_kwargs, **op_model_kwargs(op_cfg, depth)})
