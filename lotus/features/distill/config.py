"""The ``distill:`` config section (off by default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lotus.errors import ConfigError

__all__ = ["DistillConfig"]


@dataclass
class DistillConfig:
    """Soft-label knowledge distillation from a frozen teacher (each field's docstring says what it does)."""

    enabled: bool = False
    """Distil from distill.teacher during training."""
    teacher: str | None = None
    """The teacher: a .safetensors file written by Lotus (it records the model section that rebuilds it, thinned
    widths included); it must predict the data's classes."""
    alpha: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Weight of the teacher in the targets: alpha x softmax(teacher(x)) + (1 - alpha) x labels (temperature 1); 0:
    labels only, 1: teacher only."""

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.enabled and not self.teacher:
            raise ConfigError(f"{p}teacher: required when {p}enabled is true (a .safetensors file written by Lotus)")
        if self.teacher is not None and not self.teacher.endswith(".safetensors"):
            raise ConfigError(f"{p}teacher: expected a .safetensors file written by Lotus, got {self.teacher!r}")
