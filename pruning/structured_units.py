"""Prunable units of timm ViT blocks: which tensors hold each attention head / MLP neuron, and how to cut them.

A *unit* is one attention module (groups = heads, ``head_dim`` channels each) or one MLP (groups = hidden
neurons, one channel each). Every tensor coupled to the unit's groups is listed as a :class:`Coupled` entry
(qkv rows, proj columns, fc1 rows, fc2 columns, q/v biases, inner norms), so importance scoring and
physical slicing both come from one description of the module.

Supported modules (exact types; subclasses may change ``forward`` and are refused unless declared with
:func:`register_attention`):
attention ``timm.layers.Attention`` (ViT/DeiT), ``timm.layers.AttentionRope`` (fused or separate q/k/v,
no grouped-query attention), ``timm.models.eva.EvaAttention`` (fused qkv with q/v bias or separate q/k/v);
MLP ``timm.layers.Mlp``, ``GluMlp`` (SwiGLU packed), ``SwiGLU``.

timm's ``Attention`` and ``AttentionRope`` compute their inner width as ``num_heads * head_dim``
(``attn_dim``), so a thinned one is the same module timm would build with ``attn_head_dim`` and fewer heads;
only its declared sizes change. ``EvaAttention.forward`` reshapes its output to the *input* width ``C``,
which is wrong once heads are removed, so a thinned EVA attention becomes :class:`ThinnedEvaAttention`, a
state-dict compatible subclass whose forward uses ``num_heads * head_dim``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize, skip_init

from timm.layers import (
    Attention,
    AttentionRope,
    GluMlp,
    LayerNorm as TimmLayerNorm,
    Mlp,
    RmsNorm as TimmRmsNorm,
    SwiGLU,
    apply_rot_embed_cat,
    maybe_add_mask,
    resolve_self_attn_mask,
)
from timm.models.eva import EvaAttention

__all__ = [
    "Coupled",
    "Unit",
    "AttentionUnit",
    "MlpUnit",
    "BlockUnits",
    "ThinnedEvaAttention",
    "find_blocks",
    "register_attention",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MLP",
]


class ThinnedEvaAttention(EvaAttention):
    """EVA attention whose inner width is ``num_heads * head_dim`` instead of the input width.

    Same parameters and buffers (names and layout) as :class:`timm.models.eva.EvaAttention`; only the final
    reshape differs, so checkpoints of thinned EVA models load into it with ``strict=True``.
    """

    @classmethod
    def from_module(cls, src: EvaAttention, num_heads: int) -> "ThinnedEvaAttention":
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
            rope: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
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
            half = getattr(self, 'rotate_half', False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.,
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


SUPPORTED_ATTENTION: tuple[type, ...] = (Attention, AttentionRope, EvaAttention, ThinnedEvaAttention)
SUPPORTED_MLP: tuple[type, ...] = (Mlp, GluMlp, SwiGLU)
_REGISTERED_ATTENTION: set[type] = set()


def register_attention(cls: type) -> type:
    """Declare a subclass of timm ``Attention`` / ``AttentionRope`` as thinnable like its base class.

    Subclasses are refused by default because their ``forward`` may assume the original width. Register one
    (also usable as a class decorator) only if it keeps the base class's parameters and sizes its inner width
    as ``num_heads * head_dim`` (or ``attn_dim``): thinning then updates ``num_heads``/``attn_dim`` as for
    the base class.
    """
    if not (isinstance(cls, type) and issubclass(cls, (Attention, AttentionRope))):
        raise ValueError(f"register_attention: expected a subclass of timm Attention or AttentionRope, got {cls!r}")
    _REGISTERED_ATTENTION.add(cls)
    return cls


def _is_supported_attention(m: nn.Module) -> bool:
    return type(m) in SUPPORTED_ATTENTION or type(m) in _REGISTERED_ATTENTION
_SUPPORTED_TEXT = ("supported: attention timm Attention/AttentionRope/EvaAttention, "
                   "MLP timm Mlp/GluMlp/SwiGLU")


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------------------------
# slicing primitives (new modules, never resized in place)

def _check_linear(lin: nn.Module, where: str) -> nn.Linear:
    if parametrize.is_parametrized(lin):
        raise ValueError(f"{where} with a parametrization (make pruning masks permanent first)")
    if type(lin) is not nn.Linear:
        raise ValueError(f"{where} ({_qualname(lin)}, expected a plain torch.nn.Linear)")
    return lin


def sliced_linear(lin: nn.Linear, out_idx: Optional[torch.Tensor] = None,
                  in_idx: Optional[torch.Tensor] = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected output rows / input columns of ``lin``."""
    with torch.no_grad():
        w = lin.weight
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
        if in_idx is not None:
            w = w.index_select(1, in_idx.to(w.device))
        b = lin.bias
        if b is not None and out_idx is not None:
            b = b.index_select(0, out_idx.to(b.device))
        elif b is not None:
            b = b.clone()
    new = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    new.train(lin.training)
    return new


