"""The run log: metrics.jsonl records, the event list, console lines and progress bars (rank 0 only)."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

from lotus.errors import LotusError
from lotus.run_report import event_line
from lotus.safe_io import open_append
from lotus.training.run_dir import truncate_log
from lotus.training.trackers import WandbSink, scalars, tensorboard_writer

__all__ = ["RunLog"]


class RunLog:
    """Writes one JSON record per line to ``run_dir/metrics.jsonl`` and keeps the run's events.

    ``write``: whether this process writes files (rank 0 of a run that has a run directory);
    ``show``: whether it prints epoch lines and events (``quiet`` off, rank 0).
    """

    def __init__(self, run_dir: str, write: bool, show: bool, tensorboard: bool = False, wandb: dict | None = None):
        self.run_dir, self.write, self.show = run_dir, write, show
        self.events: list[dict] = []
        self._file: IO[str] | None = None
        self.tensorboard = tensorboard and write
        self.wandb = wandb if write else None  # WandbSink's keyword arguments (mode, project, name, config)
        self._tb: Any = None
        self._wb: WandbSink | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def open(self, truncate_to: int | None = None) -> None:
        """Open metrics.jsonl for appending; on resume first cut it back to its length at the checkpoint
        (``truncate_to`` bytes), so work redone after a kill is not recorded twice."""
        if self.write:
            os.makedirs(self.run_dir, exist_ok=True)
            truncate_log(self.path, truncate_to)
            self._file = io.TextIOWrapper(open_append(self.path), encoding="utf-8")  # never through a symlink
        if self.tensorboard:
            self._tb = tensorboard_writer(os.path.join(self.run_dir, "tensorboard"))
        if self.wandb is not None:
            self._wb = WandbSink(self.run_dir, **self.wandb)

    def size(self) -> int | None:
        """Bytes written to metrics.jsonl so far (saved with each checkpoint)."""
        return self._file.tell() if self._file is not None else None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb is not None:
            self._wb.close()
            self._wb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def record(self, record: dict) -> None:
        """Append one record (an epoch's metrics or an event) to metrics.jsonl."""
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:  # a full disk: name the file (resume cuts a half-written line off)
                raise LotusError(
                    f"cannot write {self.path}: {e.strerror or e} (the last checkpoint is kept; "
                    f"free space, then lotus train --resume {self.run_dir})"
                ) from None
        values = scalars(record) if self._tb is not None or self._wb is not None else {}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wb is not None:
            self._wb.add(values, record["step"])

    def event(self, record: dict) -> None:
        """Keep an event for the summary, write it, and print its scalar fields."""
        self.events.append(record)
        self.record(record)
        self.print(event_line(record))

    def print(self, text: str) -> None:
        if self.show:
            tqdm.write(text)

    def progress(self, it: Iterable, total: int, desc: str) -> Iterator | Iterable:
        """``it`` wrapped in a tqdm bar when printing to a terminal, else ``it`` itself."""
        if self.show and sys.stdout.isatty():
            return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return it

    @staticmethod
    def epoch_line(m: dict[str, Any], epochs: int) -> str:
        parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}"]
        if "val_acc" in m:
            parts += [f"val_loss {m['val_loss']:.4f}", f"val_acc {m['val_acc'] * 100:.2f}%"]
        parts += [f"{m['throughput']} img/s", f"{m['wall_s']:.1f}s"]
        return "  ".join(parts)
