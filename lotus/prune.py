"""The ``pruning:`` config section: sparsity masks and structured thinning applied during training.

Disabled by default (``method: none`` and no ``structured`` ratios), so a config without the section trains
dense. Examples::

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

    pruning:
      structured: {heads: 0.25, mlp: 0.5, importance: taylor, round_to: 8, at_epoch: 0}

The callback that does the work lives in ``lotus.prune_callback`` (imported lazily: ``lotus.train`` imports
this module through ``lotus.config``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lotus.errors import ConfigError

__all__ = ["PruningConfig", "StructuredPruningConfig", "callbacks"]

_RATIO = {"min": 0.0, "max": 1.0, "max_exclusive": True}


@dataclass
class StructuredPruningConfig:
    """Structured thinning (whole heads / MLP neurons removed; the model gets smaller and faster)."""

    heads: float = field(default=0.0, metadata=_RATIO)
    mlp: float = field(default=0.0, metadata=_RATIO)
    importance: Literal["magnitude", "activation", "taylor"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    round_to: int = field(default=1, metadata={"min": 1})
    min_heads: int = field(default=1, metadata={"min": 1})
    at_epoch: float = field(default=0.0, metadata={"min": 0.0})  # when to thin (fractional epochs allowed)

    @property
    def enabled(self) -> bool:
        return self.heads > 0 or self.mlp > 0


@dataclass
class PruningConfig:
    """Unstructured / N:M masks on a schedule, plus optional structured thinning.

    ``method``: none | magnitude | wanda | nm (``n``:``m``) | "2:4". ``scope``: magnitude ``layer``/``global``;
    wanda ``row`` (default for wanda)/``layer``. ``schedule``: ``one_shot`` at ``at_epoch`` or ``gradual``
    (cubic from ``initial_sparsity`` at ``start_epoch`` to ``sparsity`` at ``end_epoch``, default 3/4 of
    training, updated every ``frequency`` optimizer steps; magnitude and wanda only). The classifier head and
    patch embedding stay dense unless ``include_head``/``include_patch_embed``; ``exclude`` lists more layer
    prefixes to keep dense. ``calib_batches`` training batches (no augmentation) feed Wanda and
    activation/Taylor importance.
    """

    method: Literal["none", "magnitude", "wanda", "nm", "2:4"] | int = "none"
    sparsity: float = field(default=0.5, metadata=_RATIO)
    scope: Literal["layer", "global", "row"] | None = None
    n: int = field(default=2, metadata={"min": 1})
    m: int = field(default=4, metadata={"min": 2})
    score: Literal["magnitude", "wanda"] = "magnitude"
    schedule: Literal["one_shot", "gradual"] = "one_shot"
    at_epoch: float = field(default=0.0, metadata={"min": 0.0})
    start_epoch: float = field(default=0.0, metadata={"min": 0.0})
    end_epoch: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})
    frequency: int = field(default=50, metadata={"min": 1})
    initial_sparsity: float = field(default=0.0, metadata=_RATIO)
    include_head: bool = False
    include_patch_embed: bool = False
    exclude: list[str] = field(default_factory=list)
    calib_batches: int = field(default=4, metadata={"min": 1})
    sparse_kernels: bool = False
    structured: StructuredPruningConfig = field(default_factory=StructuredPruningConfig)

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

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if isinstance(self.method, int):
            raise ConfigError(
                f'{p}method: got the number {self.method}; YAML reads an unquoted 2:4 as a number, write method: "2:4"'
            )
        scopes = {"magnitude": ("layer", "global"), "wanda": ("row", "layer")}
        if self.scope is not None and self.method in scopes and self.scope not in scopes[self.method]:
            allowed = " or ".join(repr(s) for s in scopes[self.method])
            raise ConfigError(f"{p}scope: expected {allowed} for method {self.method}, got {self.scope!r}")
        if self.method == "nm" and self.n >= self.m:
            raise ConfigError(f"{p}n: expected n < m for N:M sparsity, got {self.n}:{self.m}")
        if self.schedule == "gradual":
            if self.method not in ("magnitude", "wanda"):
                raise ConfigError(f"{p}schedule: gradual needs method magnitude or wanda (N:M sparsity is fixed), "
                                  f"got method {self.method!r}")
            if self.initial_sparsity > self.sparsity:
                raise ConfigError(f"{p}initial_sparsity: expected <= sparsity ({self.sparsity}), "
                                  f"got {self.initial_sparsity}")
            if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
                raise ConfigError(f"{p}end_epoch: expected > start_epoch ({self.start_epoch}), got {self.end_epoch}")
        if self.sparse_kernels and self.method != "2:4":
            raise ConfigError(f"{p}sparse_kernels: needs method \"2:4\", got method {self.method!r}")
        if self.masks_enabled and self.structured.enabled and self.structured.at_epoch > self.mask_epoch:
            raise ConfigError(
                f"{p}structured.at_epoch: thinning must happen at or before the masks appear "
                f"(epoch {self.mask_epoch:g}), got {self.structured.at_epoch:g}"
            )


def callbacks(cfg: Any) -> list:
    """The pruning callback when the ``pruning:`` section is enabled (else nothing)."""
    pcfg: PruningConfig | None = getattr(cfg, "pruning", None)
    if pcfg is None or not pcfg.enabled:
        return []
    epochs = cfg.train.epochs
    for name, value in (("at_epoch", pcfg.at_epoch if pcfg.masks_enabled and pcfg.schedule == "one_shot" else None),
                        ("start_epoch", pcfg.start_epoch if pcfg.schedule == "gradual" else None),
                        ("end_epoch", pcfg.end_epoch if pcfg.schedule == "gradual" else None),
                        ("structured.at_epoch", pcfg.structured.at_epoch if pcfg.structured.enabled else None)):
        limit_ok = value is None or (value <= epochs if name == "end_epoch" else value < epochs)
        if not limit_ok:
            rel = "<=" if name == "end_epoch" else "<"
            raise ConfigError(f"pruning.{name}: expected a value {rel} train.epochs ({epochs}), got {value:g}")
    if cfg.parallel.mode != "none":
        raise ConfigError(f"pruning: not supported with parallel.mode {cfg.parallel.mode!r} yet; "
                          "use parallel.mode: none")
    from lotus.prune_callback import PruningCallback

    return [PruningCallback(pcfg)]


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":
        from lotus.prune_callback import PruningCallback

        return PruningCallback
    raise AttributeError(f"module 'lotus.prune' has no attribute {name!r}")
