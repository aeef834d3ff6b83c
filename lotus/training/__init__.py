"""The training loop, split by concern: :mod:`~lotus.training.trainer` (the Trainer), ``state`` (counters,
RNG), ``run_log`` (metrics.jsonl, console), ``checkpointer`` (save, resume), ``step`` (one optimiser step)."""

from __future__ import annotations

from lotus.training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
