"""``output.keep_checkpoints: N``: the N best epochs' weights by ``val_acc``, like timm's ``CheckpointSaver``.

Files: ``checkpoint-<epoch>.safetensors`` (the same self-describing weights as ``best.safetensors``) and
``checkpoints.json`` (the kept list, best first: epoch, step, val_acc, file). Every write is atomic. The kept
list is also part of ``state.pt``; files of an epoch the list does not hold (a run killed between writing an
epoch's checkpoint and its ``state.pt``) are removed on resume, and files that drop out of the list are
deleted only after the ``state.pt`` that no longer lists them is written, so a kill at any point resumes
to the same set.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from typing import Any

from lotus.safe_io import atomic_write_text

__all__ = ["CheckpointHistory"]

_NAME = re.compile(r"checkpoint-(\d+)\.safetensors$")


class CheckpointHistory:
    """The kept epochs of one run directory (rank 0 only)."""

    def __init__(self, run_dir: str, keep: int):
        self.run_dir, self.keep = run_dir, keep
        self.kept: list[dict] = []  # best first
        self._drop: list[dict] = []

    @property
    def summary_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoints.json")

    def file(self, epoch: int) -> str:
        return os.path.join(self.run_dir, f"checkpoint-{epoch}.safetensors")

    def update(self, epoch: int, step: int, val_acc: float | None, write: Callable[[str], None]) -> list[dict]:
        """Offer this epoch: if it is among the ``keep`` best, ``write(path)`` its weights; returns the new list
        (for ``state.pt``). Call :meth:`commit` once ``state.pt`` is written."""
        if self.keep <= 0 or val_acc is None:
            return list(self.kept)
        entry = {"epoch": epoch, "step": step, "val_acc": float(val_acc), "file": os.path.basename(self.file(epoch))}
        ranked = sorted(
            [e for e in self.kept if e["epoch"] != epoch] + [entry], key=lambda e: (-e["val_acc"], e["epoch"])
        )  # ties: the earlier epoch stays
        new, self._drop = ranked[: self.keep], ranked[self.keep :]
        if entry in new:
            write(self.file(epoch))
        self.kept = new
        atomic_write_text(
            self.summary_path, json.dumps({"metric": "val_acc", "keep": self.keep, "checkpoints": self.kept}, indent=2)
        )
        return list(self.kept)

    def commit(self) -> None:
        """Delete the files that left the list (after ``state.pt`` stopped listing them)."""
        for e in self._drop:
            path = os.path.join(self.run_dir, e["file"])
            if os.path.exists(path):
                os.remove(path)
        self._drop = []

    def restore(self, kept: list[Any] | None) -> None:
        """Resume: the list saved in ``state.pt``; remove checkpoint files it does not hold and rewrite the summary."""
        self.kept = [dict(e) for e in (kept or [])]
        names = {e["file"] for e in self.kept}
        for path in glob.glob(os.path.join(self.run_dir, "checkpoint-*.safetensors")):
            if _NAME.search(path) and os.path.basename(path) not in names:
                os.remove(path)
        if self.keep > 0 or self.kept:
            atomic_write_text(
                self.summary_path,
                json.dumps({"metric": "val_acc", "keep": self.keep, "checkpoints": self.kept}, indent=2),
            )
