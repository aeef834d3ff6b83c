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
only its declared sizes change. A thinned ``EvaAttention`` becomes
:class:`pruning.structured_eva.ThinnedEvaAttention`. The slicing itself is in :mod:`pruning.structured_slicing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Attention, AttentionRope, GluMlp, Mlp, SwiGLU
from timm.models.eva import EvaAttention

from .structured_eva import ThinnedEvaAttention
from .structured_slicing import channel_index, check_linear, norm_factory, qualname, sliced_linear, sliced_norm

__all__ = [
    "Coupled",
    "Unit",
    "AttentionUnit",
    "MlpUnit",
    "BlockUnits",
    "find_blocks",
    "group_reduce",
    "register_attention",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MLP",
]


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


_SUPPORTED_TEXT = "supported: attention timm Attention/AttentionRope/EvaAttention, MLP timm Mlp/GluMlp/SwiGLU"


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


def group_reduce(t: torch.Tensor, c: Coupled, num_groups: int, group_size: int) -> torch.Tensor:
    """Sum a per-element tensor shaped like ``c.tensor`` into one value per group (returned as float64 on CPU)."""
    t = t.detach().float().movedim(c.dim, 0)
    t = t.reshape(c.repeats, num_groups, group_size, -1)
    return t.sum(dim=(0, 2, 3)).to(torch.float64).cpu()


def _inner_norm_coupled(norm: nn.Module | None) -> list[Coupled]:
    """The affine parameters of a norm over the pruned inner width (sliced with the heads/neurons)."""
    if norm is None or isinstance(norm, nn.Identity):
        return []
    return [
        Coupled(f"norm.{p}", t, 0, is_weight=False)
        for p in ("weight", "bias")
        if (t := getattr(norm, p, None)) is not None
    ]


class Unit:
    """Base class: a prunable module (attention or MLP) inside a transformer block."""

    kind: str = ""

    def __init__(self, name: str, parent: nn.Module, attr: str):
        self.name = name  # full module path of the unit, e.g. "blocks.0.attn"
        self.parent = parent  # the block holding it
        self.attr = attr  # child name in the parent ("attn" / "mlp")

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
            out[f"{self.name}.{c.path}"] = {"dim": c.dim, "index": idx.tolist(), "old_shape": old, "new_shape": new}
        return out


class AttentionUnit(Unit):
    """Heads of a timm Attention / AttentionRope / EvaAttention (group = one head, ``head_dim`` channels)."""

    kind = "heads"

    def __init__(self, name: str, parent: nn.Module, attr: str):
        super().__init__(name, parent, attr)
        m = self.module
        if isinstance(m, AttentionRope) and m.num_kv_groups != 1:
            raise ValueError(
                f"grouped-query attention at {name} ({m.num_heads} query heads, {m.num_kv_heads} kv heads)"
            )

    def check_thinnable(self) -> None:
        m = self.module
        for child in ("qkv", "q_proj", "k_proj", "v_proj", "gate", "proj"):
            lin = getattr(m, child, None)
            if lin is not None:
                check_linear(lin, f"{self.name}.{child}")
        norm = getattr(m, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            norm_factory(norm, f"{self.name}.norm")  # raises for norm types we cannot resize

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
                check_linear(getattr(m, child), f"{self.name}.{child}")
        if not isinstance(m.norm, nn.Identity):
            norm_factory(m.norm, f"{self.name}.norm")

    @property
    def num_groups(self) -> int:
        return int(self.module.fc2.in_features)

    def coupled(self) -> list[Coupled]:
        m = self.module
        out: list[Coupled] = []
        producers = (
            [("fc1_g", 1), ("fc1_x", 1)] if isinstance(m, SwiGLU) else [("fc1", 2 if isinstance(m, GluMlp) else 1)]
        )
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
    attn: AttentionUnit | None
    mlp: MlpUnit | None


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
            problems.append(f"{prefix}attn ({qualname(attn)})")
        mlp = m._modules.get("mlp")
        if mlp is not None:
            if type(mlp) in SUPPORTED_MLP:
                try:
                    mlp_unit = MlpUnit(prefix + "mlp", m, "mlp")
                except ValueError as e:
                    problems.append(str(e))
            else:
                problems.append(f"{prefix}mlp ({qualname(mlp)})")
        blocks[name] = BlockUnits(name, a_unit, mlp_unit)
    # timm ViT/EVA keep their blocks in `model.blocks`; every one must be a block we understand
    seq = model._modules.get("blocks")
    if isinstance(seq, (nn.Sequential, nn.ModuleList)):
        for i, blk in enumerate(seq):
            if f"blocks.{i}" not in blocks:
                problems.append(f"blocks.{i} ({qualname(blk)}, no separate attn module)")
    if problems:
        raise ValueError("structured pruning does not support " + "; ".join(problems) + f" ({_SUPPORTED_TEXT})")
    if not blocks:
        raise ValueError(
            f"no transformer blocks (modules with an `attn` child) found in "
            f"{type(model).__name__}; structured pruning expects a timm ViT/DeiT/EVA-style model"
        )
    return blocks
