"""The one harness of the benchmark scripts: the shared flags, the machine description, markdown tables and
the writer of every result (``PATH.json`` + ``PATH.md``, each written atomically).

Every script that trains or times anything calls :func:`add_harness_args` (``--quick``, ``--out`` and, where
seeds apply, ``--seeds``) and writes through :func:`write_results`; statistics over seeds come from
:mod:`lotus.bench_stats`. This module imports no torch, so ``--help`` answers at once.

``--out PATH`` names the results file: ``PATH.json`` and ``PATH.md`` (a trailing ``.json`` or ``.md`` is
dropped); an existing folder (or a path ending in ``/``) gets ``<name>.json`` and ``<name>.md``. The default
is ``benchmarks/results/<name>``; a ``--quick`` run defaults to ``benchmarks/results/quick/<name>`` (ignored
by git), so a smoke run never replaces a measured result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")

__all__ = ["ROOT", "RESULTS", "add_harness_args", "out_path", "args_dict", "machine", "md_table", "write_results"]


def add_harness_args(
    p: argparse.ArgumentParser,
    name: str,
    *,
    seeds: Sequence[int] | None = None,
    quick: str = "smoke run: small sizes, numbers not comparable",
) -> None:
    """Add ``--quick``, ``--out`` and (when ``seeds`` is given, the default list) ``--seeds`` to ``p``."""
    p.add_argument("--quick", action="store_true", help=f"{quick} (default --out under {RESULTS}/quick/)")
    p.add_argument(
        "--out",
        metavar="PATH",
        default=None,
        help=f"results file: writes PATH.json and PATH.md, or DIR/{name}.json and .md for a folder "
        f"(default {RESULTS}/{name})",
    )
    if seeds is not None:
        p.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            default=list(seeds),
            metavar="SEED",
            help=f"seeds (default {' '.join(map(str, seeds))})",
        )
    p.set_defaults(_bench_name=name)


def out_path(args: argparse.Namespace, suffix: str = "") -> str:
    """The results path stem of ``args`` (no extension), with ``suffix`` appended to the file name."""
    out = args.out
    if out is None:
        out = os.path.join(RESULTS, "quick", "") if getattr(args, "quick", False) else os.path.join(RESULTS, "")
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        out = os.path.join(out, args._bench_name)
    stem, ext = os.path.splitext(out)
    return (stem if ext in (".json", ".md") else out) + suffix


def args_dict(args: argparse.Namespace) -> dict:
    """The parsed flags as plain data for a results file (the harness' private keys left out)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def machine() -> dict:
    """CPU count, torch version and threads, Python, processor and CUDA device of this machine."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 4 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_results(stem: str, payload: dict, markdown: str, *, quick: bool = False, echo: bool = True) -> dict:
    """Write ``stem.json`` (``machine`` + ``quick`` + ``payload``) and ``stem.md`` (``markdown``); return the paths.

    ``stem`` is :func:`out_path`'s answer (an extension is dropped). A quick run's markdown says so."""
    stem, ext = os.path.splitext(stem)
    stem = stem if ext in (".json", ".md") else stem + ext
    paths = {"json": stem + ".json", "md": stem + ".md"}
    body = {"machine": machine(), "quick": quick, **payload}
    _atomic_write(paths["json"], json.dumps(body, indent=2, default=str) + "\n")
    note = "\n\n[--quick run: smoke test only, numbers not comparable]\n" if quick else "\n"
    _atomic_write(paths["md"], markdown.rstrip("\n") + note)
    if echo:
        print(markdown)
        print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return paths
