"""2:4 semi-structured sparsity on ``torch.sparse`` kernels (CUTLASS / cuSPARSELt), with an honest CPU path.

Inference: ``to_semi_structured_`` checks every 2:4-masked Linear for legality (CUDA, fp16/bf16, shape multiples
of the backend, sm_80+, a real 2:4 pattern), times dense vs sparse once per distinct shape on the actual GPU,
and converts only layers that get faster; the rest stay masked dense and are listed with the reason.

Training: ``enable_sparse_training_`` swaps 2:4-masked Linears for ``SemiSparseLinear``, whose forward runs the
weight through the 2:4 kernel (re-compressed every step, since the weight changes) and whose backward is dense
with the weight gradient masked; ``enforce_masks_`` after each optimiser step keeps the stored weight 2:4.

On CPU there are no 2:4 kernels in PyTorch: masked dense weights are used and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .mask_scores import is_nm_sparse
from .masks import FilterFn, get_mask, masked_modules, set_mask

__all__ = [
    "CPU_NOTE",
    "SemiSparseLinear",
    "resolve_backend",
    "check_legality",
    "probe_shape",
    "to_semi_structured_",
    "enable_sparse_training_",
    "disable_sparse_training_",
    "semi_structured_available",
]

CPU_NOTE = "no 2:4 kernels on CPU, masked dense used"
_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_available() -> bool:
    """True when a CUDA GPU with 2:4 sparse tensor cores (sm_80+) is visible."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` picks cuSPARSELt when this torch build has it (it also supports the fused transpose), else CUTLASS."""
    if backend == "auto":
        return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    if backend not in ("cutlass", "cusparselt"):
        raise ValueError(f"backend: expected 'auto', 'cutlass' or 'cusparselt', got {backend!r}")
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise ValueError("backend: cuSPARSELt is not available in this torch build; use 'cutlass' or 'auto'")
    return backend


