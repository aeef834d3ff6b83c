"""Ticket files: a selected subset (and optional patch tickets) stored as ``.npz`` without pickle.

Layout (format ``lotus-tickets`` v1)::

    indices        int64 [k]       selected dataset indices (unique)
    scores         float32 [n]     per-sample scores of the whole dataset (optional)
    patch_indices  int64 [n, m]    patch positions per dataset index, most informative first (optional,
                                   patch tickets: a per-image ranking, the first K are the kept patches)
    patch_scores   float32 [n, P]  per-patch scores per dataset index (optional)
    meta           str (0-d)       JSON: format, format_version, version, scorer, policy, fraction, count,
                                   seed, class_balanced, proxy, fingerprint, extra

Files are written atomically (temporary file in the same folder, then ``os.replace``), so an existing file
is never left half-written, and loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ._atomic import write_atomic
from ._version import __version__
from .fingerprint import compare_fingerprints, dataset_fingerprint

__all__ = ["TicketFile", "FORMAT", "FORMAT_VERSION"]

FORMAT = "lotus-tickets"
FORMAT_VERSION = 1
_ARRAYS = ("indices", "scores", "patch_indices", "patch_scores")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


@dataclass
class TicketFile:
    """A data ticket: kept indices plus how they were chosen and for which dataset."""

    indices: np.ndarray
    scores: np.ndarray | None = None
    fingerprint: dict | None = None
    scorer: str | None = None
    policy: str | None = None
    fraction: float | None = None
    seed: int | None = None
    class_balanced: bool = False
    proxy: dict | None = None
    patch_indices: np.ndarray | None = None
    patch_scores: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    version: str = __version__
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(
                self.scores.detach().cpu() if hasattr(self.scores, "detach") else self.scores, dtype=np.float32
            ).reshape(-1)
        if self.patch_indices is not None:
            self.patch_indices = np.asarray(self.patch_indices, dtype=np.int64)
        if self.patch_scores is not None:
            self.patch_scores = np.asarray(self.patch_scores, dtype=np.float32)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, indices: Any, *, dataset: Dataset | None = None, labels: Any = None, **fields: Any) -> TicketFile:
        """Build a ticket and fingerprint ``dataset`` (and/or ``labels``) it belongs to."""
        fp = dataset_fingerprint(dataset, labels) if (dataset is not None or labels is not None) else None
        t = cls(np.asarray(indices), fingerprint=fp, **fields)
        t.check()
        return t

    def __repr__(self) -> str:
        parts = [
            f"count={self.count}",
            f"size={self.size}",
            f"scorer={self.scorer!r}",
            f"policy={self.policy!r}",
            f"fraction={self.fraction}",
            f"seed={self.seed}",
        ]
        if self.patch_indices is not None:
            parts.append(f"patch_indices={list(self.patch_indices.shape)}")
        if self.path:
            parts.append(f"path={self.path!r}")
        return f"TicketFile({', '.join(parts)})"

    @property
    def count(self) -> int:
        return int(self.indices.size)

    @property
    def size(self) -> int | None:
        """Dataset size the ticket was made for (from the fingerprint or the scores)."""
        if self.fingerprint is not None:
            return int(self.fingerprint["size"])
        return int(self.scores.size) if self.scores is not None else None

    def metadata(self) -> dict:
        return _jsonable(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": self.version,
                "scorer": self.scorer,
                "policy": self.policy,
                "fraction": self.fraction,
                "count": self.count,
                "seed": self.seed,
                "class_balanced": self.class_balanced,
                "proxy": self.proxy,
                "fingerprint": self.fingerprint,
                "extra": self.extra,
            }
        )

    # ------------------------------------------------------------------ checks
    def _where(self) -> str:
        return f"ticket file {self.path}" if self.path else "ticket"

    def check(self) -> TicketFile:
        """Internal consistency: unique in-range indices, array shapes agree with the dataset size."""
        w = self._where()
        if self.indices.size == 0:
            raise ValueError(f"{w}: no indices (empty subset)")
        n = self.size
        lo, hi = int(self.indices.min()), int(self.indices.max())
        if lo < 0 or (n is not None and hi >= n):
            bad = lo if lo < 0 else hi
            raise ValueError(f"{w}: index {bad} out of range [0, {n}) for the dataset it was made for")
        if np.unique(self.indices).size != self.indices.size:
            raise ValueError(f"{w}: indices contain duplicates")
        if self.scores is not None and n is not None and self.scores.size != n:
            raise ValueError(f"{w}: scores has {self.scores.size} entries, expected {n} (dataset size)")
        if self.patch_indices is not None:
            if self.patch_indices.ndim != 2 or (n is not None and self.patch_indices.shape[0] != n):
                raise ValueError(
                    f"{w}: patch_indices must be [dataset size {n}, kept patches], "
                    f"got shape {list(self.patch_indices.shape)}"
                )
            if self.patch_indices.size and int(self.patch_indices.min()) < 0:
                raise ValueError(f"{w}: patch_indices contain negative positions")
        if self.patch_scores is not None:
            if self.patch_scores.ndim != 2 or (n is not None and self.patch_scores.shape[0] != n):
                raise ValueError(
                    f"{w}: patch_scores must be [dataset size {n}, patches], got shape {list(self.patch_scores.shape)}"
                )
            if (
                self.patch_indices is not None
                and self.patch_indices.size
                and int(self.patch_indices.max()) >= self.patch_scores.shape[1]
            ):
                raise ValueError(
                    f"{w}: patch_indices reach {int(self.patch_indices.max())} but there are only "
                    f"{self.patch_scores.shape[1]} patches"
                )
        return self

    def validate_against(self, dataset: Dataset | None = None, labels: Any = None) -> TicketFile:
        """Raise ``ValueError`` (one line) unless the ticket fits this dataset; returns ``self``.

        Checks size, labels hash and (when a dataset is given and both sides have one) the sampled pixels
        hash, plus that every index is in range.
        """
        w = self._where()
        if dataset is None and labels is None:
            raise ValueError("validate_against: pass the dataset and/or its labels")
        actual = dataset_fingerprint(dataset, labels)
        n = actual["size"]
        if self.fingerprint is None:
            if int(self.indices.max()) >= n or int(self.indices.min()) < 0:
                raise ValueError(f"{w}: indices out of range [0, {n}) (max {int(self.indices.max())})")
            return self
        reason = compare_fingerprints(self.fingerprint, actual)
        if reason:
            raise ValueError(
                f"{w}: dataset fingerprint mismatch: {reason}; the ticket was made for a different "
                "dataset, split or preprocessing"
            )
        return self.check()

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (``.npz``); returns the path."""
        self.check()
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"ticket file {path}: expected a .npz file name")
        if path.is_dir():
            raise ValueError(f"ticket file {path}: is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"indices": self.indices, "meta": np.array(json.dumps(self.metadata(), sort_keys=True))}
        for name in _ARRAYS[1:]:
            val = getattr(self, name)
            if val is not None:
                arrays[name] = val
        write_atomic(path, lambda f: np.savez_compressed(f, **arrays))
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TicketFile:
        """Read a ticket file (no pickle); raises FileNotFoundError/ValueError with one-line messages."""
        p = Path(path)
        w = f"ticket file {p}"
        if not p.exists():
            raise FileNotFoundError(f"{w}: not found")
        if p.is_dir():
            raise ValueError(f"{w}: is a directory, expected a .npz file")
        if not zipfile.is_zipfile(p):
            raise ValueError(f"{w}: not a valid .npz ticket file (not a zip archive)")
        try:
            with np.load(p, allow_pickle=False) as z:
                names = set(z.files)
                missing = {"indices", "meta"} - names
                if missing:
                    raise ValueError(f"{w}: malformed, missing array(s) {', '.join(sorted(missing))}")
                data = {k: z[k] for k in names if k in _ARRAYS or k == "meta"}
                for k, v in data.items():
                    if not isinstance(v, np.ndarray):
                        raise ValueError(f"{w}: not a valid .npz ticket file ('{k}' is not a .npy array)")
        except ValueError as e:
            msg = str(e)
            if msg.startswith(w):
                raise
            if "allow_pickle" in msg or "Object arrays" in msg:
                raise ValueError(f"{w}: contains pickled objects, refusing to load (allow_pickle=False)") from None
            raise ValueError(
                f"{w}: not a valid .npz ticket file ({msg.splitlines()[0] if msg else 'unreadable'})"
            ) from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{w}: not a valid .npz ticket file ({type(e).__name__}: {e})") from None
        meta_arr = data.pop("meta")
        if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
            raise ValueError(f"{w}: malformed, 'meta' must be a JSON string")
        try:
            meta = json.loads(str(meta_arr))
        except json.JSONDecodeError as e:
            raise ValueError(f"{w}: malformed metadata JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{w}: not a lotus ticket file (metadata format is not {FORMAT!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{w}: unsupported format_version {meta.get('format_version')!r} (this version reads {FORMAT_VERSION})"
            )
        idx = data["indices"]
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(
                f"{w}: malformed, 'indices' must be a 1-D integer array, got {idx.dtype} shape {list(idx.shape)}"
            )
        for name, kind in (("scores", "f"), ("patch_scores", "f"), ("patch_indices", "iu")):
            if name in data and data[name].dtype.kind not in kind:
                raise ValueError(f"{w}: malformed, '{name}' has dtype {data[name].dtype}")
        fp = meta.get("fingerprint")
        if fp is not None and (not isinstance(fp, dict) or not {"size", "labels_sha256"} <= set(fp)):
            raise ValueError(f"{w}: malformed fingerprint in metadata")
        t = cls(
            indices=idx,
            scores=data.get("scores"),
            fingerprint=fp,
            scorer=meta.get("scorer"),
            policy=meta.get("policy"),
            fraction=meta.get("fraction"),
            seed=meta.get("seed"),
            class_balanced=bool(meta.get("class_balanced", False)),
            proxy=meta.get("proxy"),
            patch_indices=data.get("patch_indices"),
            patch_scores=data.get("patch_scores"),
            extra=meta.get("extra") or {},
            version=str(meta.get("version", "unknown")),
            path=str(p),
        )
        return t.check()
