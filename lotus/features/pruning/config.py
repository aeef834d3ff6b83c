"""The ``pruning:`` config section: sparsity masks and structured thinning applied during training.

Disabled by default (``method: none`` and no ``structured`` ratios), so a config without the section trains
dense. The section is the library's own configs (:mod:`pruning`) plus *when* to apply them. Examples::

    pruning:                      # gradual magnitude pruning to 80% over epochs 1-6 (Zhu & Gupta cubic)
      method: magnitude
      sparsity: 0.8
      schedule: gradual
      start_epoch: 1
      end_epoch: 6
      frequency: 20               # optimizer steps between mask updates

    pruning:                      # one-shot 2:4 at the start (quote "2:4": YAML reads 2:4 as a number)
      method: "2:4"
      score: wanda
      sparse_kernels: true        # CUDA: train with the semi-structured forward kernel

    pruning:                      # pruning.StructuredConfig's fields, plus at_epoch
      structured: {heads: 0.25, mlp: 0.5, importance: taylor, round_to: 8, at_epoch: 0}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pruning
from lotus.errors import ConfigError
from pruning.registry import config_for, method_named, method_names, methods

__all__ = ["PruningConfig", "StructuredPruningConfig"]

# the mask methods of the pruning registry (a new criterion registered there is a valid ``method`` here)
MaskMethod = Literal[("none", *method_names(structured=False))]

_RATIO = {"min": 0.0, "max": 1.0, "max_exclusive": True}


@dataclass
class StructuredPruningConfig(pruning.StructuredConfig):
    """``pruning.structured``: :class:`pruning.StructuredConfig` (validated by it) plus when to thin."""

    at_epoch: float = field(default=0.0, metadata={"min": 0.0})
    """Epoch (fractional allowed) at which the model is thinned."""

    @property
    def enabled(self) -> bool:
        return self.heads > 0 or self.mlp > 0

    def library(self) -> pruning.StructuredConfig:
        """The plain library config (without the schedule field)."""
        names = [f.name for f in dataclasses.fields(pruning.StructuredConfig)]
        return pruning.StructuredConfig(**{n: getattr(self, n) for n in names})


@dataclass
class PruningConfig:
    """Unstructured / N:M masks on a schedule, plus optional structured thinning.

    ``method`` picks a mask method of the :mod:`pruning.registry` (e.g. :class:`pruning.MagnitudeConfig`,
    :class:`pruning.WandaConfig`, :class:`pruning.TaylorConfig`, :class:`pruning.SemiStructuredConfig`), whose
    config validates ``sparsity``/``scope``/``n``/``m``/``score``; the keys a method has no field for are unused.
    """

    method: MaskMethod | int = "none"
    """Mask method: none or a method of the pruning registry: magnitude, wanda, taylor (|w x grad| over labelled
    calibration batches), nm (n:m), or "2:4" (quote it: YAML reads 2:4 as a number)."""
    sparsity: float = field(default=0.5, metadata=_RATIO)
    """Final share of zero weights (magnitude, wanda, taylor)."""
    scope: Literal["layer", "global", "row"] | None = None
    """Where weights compete: layer, global (magnitude, taylor) or row (wanda, taylor); default: the method's (layer
    for magnitude and taylor, row for wanda)."""
    n: int = field(default=2, metadata={"min": 1})
    """method nm: keep n of every m consecutive input weights."""
    m: int = field(default=4, metadata={"min": 2})
    """method nm: group size."""
    score: Literal["magnitude", "wanda"] = "magnitude"
    """N:M methods: rank weights in a group by magnitude or by wanda (needs calibration data)."""
    schedule: Literal["one_shot", "gradual"] = "one_shot"
    """one_shot at at_epoch, or gradual (cubic, Zhu & Gupta) from start_epoch to end_epoch; gradual: methods whose
    sparsity is a setting (magnitude, wanda, taylor)."""
    at_epoch: float = field(default=0.0, metadata={"min": 0.0})
    """one_shot: epoch at which the masks are applied."""
    start_epoch: float = field(default=0.0, metadata={"min": 0.0})
    """gradual: epoch at which the ramp starts at initial_sparsity."""
    end_epoch: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})
    """gradual: epoch at which sparsity is reached; default: 3/4 of training."""
    frequency: int = field(default=50, metadata={"min": 1})
    """gradual: optimiser steps between mask updates."""
    initial_sparsity: float = field(default=0.0, metadata=_RATIO)
    """gradual: sparsity at start_epoch (at most sparsity)."""
    include_head: bool = False
    """Also mask the classifier head."""
    include_patch_embed: bool = False
    """Also mask the patch embedding."""
    exclude: list[str] = field(default_factory=list)
    """More layer-name prefixes to keep dense."""
    calib_batches: int = field(default=4, metadata={"min": 1})
    """Training batches (no augmentation) that feed Wanda and Taylor masks and structured activation/Taylor
    importance."""
    sparse_kernels: bool = False
    """method "2:4" on CUDA: train with torch.sparse semi-structured kernels where a probe shows a speed-up."""
    structured: StructuredPruningConfig = field(default_factory=StructuredPruningConfig)
    """Structured thinning: remove whole heads and MLP neurons (pruning.StructuredConfig) at structured.at_epoch."""

    @property
    def masks_enabled(self) -> bool:
        return self.method != "none"

    @property
    def enabled(self) -> bool:
        return self.masks_enabled or self.structured.enabled

    @property
    def mask_epoch(self) -> float:
        """When masks first appear (one-shot epoch, or the start of the gradual ramp)."""
        return self.start_epoch if self.schedule == "gradual" else self.at_epoch

    def mask_config(self, sparsity: float | None = None) -> Any:
        """The library config of ``method`` (at ``sparsity``, default the final one); N:M ignores it."""
        target = self.sparsity if sparsity is None else sparsity
        return config_for(
            self.method, sparsity=target, scope=self.scope, n=self.n, m=self.m, score=self.score, kernels="off"
        )

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if isinstance(self.method, int):
            raise ConfigError(
                f'{p}method: got the number {self.method}; YAML reads an unquoted 2:4 as a number, write method: "2:4"'
            )
        if self.masks_enabled:
            try:
                self.mask_config()
            except ValueError as e:
                raise ConfigError(f"{p}{e}") from None
        if self.schedule == "gradual":
            if not self.masks_enabled or not method_named(self.method).gradual:
                gradual = [m.name for m in methods() if m.gradual]
                raise ConfigError(
                    f"{p}schedule: gradual needs method {', '.join(gradual[:-1])} or {gradual[-1]} "
                    f"(the others have a fixed sparsity), got method {self.method!r}"
                )
            if self.initial_sparsity > self.sparsity:
                raise ConfigError(
                    f"{p}initial_sparsity: expected <= sparsity ({self.sparsity}), got {self.initial_sparsity}"
                )
            if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
                raise ConfigError(f"{p}end_epoch: expected > start_epoch ({self.start_epoch}), got {self.end_epoch}")
        if self.sparse_kernels and self.method != "2:4":
            raise ConfigError(f'{p}sparse_kernels: needs method "2:4", got method {self.method!r}')
        if self.masks_enabled and self.structured.enabled and self.structured.at_epoch > self.mask_epoch:
            raise ConfigError(
                f"{p}structured.at_epoch: thinning must happen at or before the masks appear "
                f"(epoch {self.mask_epoch:g}), got {self.structured.at_epoch:g}"
            )
