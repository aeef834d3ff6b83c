"""Experiment trackers beside metrics.jsonl: TensorBoard (``output.tensorboard``) and Weights & Biases
(``output.wandb``). Both are optional packages, imported only when turned on, and both receive the same
scalars: every numeric field of each epoch and step record, keyed ``<epoch|step>/<field>`` at its step."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from lotus.errors import LotusError

__all__ = ["tensorboard_writer", "WandbSink", "scalars"]


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of an epoch or step record, keyed ``<type>/<field>`` (empty for other records)."""
    kind = record.get("type")
    if kind not in ("epoch", "step"):
        return {}
    return {
        f"{kind}/{k}": v
        for k, v in record.items()
        if k not in ("type", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def tensorboard_writer(log_dir: str) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` (the optional ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except ImportError:
        raise LotusError(
            "output.tensorboard: needs the tensorboard package (pip install tensorboard, "
            "or pip install -e '.[tensorboard]' in the Lotus checkout), or set output.tensorboard: false"
        ) from None
    return SummaryWriter(log_dir=log_dir)


class WandbSink:
    """One Weights & Biases run per run folder: its id is derived from the folder, so a resumed run appends
    to the same W&B run; ``mode`` is ``offline`` (files under RUN_DIR/wandb, ``wandb sync`` later) or
    ``online``."""

    def __init__(self, run_dir: str, mode: str, project: str, name: str, config: dict):
        try:
            import wandb  # optional dependency
        except ImportError:
            raise LotusError(
                "output.wandb: needs the wandb package (pip install wandb, or pip install -e '.[wandb]' in the "
                "Lotus checkout), or set output.wandb: off"
            ) from None
        run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=run_dir,
            config=config,
        )

    def add(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