def _sparse_cls(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT


def _compress(weight: Tensor, backend: str) -> Tensor:
    return _sparse_cls(backend).from_dense(weight.contiguous())


def check_legality(
    weight: Tensor, backend: str, check_pattern: bool = True, dtype: torch.dtype | None = None
) -> str | None:
    """Why ``weight`` cannot use the 2:4 kernels of ``backend`` (``None`` when it can). ``dtype`` is the
    compute dtype when it differs from the stored one (fp32 master weights under bf16 autocast)."""
    if not weight.is_cuda:
        return f"weight on {weight.device.type}: 2:4 kernels need CUDA"
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"GPU sm_{major}{minor}: 2:4 sparse tensor cores need sm_80 or newer"
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D: only 2-D Linear weights are supported"
    dtype = dtype or weight.dtype
    if dtype not in _DTYPES:
        return f"dtype {str(dtype).removeprefix('torch.')}: 2:4 kernels need float16 or bfloat16"
    c = _sparse_cls(backend)._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = weight.shape
    if rows % c.sparse_min_rows or cols % c.sparse_min_cols:
        return f"shape {rows}x{cols}: {backend} needs out % {c.sparse_min_rows} == 0 and in % {c.sparse_min_cols} == 0"
    if check_pattern and not is_nm_sparse(weight, 2, 4):
        return "weight is not 2:4 sparse along the input dim (prune with SemiStructuredConfig first)"
    return None


def _cuda_time_ms(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@torch.no_grad()
def probe_shape(
    out_features: int,
    in_features: int,
    tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    device: torch.device | str = "cuda",
    iters: int = 50,
    warmup: int = 10,
    bias: bool = True,
) -> dict[str, float]:
    """Time ``F.linear`` dense vs 2:4 sparse for one weight shape on ``tokens`` input rows (CUDA events).

    Also checks the sparse result against the dense one, so a broken kernel never counts as a speedup.
    """
    backend = resolve_backend(backend)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    w = torch.randn(out_features, in_features, device=device, dtype=dtype)
    keep = torch.topk(w.abs().reshape(out_features, -1, 4), 2, dim=-1).indices
    w = w * torch.zeros_like(w, dtype=torch.bool).reshape(out_features, -1, 4).scatter_(-1, keep, True).reshape(w.shape)
    b = torch.randn(out_features, device=device, dtype=dtype) if bias else None
    ws = _compress(w, backend)
    dense_ms = _cuda_time_ms(lambda: F.linear(x, w, b), iters, warmup)
    sparse_ms = _cuda_time_ms(lambda: F.linear(x, ws, b), iters, warmup)
    ref, got = F.linear(x, w, b).float(), F.linear(x, ws, b).float()
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "rel_err": err}


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _candidates(model: nn.Module, filter_fn: FilterFn | None) -> dict[str, nn.Module]:
    if filter_fn is None:
        return {f: m for f, m in masked_modules(model).items() if isinstance(m, nn.Linear)}
    return {f: m for f, m in model.named_modules() if f and isinstance(m, nn.Linear) and filter_fn(m, f)}


def to_semi_structured_(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    backend: str = "auto",
    probe: bool = True,
    probe_tokens: int = 4096,
    min_speedup: float = 1.0,
) -> dict[str, Any]:
    """Convert 2:4-sparse Linear weights to ``torch.sparse`` semi-structured tensors for inference.

    Candidates are the masked Linears (or those ``filter_fn`` picks). A converted layer loses its mask
    parametrization (the mask is baked into the compressed weight) and its weight stops requiring grad.
    Returns ``{"device", "backend", "converted", "skipped": {fqn: reason}, "probe": {...}, "note"}``.
    """
    cands = _candidates(model, filter_fn)
    report: dict[str, Any] = {
        "device": "cpu",
        "backend": None,
        "converted": [],
        "skipped": {},
        "probe": {},
        "note": None,
    }
    if not cands:
        report["note"] = "no 2:4-masked Linear layers to convert"
        return report
    any_cuda = any(m.weight.is_cuda for m in cands.values())
    if not any_cuda:
        report["note"] = CPU_NOTE
        report["skipped"] = {f: "CPU: masked dense" for f in cands}
        return report
    backend = resolve_backend(backend)
    report.update(device=torch.cuda.get_device_name(), backend=backend)
    for fqn, mod in cands.items():
        w = mod.weight.detach()
        reason = check_legality(w, backend)
        if reason is None and probe:
            tokens = probe_tokens
            key = f"{w.shape[0]}x{w.shape[1]}@{tokens}:{str(w.dtype).removeprefix('torch.')}"
            if key not in report["probe"]:
                report["probe"][key] = probe_shape(
                    w.shape[0], w.shape[1], tokens, w.dtype, backend, w.device, bias=mod.bias is not None
                )
            p = report["probe"][key]
            if p["rel_err"] > 1e-2:
                reason = f"probe: sparse result differs from dense (rel err {p['rel_err']:.2e})"
            elif p["speedup"] < min_speedup:
                reason = (
                    f"probe: not faster ({p['sparse_ms']:.3f} ms sparse vs {p['dense_ms']:.3f} ms dense "
                    f"at {tokens} tokens)"
                )
        if reason is not None:
            report["skipped"][fqn] = reason
            continue
        if isinstance(mod, SemiSparseLinear):
            mod = mod.to_dense_module()
            _replace(model, fqn, mod)
        elif parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        mod.weight = nn.Parameter(_compress(mod.weight.detach(), backend), requires_grad=False)
        report["converted"].append(fqn)
    return report


# --------------------------------------------------------------------------------------------- sparse training
class _SemiSparseLinearFn(torch.autograd.Function):
    """y = x W_s^T + b with W_s the 2:4-compressed masked weight in ``dtype``; backward dense, weight grad
    masked. Gradients come back in the dtypes of the inputs (fp32 master weights under autocast)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, backend: str, dtype: torch.dtype
    ) -> Tensor:
        with torch.autocast("cuda", enabled=False):
            xc = x.to(dtype)
            w = (weight * mask).to(dtype)
            y = F.linear(xc, _compress(w, backend), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, w, mask)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w, mask = ctx.saved_tensors
        x_dt, w_dt, b_dt = ctx.dtypes
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ w).reshape(*grad_out.shape[:-1], w.shape[1]).to(x_dt)
        if ctx.needs_input_grad[1]:
            grad_w = ((g2.t() @ x.reshape(-1, x.shape[-1])) * mask).to(w_dt)
        if b_dt is not None and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0).to(b_dt)
        return grad_x, grad_w, None, grad_b, None, None


class SemiSparseLinear(nn.Linear):
    """A Linear with a fixed 2:4 mask (``weight_mask`` buffer) trained with the semi-structured forward kernel.

    The forward uses the 2:4 kernel when the input is on a capable GPU and the layer is legal for ``backend``;
    otherwise it computes ``F.linear(x, weight * mask)`` (so the module is correct everywhere).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, backend: str = "cutlass", device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        # not persistent: the state dict stays that of a plain Linear (exports load into a fresh timm model);
        # save masks with ``pruning.masks.masks_state`` to resume training
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool), persistent=False)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor, backend: str) -> SemiSparseLinear:
        """Wrap ``linear``'s parameters (the same Parameter objects, so optimisers keep them)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.register_buffer(
            "weight_mask", mask.to(device=linear.weight.device, dtype=torch.bool).clone(), persistent=False
        )
        new.backend = backend
        return new

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
        return self.weight.dtype

    def _kernel_ok(self, x: Tensor) -> bool:
        return (
            x.is_cuda
            and check_legality(self.weight, self.backend, check_pattern=False, dtype=self._compute_dtype(x)) is None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel_ok(x):
            return _SemiSparseLinearFn.apply(
                x, self.weight, self.weight_mask, self.bias, self.backend, self._compute_dtype(x)
            )
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    @torch.no_grad()
    def enforce_mask_(self) -> None:
        self.weight.mul_(self.weight_mask.to(self.weight.dtype))

    def to_dense_module(self) -> nn.Linear:
        """A plain Linear sharing this module's (masked) parameters."""
        self.enforce_mask_()
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, density={self.weight_mask.float().mean():.2f}"


