"""Train on the indices of an offline ticket file (``tickets.file``, written by ``lotus select``).

The file's dataset fingerprint (size, labels hash, sampled pixels) is checked against the train split
before training starts, and on resume the indices must be the ones the run started with.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from data_tickets import TicketFile
from lotus.callbacks import Callback, Trainer
from lotus.errors import LotusError

__all__ = ["TicketSubset", "load_ticket"]


def load_ticket(path: str, key: str = "tickets.file") -> TicketFile:
    """Load a ticket file, turning library errors into one-line :class:`LotusError` naming ``key``."""
    try:
        return TicketFile.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise LotusError(f"{key}: {e}") from None


def _indices_sha(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


class TicketSubset(Callback):
    """Owns the epoch subset: the (validated) indices of ``tickets.file``, every epoch."""

    def __init__(self, path: str):
        self.path = path
        self.indices: np.ndarray | None = None
        self._resumed_sha: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        ticket = load_ticket(self.path)
        try:
            ticket.validate_against(trainer.train_set, labels=trainer.labels_train)
        except ValueError as e:
            raise LotusError(f"tickets.file: {e} (make a new one with lotus select on this config)") from None
        idx = np.sort(ticket.indices)
        sha = _indices_sha(idx)
        if self._resumed_sha is not None and sha != self._resumed_sha:
            raise LotusError(
                f"tickets.file: {self.path} changed since this run started (other indices); "
                "restore the original file or start a new run"
            )
        self.indices = idx
        n = len(trainer.train_set)
        if not trainer.restored:  # logged once per run, not again on resume
            trainer.log(
                "tickets",
                file=os.path.abspath(self.path),
                count=int(idx.size),
                train_size=n,
                fraction=round(idx.size / n, 6),
                scorer=ticket.scorer,
                policy=ticket.policy,
                seed=ticket.seed,
            )

    def epoch_subset(self, trainer: Trainer, epoch: int) -> np.ndarray | None:
        return self.indices

    def state_dict(self) -> dict:
        return {
            "file": os.path.abspath(self.path),
            "indices_sha256": _indices_sha(self.indices) if self.indices is not None else "",
        }

    def load_state_dict(self, state: dict) -> None:
        self._resumed_sha = state.get("indices_sha256") or None
