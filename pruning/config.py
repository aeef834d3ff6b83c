"""Small config dataclasses that say *what* to prune; ``prune_`` decides *how*.

Each config validates itself on construction so a bad value fails at the call site with a one-line
``ValueError`` naming the field, long before any calibration data is touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MagnitudeConfig", "WandaConfig", "SemiStructuredConfig", "check_sparsity"]


def check_sparsity(value: float, field: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1) or raise a one-line ``ValueError`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{field}: expected a number in [0, 1), got {value!r}")
    return float(value)


@dataclass
class MagnitudeConfig:
    """Unstructured magnitude pruning: zero the ``sparsity`` fraction of smallest-|w| weights.

    ``scope="layer"`` prunes every selected layer to the same sparsity; ``scope="global"`` ranks all
    selected weights together, so layers with small weights lose more.
    """

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope: expected 'layer' or 'global', got {self.scope!r}")


@dataclass
class WandaConfig:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2 with input-activation norms from calibration data.

    ``scope="row"`` compares weights within each output row (the paper's choice, best for LLMs and ViTs);
    ``scope="layer"`` compares across the whole matrix.
    """

    sparsity: float = 0.5
    scope: Literal["row", "layer"] = "row"
    max_calib_batches: int | None = None

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.scope not in ("row", "layer"):
            raise ValueError(f"scope: expected 'row' or 'layer', got {self.scope!r}")
        if self.max_calib_batches is not None and self.max_calib_batches < 1:
            raise ValueError(f"max_calib_batches: expected an int >= 1 or None, got {self.max_calib_batches!r}")


@dataclass
class SemiStructuredConfig:
    """N:M sparsity (2:4 by default): keep the ``n`` best of every ``m`` consecutive input weights.

    ``score`` ranks weights inside each group by magnitude or by Wanda (needs calibration data).
    ``kernels="auto"``: on CUDA, 2:4 layers that pass the legality check and get faster in the per-shape
    probe are converted to ``torch.sparse`` semi-structured tensors; elsewhere masked dense weights are
    used (and the report says so). ``kernels="off"`` always keeps masked dense weights.
    ``probe_tokens`` is the number of rows (batch x sequence) the probe times each shape with.
    """

    n: int = 2
    m: int = 4
    score: Literal["magnitude", "wanda"] = "magnitude"
    kernels: Literal["auto", "off"] = "auto"
    backend: Literal["auto", "cutlass", "cusparselt"] = "auto"
    probe_tokens: int = 4096
    max_calib_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.n >= self.m:
            raise ValueError(f"n: expected n < m for N:M sparsity, got {self.n}:{self.m}")
        if self.score not in ("magnitude", "wanda"):
            raise ValueError(f"score: expected 'magnitude' or 'wanda', got {self.score!r}")
        if self.kernels not in ("auto", "off"):
            raise ValueError(f"kernels: expected 'auto' or 'off', got {self.kernels!r}")
        if self.backend not in ("auto", "cutlass", "cusparselt"):
            raise ValueError(f"backend: expected 'auto', 'cutlass' or 'cusparselt', got {self.backend!r}")
        if self.probe_tokens < 1:
            raise ValueError(f"probe_tokens: expected an int >= 1, got {self.probe_tokens!r}")
        if self.max_calib_batches is not None and self.max_calib_batches < 1:
            raise ValueError(f"max_calib_batches: expected an int >= 1 or None, got {self.max_calib_batches!r}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m