def enable_sparse_training_(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Swap 2:4-masked Linears for ``SemiSparseLinear`` so training uses the sparse forward kernel.

    ``compute_dtype`` is the dtype the forward runs in (e.g. ``torch.bfloat16`` for fp32 weights under bf16
    autocast; default: the weight dtype). Layers that are illegal for the kernels keep their masked-dense
    parametrization and are listed in ``skipped``. On CPU nothing is swapped and the report carries ``CPU_NOTE``.
    """
    cands = _candidates(model, filter_fn)
    report: dict[str, Any] = {"swapped": [], "skipped": {}, "backend": None, "note": None}
    if not any(m.weight.is_cuda for m in cands.values()):
        report["note"] = CPU_NOTE
        report["skipped"] = {f: "CPU: masked dense" for f in cands}
        return report
    backend = resolve_backend(backend)
    report["backend"] = backend
    for fqn, mod in cands.items():
        if isinstance(mod, SemiSparseLinear):
            continue
        mask = get_mask(mod)
        if mask is None:
            report["skipped"][fqn] = "no mask: prune with SemiStructuredConfig first"
            continue
        eff = (mod.weight * mask).detach()
        reason = check_legality(eff, backend, dtype=compute_dtype)
        if reason is not None:
            report["skipped"][fqn] = reason
            continue
        mask = mask.clone()
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        _replace(model, fqn, SemiSparseLinear.from_linear(mod, mask, backend))
        report["swapped"].append(fqn)
    return report


def disable_sparse_training_(model: nn.Module) -> nn.Module:
    """Turn every ``SemiSparseLinear`` back into a Linear with a mask parametrization (same parameters)."""
    for fqn, mod in list(model.named_modules()):
        if isinstance(mod, SemiSparseLinear):
            mask = mod.weight_mask.clone()
            lin = mod.to_dense_module()
            set_mask(lin, mask)
            _replace(model, fqn, lin)
    return model
