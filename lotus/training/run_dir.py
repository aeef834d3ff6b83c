"""The run directory as a resource: one process at a time, no stale temp files, and a clear answer to
"what is in here" (nothing, a half-made run, a run with a checkpoint) before anything is written.

The lock is an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` (:class:`lotus.safe_io.FileLock`, never
through a symlink) held for the whole run (the kernel drops it when the process dies, so a SIGKILL never
leaves a stale lock); the file holds the holder's pid for the error message a second process gets.
"""

from __future__ import annotations

import json
import os
import re
import time

from lotus.config import Config, save_config
from lotus.errors import LotusError
from lotus.safe_io import FileLock, open_append, refuse_symlink, remove_temps

__all__ = ["RunDir", "RUN_FILES", "truncate_log"]

# Files a Lotus run writes (what --force removes; anything else in the folder is left alone).
RUN_FILES = (
    "metrics.jsonl",
    "state.pt",
    "best.safetensors",
    "last.safetensors",
    "summary.json",
    "report.md",
    "curves.png",
    "config.yaml",
    "config_history.jsonl",
    "outliers.md",
    "outliers_history.png",
    "outliers_layers.png",
    "dynamic_ticket.npz",
    "ema.safetensors",
    "checkpoints.json",
)


class RunDir:
    """One run directory: ``lock()`` it, then ask what it holds (``has_state``, ``has_run``)."""

    def __init__(self, path: str):
        self.path = path
        self._lock: FileLock | None = None
        self._created = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def has_state(self) -> bool:
        return os.path.isfile(self.file("state.pt"))

    @property
    def has_run(self) -> bool:
        """Something a run wrote: a log or a saved config (a half-made run has these but no state.pt)."""
        return any(os.path.exists(self.file(n)) for n in ("metrics.jsonl", "config.yaml", "state.pt"))

    # ------------------------------------------------------------------ lock
    def lock(self, shared: bool = False) -> None:
        """Take the run-dir lock or raise a one-line error naming the process that holds it (``shared``: a
        reader's lock, e.g. ``lotus report``: refused while a run writes here, changes nothing in the folder).

        The folder must not be a symlink, nor its ``.lock``; a folder this call creates is removed again by
        :meth:`unlock` if the run left nothing in it."""
        refuse_symlink(self.path, "output.dir")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise LotusError(f"output.dir: {self.path} exists and is not a directory")
        self._created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        lock = FileLock(self.file(".lock"), "output.dir", self.path, shared=shared)
        try:
            self._lock = lock.acquire()
        except BaseException:
            self._remove_if_empty()
            raise

    def unlock(self) -> None:
        """Release the lock; a run that wrote nothing leaves no ``.lock`` (nor a folder it created)."""
        if self._lock is not None:
            self._lock.remove = self._lock.remove or self._empty()
            self._lock.release()
            self._lock = None
            self._remove_if_empty()

    def _empty(self) -> bool:
        return os.path.isdir(self.path) and set(os.listdir(self.path)) <= {".lock"}

    def _remove_if_empty(self) -> None:
        if self._created and os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)

    # --------------------------------------------------------------- cleanup
    def remove_stale_temps(self) -> list[str]:
        """Delete temp files a killed writer left (``.lotus-tmp-*``, and earlier versions' and safetensors'
        ``.tmp*``); only call while holding the lock."""
        return remove_temps(self.path, legacy=True)

    def clear_run(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Delete the files of the run that is here (only Lotus' own outputs, except ``keep``)."""
        history = (
            sorted(n for n in os.listdir(self.path) if re.fullmatch(r"checkpoint-\d+\.safetensors", n))
            if os.path.isdir(self.path)
            else []
        )  # output.keep_checkpoints
        gone = [n for n in (*RUN_FILES, *history) if n not in keep and os.path.exists(self.file(n))]
        for n in gone:
            os.remove(self.file(n))
        return gone

    def record_config(self, cfg: Config, resumed_at: int, overrides: list[str]) -> None:
        """After a resumed run's first checkpoint: its config (with this invocation's ``--set``) becomes the
        run's ``config.yaml``, and the overrides are appended to ``config_history.jsonl``."""
        save_config(cfg, self.file("config.yaml"))
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": resumed_at, "overrides": overrides}
        with open_append(self.file("config_history.jsonl")) as f:
            f.write((json.dumps(entry) + "\n").encode())

    def prepare(self, resume: bool, force: bool) -> list[str]:
        """Make the locked folder ready for a run; returns notes for the event log.

        A new run needs a folder without a run (``force`` deletes the old one); ``resume`` continues from
        ``state.pt``, or restarts a half-made run (a config and a log but no checkpoint yet)."""
        notes = []
        stale = self.remove_stale_temps()
        if stale:
            notes.append(
                f"removed {len(stale)} temp file(s) a killed write left: {', '.join(map(os.path.basename, stale))}"
            )
        if resume:
            if not self.has_state and self.has_run:
                self.clear_run(keep=("config.yaml",))
                notes.append("no checkpoint yet: the run starts over from its config.yaml")
            return notes
        if self.has_run and not self.has_state and not os.path.exists(self.file("config.yaml")):
            notes.append(f"removed what a run killed before saving its config left ({', '.join(self.clear_run())})")
        if self.has_run:
            if force:
                notes.append(f"--force: removed the previous run ({', '.join(self.clear_run())})")
            elif self.has_state:
                raise LotusError(
                    f"output.dir: {self.path} already holds a run; resume it with --resume {self.path}, "
                    "start over with --force, or choose another --out"
                )
            else:
                raise LotusError(
                    f"output.dir: {self.path} holds a run that stopped before its first checkpoint; "
                    f"restart it with --resume {self.path}, start over with --force, or choose another --out"
                )
        return notes


def truncate_log(path: str, size: int | None) -> None:
    """Cut ``metrics.jsonl`` back to ``size`` bytes (its length at the restored checkpoint), dropping the
    records of work a killed run did after it; ``None`` (an older state) leaves the file as it is."""
    if size is None or os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) <= size:
        return
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