def _norm_factory(norm: nn.Module, where: str = "inner norm") -> Callable[[int], nn.Module]:
    """Constructor of a same-type norm over ``n`` channels (only norms with a known signature)."""
    t = type(norm)
    has_w = getattr(norm, "weight", None) is not None
    has_b = getattr(norm, "bias", None) is not None
    dd = {}
    if has_w:
        dd = {"device": norm.weight.device, "dtype": norm.weight.dtype}
    if t is nn.LayerNorm:
        return lambda n: nn.LayerNorm(n, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                                      bias=has_b, **dd)
    if t is TimmLayerNorm:
        return lambda n: TimmLayerNorm(n, eps=norm.eps, affine=norm.elementwise_affine, bias=has_b, **dd)
    if t is TimmRmsNorm:
        return lambda n: TimmRmsNorm(n, eps=norm.eps, affine=norm.elementwise_affine, **dd)
    if t is nn.RMSNorm:
        return lambda n: nn.RMSNorm(n, eps=norm.eps, elementwise_affine=norm.elementwise_affine, **dd)
    raise ValueError(f"{where} ({_qualname(norm)}; resizable norms: nn.LayerNorm, nn.RMSNorm, "
                     f"timm LayerNorm/RmsNorm)")


def sliced_norm(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A new norm of the same type over the channels ``idx`` of ``norm`` (Identity passes through)."""
    if isinstance(norm, nn.Identity):
        return norm
    new = _norm_factory(norm)(int(idx.numel()))
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src = getattr(norm, pname, None)
            if src is not None:
                dst = getattr(new, pname)
                dst.copy_(src.index_select(0, idx.to(src.device)))
                dst.requires_grad_(src.requires_grad)
    new.train(norm.training)
    return new


# --------------------------------------------------------------------------------------------------------------
# unit descriptions

@dataclass
class Coupled:
    """One tensor whose dimension ``dim`` is laid out as ``[repeats, groups, group_size]`` channels.

    ``path`` is relative to the unit (``"qkv.weight"``); ``consumer`` marks the output projection
    (proj / fc2 columns), whose input channels are the unit's activations.
    """
    path: str
    tensor: torch.Tensor
    dim: int
    repeats: int = 1
    consumer: bool = False
    is_param: bool = True
    is_weight: bool = True  # a Linear weight matrix (used by magnitude importance)


def channel_index(keep: torch.Tensor, num_groups: int, group_size: int, repeats: int) -> torch.Tensor:
    """Channel indices of the kept groups, for a dimension of ``repeats * num_groups * group_size``."""
    keep = keep.to(torch.long).cpu()
    inner = (keep[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)
    return torch.cat([r * num_groups * group_size + inner for r in range(repeats)])


def group_reduce(t: torch.Tensor, c: Coupled, num_groups: int, group_size: int) -> torch.Tensor:
    """Sum a per-element tensor shaped like ``c.tensor`` into one value per group (returned as float64 on CPU)."""
    t = t.detach().float().movedim(c.dim, 0)
    t = t.reshape(c.repeats, num_groups, group_size, -1)
    return t.sum(dim=(0, 2, 3)).to(torch.float64).cpu()


def _inner_norm_coupled(norm: nn.Module | None) -> list[Coupled]:
    """The affine parameters of a norm over the pruned inner width (sliced with the heads/neurons)."""
    if norm is None or isinstance(norm, nn.Identity):
        return []
    return [Coupled(f"norm.{p}", t, 0, is_weight=False)
            for p in ("weight", "bias") if (t := getattr(norm, p, None)) is not None]


class Unit:
    """Base class: a prunable module (attention or MLP) inside a transformer block."""
    kind: str = ""

    def __init__(self, name: str, parent: nn.Module, attr: str):
        self.name = name          # full module path of the unit, e.g. "blocks.0.attn"
        self.parent = parent      # the block holding it
        self.attr = attr          # child name in the parent ("attn" / "mlp")

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    # to implement
    num_groups: int
    group_size: int

    def coupled(self) -> list[Coupled]:
        raise NotImplementedError

    def check_thinnable(self) -> None:
        """Raise ``ValueError`` (a fragment naming the module) if the unit's layers cannot be sliced."""
        raise NotImplementedError

    def consumer_linear(self) -> nn.Linear:
        raise NotImplementedError

    def thin(self, keep: torch.Tensor) -> None:
        raise NotImplementedError

    def kept_indices(self, keep: torch.Tensor) -> dict[str, dict]:
        """Per parameter (full name): which rows/columns ``keep`` retains, with old/new shapes."""
        out = {}
        for c in self.coupled():
            if not c.is_param:
                continue
            idx = channel_index(keep, self.num_groups, self.group_size, c.repeats)
            old = list(c.tensor.shape)
            new = list(old)
            new[c.dim] = int(idx.numel())
            out[f"{self.name}.{c.path}"] = {"dim": c.dim, "index": idx.tolist(), "old_shape": old,
                                            "new_shape": new}
        return out


class AttentionUnit(Unit):
    """Heads of a timm Attention / AttentionRope / EvaAttention (group = one head, ``head_dim`` channels)."""
    kind = "heads"

    def __init__(self, name: str, parent: nn.Module, attr: str):
        super().__init__(name, parent, attr)
        m = self.module
        if isinstance(m, AttentionRope) and m.num_kv_groups != 1:
            raise ValueError(f"grouped-query attention at {name} ({m.num_heads} query heads, "
                             f"{m.num_kv_heads} kv heads)")

    def check_thinnable(self) -> None:
        m = self.module
        for child in ("qkv", "q_proj", "k_proj", "v_proj", "gate", "proj"):
            lin = getattr(m, child, None)
            if lin is not None:
                _check_linear(lin, f"{self.name}.{child}")
        norm = getattr(m, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            _norm_factory(norm, f"{self.name}.norm")  # raises for norm types we cannot resize

    @property
    def num_groups(self) -> int:
        return int(self.module.num_heads)

    @property
    def group_size(self) -> int:
        return int(self.module.head_dim)

    def coupled(self) -> list[Coupled]:
        m = self.module
        out: list[Coupled] = []

        def lin(child: str, repeats: int = 1) -> None:
            layer = getattr(m, child, None)
            if layer is None:
                return
            out.append(Coupled(f"{child}.weight", layer.weight, 0, repeats))
            if layer.bias is not None:
                out.append(Coupled(f"{child}.bias", layer.bias, 0, repeats, is_weight=False))

        if m.qkv is not None:
            lin("qkv", 3)
        else:
            for child in ("q_proj", "k_proj", "v_proj"):
                lin(child)
        if isinstance(m, EvaAttention):
            for pname in ("q_bias", "k_bias", "v_bias"):
                t = getattr(m, pname)
                if t is not None:
                    out.append(Coupled(pname, t, 0, is_param=isinstance(t, nn.Parameter), is_weight=False))
        lin("gate")
        out.extend(_inner_norm_coupled(getattr(m, "norm", None)))
        out.append(Coupled("proj.weight", m.proj.weight, 1, consumer=True))
        return out

    def consumer_linear(self) -> nn.Linear:
        return self.module.proj

    def thin(self, keep: torch.Tensor) -> None:
        m = self.module
        H, hd = self.num_groups, self.group_size
        k = int(keep.numel())
        if k == H:
            return
        rows1 = channel_index(keep, H, hd, 1)
        rows3 = channel_index(keep, H, hd, 3)
        if isinstance(m, EvaAttention):
            new = ThinnedEvaAttention.from_module(m, k)
        else:
            new = m  # timm Attention / AttentionRope: inner width is num_heads * head_dim already
        if m.qkv is not None:
            new.qkv = sliced_linear(m.qkv, out_idx=rows3)
        else:
            new.q_proj = sliced_linear(m.q_proj, out_idx=rows1)
            new.k_proj = sliced_linear(m.k_proj, out_idx=rows1)
            new.v_proj = sliced_linear(m.v_proj, out_idx=rows1)
        if getattr(m, "gate", None) is not None:
            new.gate = sliced_linear(m.gate, out_idx=rows1)
        if getattr(m, "norm", None) is not None:
            new.norm = sliced_norm(m.norm, rows1)
        new.proj = sliced_linear(m.proj, in_idx=rows1)
        if isinstance(m, EvaAttention):
            new.q_norm, new.k_norm = m.q_norm, m.k_norm  # per head_dim, unchanged
            with torch.no_grad():
                for pname in ("q_bias", "k_bias", "v_bias"):
                    src = getattr(m, pname)
                    if src is not None:
                        dst = getattr(new, pname)
                        dst.copy_(src.index_select(0, rows1.to(src.device)))
                        if isinstance(src, nn.Parameter):
                            dst.requires_grad_(src.requires_grad)
            setattr(self.parent, self.attr, new)
        else:
            # the module's declared sizes, used by its forward (reshape to num_heads x head_dim, attn_dim)
            m.num_heads = k
            m.attn_dim = k * hd
            if isinstance(m, AttentionRope):
                m.num_kv_heads = k
                m.kv_dim = k * hd


class MlpUnit(Unit):
    """Hidden neurons of a timm Mlp / GluMlp / SwiGLU (group = one hidden channel)."""
    kind = "mlp"
    group_size = 1

    def __init__(self, name: str, parent: nn.Module, attr: str):
        super().__init__(name, parent, attr)
        m = self.module
        if isinstance(m, GluMlp) and m.chunk_dim != -1:
            raise ValueError(f"convolutional GluMlp at {name}")

    def check_thinnable(self) -> None:
        m = self.module
        for child in ("fc1", "fc1_g", "fc1_x", "fc2"):
            if hasattr(m, child):
                _check_linear(getattr(m, child), f"{self.name}.{child}")
        if not isinstance(m.norm, nn.Identity):
            _norm_factory(m.norm, f"{self.name}.norm")

    @property
    def num_groups(self) -> int:
        return int(self.module.fc2.in_features)

    def coupled(self) -> list[Coupled]:
        m = self.module
        out: list[Coupled] = []
        producers = [("fc1_g", 1), ("fc1_x", 1)] if isinstance(m, SwiGLU) else \
            [("fc1", 2 if isinstance(m, GluMlp) else 1)]
        for child, rep in producers:
            layer = getattr(m, child)
            out.append(Coupled(f"{child}.weight", layer.weight, 0, rep))
            if layer.bias is not None:
                out.append(Coupled(f"{child}.bias", layer.bias, 0, rep, is_weight=False))
        out.extend(_inner_norm_coupled(m.norm))
        out.append(Coupled("fc2.weight", m.fc2.weight, 1, consumer=True))
        return out

    def consumer_linear(self) -> nn.Linear:
        return self.module.fc2

    def thin(self, keep: torch.Tensor) -> None:
        m = self.module
        n = self.num_groups
        if int(keep.numel()) == n:
            return
        idx = channel_index(keep, n, 1, 1)
        if isinstance(m, SwiGLU):
            m.fc1_g = sliced_linear(m.fc1_g, out_idx=idx)
            m.fc1_x = sliced_linear(m.fc1_x, out_idx=idx)
        elif isinstance(m, GluMlp):
            m.fc1 = sliced_linear(m.fc1, out_idx=channel_index(keep, n, 1, 2))
        else:
            m.fc1 = sliced_linear(m.fc1, out_idx=idx)
        m.norm = sliced_norm(m.norm, idx)
        m.fc2 = sliced_linear(m.fc2, in_idx=idx)


@dataclass
class BlockUnits:
    """The prunable units of one transformer block (``name`` is the block's module path)."""
    name: str
    attn: Optional[AttentionUnit]
    mlp: Optional[MlpUnit]


def find_blocks(model: nn.Module) -> dict[str, BlockUnits]:
    """Transformer blocks of ``model`` (modules with an ``attn`` child), in forward order.

    Raises ``ValueError`` naming every unsupported attention/MLP/block module found, or if there is none.
    """
    blocks: dict[str, BlockUnits] = {}
    problems: list[str] = []
    for name, m in model.named_modules():
        attn = m._modules.get("attn")
        if attn is None:
            continue
        prefix = f"{name}." if name else ""
        a_unit = mlp_unit = None
        if _is_supported_attention(attn):
            try:
                a_unit = AttentionUnit(prefix + "attn", m, "attn")
            except ValueError as e:
                problems.append(str(e))
        else:
            problems.append(f"{prefix}attn ({_qualname(attn)})")
        mlp = m._modules.get("mlp")
        if mlp is not None:
            if type(mlp) in SUPPORTED_MLP:
                try:
                    mlp_unit = MlpUnit(prefix + "mlp", m, "mlp")
                except ValueError as e:
                    problems.append(str(e))
            else:
                problems.append(f"{prefix}mlp ({_qualname(mlp)})")
        blocks[name] = BlockUnits(name, a_unit, mlp_unit)
    # timm ViT/EVA keep their blocks in `model.blocks`; every one must be a block we understand
    seq = model._modules.get("blocks")
    if isinstance(seq, (nn.Sequential, nn.ModuleList)):
        for i, blk in enumerate(seq):
            if f"blocks.{i}" not in blocks:
                problems.append(f"blocks.{i} ({_qualname(blk)}, no separate attn module)")
    if problems:
        raise ValueError("structured pruning does not support " + "; ".join(problems) + f" ({_SUPPORTED_TEXT})")
    if not blocks:
        raise ValueError(f"no transformer blocks (modules with an `attn` child) found in "
                         f"{type(model).__name__}; structured pruning expects a timm ViT/DeiT/EVA-style model")
    return blocks
