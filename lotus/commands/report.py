"""Summarise a run: print the key numbers and write RUN_DIR/report.md and curves.png.

example:
  lotus report runs/digits-20261127-101500
"""

from __future__ import annotations

import argparse
import os

from lotus.errors import LotusError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by lotus train")


def run(args: argparse.Namespace) -> int:
    from lotus.run_report import write_report  # imports torch (atomic checkpoint writes)
    from lotus.training.run_dir import RunDir

    if not os.path.isdir(args.run_dir):
        raise LotusError(f"report: {args.run_dir} is not a run directory")
    run_dir = RunDir(args.run_dir)
    run_dir.lock(shared=True)  # not while a run writes into it
    try:
        print(write_report(args.run_dir))
    finally:
        run_dir.unlock()
    return 0
