"""Outlier-feature metrics of residual-stream activations (He et al., NeurIPS 2024).

For activations ``X`` of shape ``[..., tokens, d]`` (any leading batch dims; all leading dims are pooled as
tokens):

- **kurtosis** (Eq. 1): ``s_j = sqrt(mean_t X[t, j]^2)`` is neuron ``j``'s RMS over all tokens (and batch);
  ``Kurt(X) = mean_j(s_j^4) / mean_j(s_j^2)^2``. It is 1 when every neuron has the same RMS and ``d`` when a
  single neuron carries all the activation: it measures how far a few neurons stand out (outlier features).
- **max-median ratio** (MMR): per token ``max_j |X[t, j]| / median_j |X[t, j]|``, averaged over tokens. The
  median of an even number of values is the mean of the two middle ones.

:class:`OutlierStats` accumulates both over several chunks (e.g. one probe batch split for memory) without
keeping the activations, so the result equals the metric on the concatenated tokens.
"""

from __future__ import annotations

import torch

__all__ = ["kurtosis", "max_median_ratio", "neuron_rms", "OutlierStats"]

_TINY = 1e-30


def _tokens(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(f"expected activations of shape [..., tokens, width], got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1])


def neuron_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-neuron RMS ``s_j`` over all tokens (and batch): shape ``[d]``, float64."""
    t = _tokens(x).double()
    return t.square().mean(dim=0).sqrt()


def _kurtosis_from_ms(ms: torch.Tensor) -> float:
    # ms = s^2 per neuron; Kurt = mean(s^4) / mean(s^2)^2
    denom = ms.mean().square()
    if denom <= 0:
        return float("nan")  # all-zero activations: undefined
    return float(ms.square().mean() / denom)


def kurtosis(x: torch.Tensor) -> float:
    """Eq. 1 of He et al. (2024): ``mean(s^4) / mean(s^2)^2`` of the per-neuron RMS ``s`` (1 .. d)."""
    return _kurtosis_from_ms(_tokens(x).double().square().mean(dim=0))


def _median_abs(a: torch.Tensor) -> torch.Tensor:
    """Row medians of ``a`` (mean of the two middle values for even widths); ~3x cheaper than a full sort."""
    d = a.shape[-1]
    low = a.topk(d // 2 + 1, dim=-1, largest=False, sorted=False).values  # the smallest half (+1)
    if d % 2:
        return low.amax(dim=-1)
    return low.topk(2, dim=-1).values.mean(dim=-1)


def _mmr_per_token(t: torch.Tensor) -> torch.Tensor:
    a = t.float().abs()
    return a.amax(dim=-1) / _median_abs(a).clamp_min(_TINY)


def max_median_ratio(x: torch.Tensor) -> float:
    """Mean over tokens of ``max_j |x| / median_j |x|``."""
    return float(_mmr_per_token(_tokens(x)).double().mean())


class OutlierStats:
    """Streaming kurtosis / MMR (plus RMS and max |x|) of one activation site over several chunks."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None  # per-neuron sum of squares, float64
        self.tokens = 0
        self.mmr_sum = 0.0
        self.max_abs = 0.0

    def update(self, x: torch.Tensor) -> None:
        t = _tokens(x)
        if t.shape[0] == 0:
            return
        sq = t.float().square().sum(dim=0).double()  # fp32 (cascade-summed) per chunk, fp64 across chunks
        if self.sum_sq is None:
            self.sum_sq = sq
        elif self.sum_sq.shape != sq.shape:
            raise ValueError(f"width changed between chunks: {self.sum_sq.shape[0]} vs {sq.shape[0]}")
        else:
            self.sum_sq += sq
        self.tokens += t.shape[0]
        a = t.float().abs()
        peak = a.amax(dim=-1)
        self.mmr_sum += float((peak / _median_abs(a).clamp_min(_TINY)).double().sum())
        self.max_abs = max(self.max_abs, float(peak.max()))

    def compute(self) -> dict[str, float]:
        """``{"kurtosis", "mmr", "rms", "max_abs"}`` over everything seen so far."""
        if self.sum_sq is None or self.tokens == 0:
            raise ValueError("no activations recorded")
        ms = self.sum_sq / self.tokens
        return {
            "kurtosis": _kurtosis_from_ms(ms),
            "mmr": self.mmr_sum / self.tokens,
            "rms": float(ms.mean().sqrt()),
            "max_abs": self.max_abs,
        }
