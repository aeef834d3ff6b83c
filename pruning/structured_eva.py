"""``ThinnedEvaAttention``: the EVA attention timm builds, with an inner width of ``num_heads * head_dim``.

``timm.models.eva.EvaAttention.forward`` reshapes its output to the *input* width ``C``, which is wrong once
heads are removed, so a thinned EVA attention becomes this state-dict compatible subclass whose forward uses
``num_heads * head_dim``. (timm's ``Attention`` / ``AttentionRope`` already size their inner width that way
and are thinned in place.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import EvaAttention

__all__ = ["ThinnedEvaAttention"]


class ThinnedEvaAttention(EvaAttention):
    """EVA attention whose inner width is ``num_heads * head_dim`` instead of the input width.

    Same parameters and buffers (names and layout) as :class:`timm.models.eva.EvaAttention`; only the final
    reshape differs, so checkpoints of thinned EVA models load into it with ``strict=True``.
    """

    @classmethod
    def from_module(cls, src: EvaAttention, num_heads: int) -> ThinnedEvaAttention:
        """Build an instance with ``src``'s settings and ``num_heads`` heads (weights uninitialised)."""
        fused = src.qkv is not None
        ref = src.qkv if fused else src.q_proj
        has_bias = (src.q_bias is not None) if fused else (src.q_proj.bias is not None)
        qk_norm = not isinstance(src.q_norm, nn.Identity)
        scale_norm = not isinstance(src.norm, nn.Identity)
        new = cls(
            dim=ref.in_features,
            num_heads=num_heads,
            qkv_bias=has_bias,
            qkv_fused=fused,
            qkv_bias_separate=src.qkv_bias_separate,
            num_prefix_tokens=src.num_prefix_tokens,
            attn_drop=src.attn_drop.p,
            proj_drop=src.proj_drop.p,
            attn_head_dim=src.head_dim,
            # placeholder; the real (sliced) norms are installed by AttentionUnit.thin
            norm_layer=nn.LayerNorm if (qk_norm or scale_norm) else None,
            qk_norm=qk_norm,
            scale_norm=scale_norm,
            rotate_half=src.rotate_half,
            gated=src.gate is not None,
            device=ref.weight.device,
            dtype=ref.weight.dtype,
        )
        new.fused_attn = src.fused_attn
        new.train(src.training)
        return new

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        attn_dim = self.num_heads * self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None

        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if self.qkv_bias_separate:
                    qkv = self.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)

        q, k = self.q_norm(q), self.k_norm(k)

        if rope is not None:
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal)
            attn = maybe_add_mask(attn, attn_bias)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
