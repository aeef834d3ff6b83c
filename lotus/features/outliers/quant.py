"""Simulated W8A8 int8 post-training quantisation (PTQ) of a ViT's Linear layers.

Outlier features make per-tensor activation quantisation coarse: one huge neuron sets the scale and the rest
of the width rounds to a few levels. This module measures that effect the standard way:

- weights: symmetric, per output channel, int8 (stored as int8 + one float scale per row);
- activations (the input of each Linear): symmetric, per tensor, int8, with the scale calibrated on a few
  batches (``absmax`` of |x|, or a high ``percentile`` of |x| to clip rare outliers);
- the float Linear is swapped for :class:`W8A8Linear` (a real module holding the int8 weight), in the style of
  ``torchao.quantization.quantize_(model, config, filter_fn)``; nothing is monkey-patched.

Arithmetic is simulated (dequantised int8 values in float, via ``torch.fake_quantize_per_tensor_affine``), which
gives the same rounding and clipping error as an int8 kernel with int32 accumulation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lotus.features.outliers.config import QuantConfig

__all__ = [
    "QuantConfig",
    "W8A8Linear",
    "block_linear_filter",
    "calibrate_activation_scales",
    "quantize_w8a8_",
    "quantcheck",
]

_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit; larger inputs are subsampled with a fixed stride


def _qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


class W8A8Linear(nn.Module):
    """A Linear layer with int8 per-channel weights whose input is fake-quantised to int8 per tensor."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8, act_bits: int = 8
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("act_scale", torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_absmax: float, weight_bits: int = 8, act_bits: int = 8) -> W8A8Linear:
        """Quantise ``linear`` (its current, e.g. masked, weight) with input range ``[-act_absmax, act_absmax]``."""
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits, act_bits)
        q.to(w.device)
        wmin, wmax = _qrange(weight_bits)
        scale = (w.abs().amax(dim=1) / wmax).clamp_min(torch.finfo(torch.float32).tiny)
        q.weight_int8.copy_(torch.round(w / scale[:, None]).clamp(wmin, wmax).to(torch.int8))
        q.weight_scale.copy_(scale)
        amax = act_absmax if act_absmax > 0 else 1.0  # an all-zero input: any scale is exact
        q.act_scale.fill_(amax / _qrange(act_bits)[1])
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = _qrange(self.act_bits)
        xq = torch.fake_quantize_per_tensor_affine(x.float(), float(self.act_scale), 0, lo, hi)
        w = self.dequantized_weight()
        b = self.bias
        return F.linear(xq, w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w{self.weight_bits}a{self.act_bits}, act_scale={float(self.act_scale):.4g}"
        )


def block_linear_filter(scope: str = "blocks") -> Callable[[nn.Module, str], bool]:
    """``filter_fn(module, name)``: Linear layers inside ``.blocks`` (``scope="blocks"``) or all of them."""

    def fn(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        return scope == "all" or name.startswith("blocks.") or ".blocks." in name

    return fn


def _targets(model: nn.Module, filter_fn) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and filter_fn(m, n)}


@torch.no_grad()
def calibrate_activation_scales(
    model: nn.Module, batches: Iterable[torch.Tensor], cfg: QuantConfig, filter_fn=None, forward=None
) -> dict[str, float]:
    """Run ``batches`` through ``model`` (eval mode) and return each target Linear's input range."""
    filter_fn = filter_fn or block_linear_filter(cfg.scope)
    targets = _targets(model, filter_fn)
    if not targets:
        raise ValueError(
            "quantcheck: the model has no Linear layers to quantise in scope "
            f"{cfg.scope!r} (expected a timm ViT with .blocks)"
        )
    seen: dict[str, list[float]] = {n: [] for n in targets}

    def make_hook(name: str):
        def hook(_m, args):
            a = args[0].detach().abs().float().flatten()
            if cfg.act_observer == "absmax":
                seen[name].append(float(a.max()) if a.numel() else 0.0)
            else:
                if a.numel() > _QUANTILE_MAX:
                    a = a[:: -(-a.numel() // _QUANTILE_MAX)]
                seen[name].append(float(torch.quantile(a, cfg.percentile / 100.0)))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    fwd = forward or (lambda m, x: m(x))
    n = 0
    try:
        for images in batches:
            fwd(model, images)
            n += 1
            if n >= cfg.calib_batches:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("quantcheck: no calibration batches")
    reduce = max if cfg.act_observer == "absmax" else (lambda v: sum(v) / len(v))
    return {name: reduce(v) for name, v in seen.items() if v}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_w8a8_(
    model: nn.Module, act_scales: dict[str, float], cfg: QuantConfig | None = None, filter_fn=None
) -> nn.Module:
    """Swap every targeted Linear with calibrated input range for a :class:`W8A8Linear` (in place)."""
    cfg = cfg or QuantConfig()
    filter_fn = filter_fn or block_linear_filter(cfg.scope)
    for name, module in list(_targets(model, filter_fn).items()):
        if name in act_scales:
            _set_submodule(model, name, W8A8Linear.from_linear(module, act_scales[name], cfg.weight_bits, cfg.act_bits))
    return model


def quantcheck(
    model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    eval_loader: Iterable,
    cfg: QuantConfig | None = None,
    device: torch.device | str = "cpu",
    filter_fn=None,
) -> dict:
    """Float vs simulated W8A8 accuracy of ``model`` (left unchanged; a quantised copy is evaluated).

    Returns ``{"float_acc", "int8_acc", "drop_pp", "logit_rel_err", "layers", "act_range_max",
    "act_range_median"}``: accuracies in 0..1, the drop in percentage points, and the relative L2 error of the
    int8 logits vs the float ones over the evaluation set (a finer signal than accuracy on easy data).
    """
    cfg = cfg or QuantConfig()
    model = model.to(device)
    calib = (b.to(device) for b in calib_batches)
    scales = calibrate_activation_scales(model, calib, cfg, filter_fn)
    qmodel = quantize_w8a8_(copy.deepcopy(model), scales, cfg, filter_fn).eval()
    was_training = model.training
    model.eval()
    correct_f = correct_q = total = 0
    err_sq = ref_sq = 0.0
    try:
        with torch.no_grad():
            for batch in eval_loader:
                images, labels = batch[0].to(device), batch[1].to(device)
                f, q = model(images).float(), qmodel(images).float()
                correct_f += int((f.argmax(-1) == labels).sum())
                correct_q += int((q.argmax(-1) == labels).sum())
                total += int(labels.numel())
                err_sq += float((q - f).square().sum())
                ref_sq += float(f.square().sum())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("quantcheck: the evaluation set is empty")
    ranges = sorted(scales.values())
    float_acc, int8_acc = correct_f / total, correct_q / total
    return {
        "float_acc": float_acc,
        "int8_acc": int8_acc,
        "drop_pp": 100.0 * (float_acc - int8_acc),
        "logit_rel_err": (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("nan"),
        "layers": len(scales),
        "act_range_max": ranges[-1],
        "act_range_median": ranges[len(ranges) // 2],
    }
