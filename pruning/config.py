"""Small config dataclasses that say *what* to prune; ``prune_`` decides *how*.

Each config is registered (:func:`pruning.registry.register_method`) with its handler and what it needs
(calibration data, gradients), whether a schedule can raise its sparsity and whether it changes shapes;
``prune_``, ``GradualPruner`` and the ``lotus`` front ends read that registry. Configs live here, in a module
without torch, so the method names are known as soon as a config is read.

Each config validates itself on construction so a bad value fails at the call site with a one-line
``ValueError`` naming the field, long before any calibration data is touched. Messages start with the bare
field name and a colon (``heads: expected ...``) so a caller can prefix its own key path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .registry import register_method

__all__ = [
    "MagnitudeConfig",
    "WandaConfig",
    "SemiStructuredConfig",
    "StructuredConfig",
    "TaylorConfig",
    "IMPORTANCE",
    "check_int",
    "check_sparsity",
]

Importance = Literal["magnitude", "activation", "taylor"]
IMPORTANCE: tuple[str, ...] = ("magnitude", "activation", "taylor")


def check_int(value: object, field: str, minimum: int = 1, optional: bool = False) -> None:
    """Raise a one-line ``ValueError`` naming ``field`` unless ``value`` is an int >= ``minimum`` (or None)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: expected an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_sparsity(value: float, field: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1) or raise a one-line ``ValueError`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{field}: expected a number in [0, 1), got {value!r}")
    return float(value)


@register_method(
    "magnitude", handler="pruning.handlers:prune_magnitude", description="smallest |w| (no data)", gradual=True
)
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


@register_method(
    "wanda",
    handler="pruning.handlers:prune_wanda",
    description="|w| x input-activation norm (calibration data)",
    needs_calibration=True,
    gradual=True,
)
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
        check_int(self.max_calib_batches, "max_calib_batches", optional=True)


@register_method(
    "nm",
    handler="pruning.handlers:prune_nm",
    description="keep n of every m input weights (--n/--m; 2:4: sparse kernels on CUDA)",
    needs_calibration=lambda c: c.score == "wanda",
    presets={"2:4": {"n": 2, "m": 4}},
)
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
        check_int(self.n, "n")
        check_int(self.m, "m")
        if self.n >= self.m:
            raise ValueError(f"n: expected n < m for N:M sparsity, got {self.n}:{self.m}")
        if self.score not in ("magnitude", "wanda"):
            raise ValueError(f"score: expected 'magnitude' or 'wanda', got {self.score!r}")
        if self.kernels not in ("auto", "off"):
            raise ValueError(f"kernels: expected 'auto' or 'off', got {self.kernels!r}")
        if self.backend not in ("auto", "cutlass", "cusparselt"):
            raise ValueError(f"backend: expected 'auto', 'cutlass' or 'cusparselt', got {self.backend!r}")
        check_int(self.probe_tokens, "probe_tokens")
        check_int(self.max_calib_batches, "max_calib_batches", optional=True)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


@register_method(
    "structured",
    handler="pruning.handlers:prune_structured_handler",
    description="remove whole attention heads and MLP neurons",
    needs_calibration=lambda c: c.importance != "magnitude",
    needs_grad=lambda c: c.importance == "taylor",
    structured=True,
)
@dataclass
class StructuredConfig:
    """Structured thinning (:func:`pruning.structured.prune_structured`): what to remove and how to rank it.

    With ``scope="global"`` the raw scores are compared across blocks (taylor estimates the loss change and
    activation the output contribution, both comparable across blocks); each block still keeps ``min_heads``
    heads and at least ``round_to`` neurons.
    """

    heads: float = 0.0
    """Fraction of attention heads to remove, in [0, 1)."""
    mlp: float = 0.0
    """Fraction of MLP hidden neurons to remove, in [0, 1)."""
    importance: Importance = "magnitude"
    """Ranking: magnitude (L2 of the group's weights, no data), activation (calibration activation norm x
    output-column norm) or taylor (sum of |w x dL/dw| over calibration batches)."""
    scope: Literal["layer", "global"] = "layer"
    """layer: remove the fraction from every block; global: rank the groups of all blocks together, so blocks lose
    different amounts."""
    round_to: int = 1
    """Kept MLP widths (and heads x head_dim, where head_dim allows) are multiples of this."""
    min_heads: int = 1
    """Every block keeps at least this many heads."""

    def __post_init__(self) -> None:
        for name, what in (("heads", "head"), ("mlp", "MLP neuron")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {v!r}")
            if v >= 1:
                raise ValueError(f"{name}: expected a fraction in [0, 1), got {v!r} (that would remove every {what})")
            setattr(self, name, float(v))
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance: expected one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope: expected one of layer, global, got {self.scope!r}")
        check_int(self.round_to, "round_to")
        check_int(self.min_heads, "min_heads")


@register_method(
    "taylor",
    handler="pruning.taylor:prune_taylor",
    description="first-order Taylor |w x dL/dw| over labelled calibration batches",
    needs_calibration=True,
    needs_grad=True,
    gradual=True,
)
@dataclass
class TaylorConfig:
    """First-order Taylor pruning (Molchanov et al. 2019, per weight): score ``sum_b |W_ij * dL_b/dW_ij|``.

    ``|w * g|`` estimates how much the loss changes when the weight is zeroed; it is summed over the
    calibration batches (labelled ``(x, y)``, cross-entropy unless ``prune_`` gets a ``loss_fn``).
    ``scope="layer"`` prunes every layer to ``sparsity``, ``"row"`` every output row, and ``"global"`` ranks
    all layers together (the scores estimate the same loss, so they compare across layers).
    """

    sparsity: float = 0.5
    scope: Literal["layer", "row", "global"] = "layer"
    max_calib_batches: int | None = None

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.scope not in ("layer", "row", "global"):
            raise ValueError(f"scope: expected 'layer', 'row' or 'global', got {self.scope!r}")
        check_int(self.max_calib_batches, "max_calib_batches", optional=True)
