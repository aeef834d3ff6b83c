"""Which files of a run folder a command reads: one rule for every ``--checkpoint`` (and its ``--config``).

A ``--checkpoint`` may be a weights file or a run folder (``lotus train --out``); a run folder means its
``best.safetensors`` (else ``last.safetensors``), and its ``config.yaml`` is the default ``--config``. This
module imports neither torch nor timm, so the CLI can check paths before work starts.
"""

from __future__ import annotations

import os

from lotus.errors import LotusError

__all__ = ["checkpoint_file", "run_config"]


def checkpoint_file(path: str, key: str = "--checkpoint") -> str:
    """``path`` itself (a weights file) or the weights a run folder ``path`` holds; a one-line error else."""
    if os.path.isdir(path):
        for name in ("best.safetensors", "last.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise LotusError(
            f"{key}: {path} is a folder without best.safetensors or last.safetensors (expected a run "
            "folder or a weights file)"
        )
    if not os.path.isfile(path):
        raise LotusError(f"{key}: file not found: {path}")
    return path


def run_config(checkpoint: str) -> str | None:
    """The ``config.yaml`` of the run a checkpoint (folder or file) comes from, or None when there is none."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    path = os.path.join(folder, "config.yaml")
    return path if os.path.isfile(path) else None
