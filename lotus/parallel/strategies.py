"""Per-block memory and parallelism transforms for timm vision transformers (one function per concern).

In the style of torchtitan's ``apply_ac`` / ``apply_fsdp``: each function takes the model and a few
options, changes it in place and returns it. Blocks are wrapped in proper module subclasses (PyTorch's
:class:`CheckpointWrapper` or our :class:`ActivationOffloadWrapper`, both based on PyTorch's
``ActivationWrapper``), so parameter names and state-dict keys stay those of the plain timm model.

Order matters and :func:`lotus.parallel.parallelize` follows it: checkpointing/offload wrappers first,
then FSDP2 ``fully_shard`` on every (wrapped) block and finally on the root, or DDP around everything.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    ActivationWrapper,
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = [
    "AC_MODES",
    "ActivationOffloadWrapper",
    "OffloadActivations",
    "transformer_blocks",
    "selective_save_ops",
    "selective_policy",
    "wrap_block",
    "apply_ac",
    "apply_offload",
    "apply_fsdp",
    "apply_ddp",
]

AC_MODES = ("none", "full", "selective")


def transformer_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The repeated transformer blocks of a timm ViT (``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__}: expected a timm vision transformer with a non-empty `blocks` "
            "Sequential/ModuleList (per-block parallelism plans need one)"
        )
    return blocks


def _block_indices(model: nn.Module, blocks: Iterable[int] | None) -> list[int]:
    n = len(transformer_blocks(model))
    idx = list(range(n)) if blocks is None else sorted(set(int(b) for b in blocks))
    bad = [b for b in idx if not 0 <= b < n]
    if bad:
        raise ValueError(f"block index {bad[0]}: the model has {n} blocks (valid: 0..{n - 1})")
    return idx


# --------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------


def selective_save_ops() -> set:
    """Compute-heavy ops whose outputs selective checkpointing keeps (matmuls and attention kernels).

    Everything else in the block (layer norms, GELU, residual adds, layer scale, reshapes) is recomputed
    in backward: cheap to redo, but together about half of a ViT block's saved activations.
    """
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    ]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save matmul/attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if func in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVE_OPS = selective_save_ops()
_CKPT_PARAMS = inspect.signature(checkpoint).parameters


def _checkpoint_kwargs(mode: str) -> dict:
    kwargs: dict = {"preserve_rng_state": True}  # drop-path / dropout recompute identically
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
        if "respect_saved_tensors_hooks" in _CKPT_PARAMS:
            # SAC-kept tensors go through surrounding saved-tensor hooks (offload, memory accounting).
            kwargs["respect_saved_tensors_hooks"] = True
    return kwargs


# --------------------------------------------------------------------------------------------------
# Activation offload
# --------------------------------------------------------------------------------------------------


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that move activations saved for backward to (pinned) CPU memory.

    Unlike :func:`torch.autograd.graph.save_on_cpu`, tensors that share storage with the given
    parameters (e.g. an FSDP-gathered weight saved by a linear layer) and tensors already on the CPU
    stay where they are: copying weights to the host would cost PCIe bandwidth and save nothing.
    Device-to-host copies are asynchronous into pinned buffers on the compute stream.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        keep = {p.untyped_storage().data_ptr() for p in params if p.device.type != "meta"}

        def pack(t: torch.Tensor):
            if t.device.type == "cpu" or t.untyped_storage().data_ptr() in keep:
                return (None, t)
            host = torch.empty(
                t.size(), dtype=t.dtype, layout=t.layout, pin_memory=torch.cuda.is_available() and not t.is_sparse
            )
            host.copy_(t, non_blocking=True)
            return (t.device, host)

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


class ActivationOffloadWrapper(ActivationWrapper):
    """Runs the wrapped block with its saved activations offloaded to CPU memory."""

    def forward(self, *args, **kwargs):
        with OffloadActivations(self._checkpoint_wrapped_module.parameters()):
            return self._checkpoint_wrapped_module(*args, **kwargs)


def wrap_block(block: nn.Module, ac: str = "none", offload: bool = False) -> nn.Module:
    """Wrap one block for activation checkpointing (``full``/``selective``) or activation offload."""
    if isinstance(block, ActivationWrapper):
        raise ValueError(f"block is already wrapped ({type(block).__name__}); apply one memory option per block")
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpoint mode: expected one of {', '.join(AC_MODES)}, got {ac!r}")
    if offload and ac == "full":
        raise ValueError("offload and full checkpointing on one block: a recomputed block saves nothing to offload")
    if ac != "none":
        block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **_checkpoint_kwargs(ac))
    if offload:
        block = ActivationOffloadWrapper(block)
    return block


def apply_ac(model: nn.Module, mode: str, blocks: Iterable[int] | None = None) -> nn.Module:
    """Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) on ViT blocks.

    ``mode``: ``none`` (no change), ``full`` (keep only the block input, recompute the block in
    backward) or ``selective`` (keep matmul/attention outputs, recompute the rest; see
    :func:`selective_policy`). ``blocks``: indices to wrap (default all).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpoint mode: expected one of {', '.join(AC_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    seq = transformer_blocks(model)
    for i in _block_indices(model, blocks):
        seq[i] = wrap_block(seq[i], ac=mode)
    return model


def apply_offload(model: nn.Module, blocks: Iterable[int] | None = None) -> nn.Module:
    """Offload the saved activations of the given blocks (default all) to CPU memory during forward."""
    seq = transformer_blocks(model)
    for i in _block_indices(model, blocks):
        seq[i] = wrap_block(seq[i], offload=True)
    return model


# --------------------------------------------------------------------------------------------------
# Data parallelism
# --------------------------------------------------------------------------------------------------


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool | Sequence[bool] = True,
    cpu_offload: bool = False,
    mixed_precision: bool = False,
) -> nn.Module:
    """FSDP2 ``fully_shard`` on every transformer block, then on the root module.

    ``reshard_after_forward``: one bool for all blocks, or one per block (the planner's choice):
    True frees a block's gathered parameters after its forward (ZeRO-3; all-gather again in backward),
    False keeps them until its backward (ZeRO-2 style). ``cpu_offload``: ``CPUOffloadPolicy`` (sharded
    parameters, gradients and optimizer step on the host). ``mixed_precision``: bf16 parameters for
    compute, fp32 gradient reduction (``MixedPrecisionPolicy``).
    """
    seq = transformer_blocks(model)
    n = len(seq)
    if isinstance(reshard_after_forward, bool):
        per_block = [reshard_after_forward] * n
    else:
        per_block = [bool(r) for r in reshard_after_forward]
        if len(per_block) != n:
            raise ValueError(f"reshard_after_forward: expected {n} values (one per block), got {len(per_block)}")
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    }
    for i, block in enumerate(seq):
        fully_shard(block, reshard_after_forward=per_block[i], **kwargs)
    # The root (patch embedding, tokens, final norm, head) is needed first in backward: keep it gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` (gradients as bucket views: no second gradient copy)."""
    model = model.to(device)
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
