"""Train several configs x seeds side by side and compare time-to-accuracy.

The first config is the baseline. The target accuracy is its mean final accuracy minus 0.5 pp
(--target-drop) unless --target is given. Writes OUT/bench.md (table), OUT/bench.json,
OUT/acc_vs_time.png, OUT/acc_vs_flops.png, and every run under OUT/<config>/seed<k>. Re-running the
same command reuses finished runs.

--jobs N trains N runs side by side in worker processes, each pinned to cpu_count // N threads (unless
--set train.threads=... is given); the runs then share the machine, so wall times (and time-to-target) are
only comparable between runs of the same invocation, and are slower than with --jobs 1.

example:
  lotus bench --configs configs/digits.yaml configs/digits_lotus.yaml --seeds 3 --out bench/digits
  lotus bench --configs configs/digits.yaml configs/digits_lotus.yaml --seeds 4 --jobs 2 --out bench/digits_j2
"""

from __future__ import annotations

import argparse
import sys

from lotus.errors import LotusError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", required=True, metavar="YAML", help="configs to compare (first = baseline)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every config (e.g. data.name=imagefolder)",
    )
    p.add_argument("--target", type=float, help="target val accuracy in [0,1] (default: baseline final - drop)")
    p.add_argument(
        "--target-drop", type=float, default=0.005, help="target = baseline mean final acc - this (default 0.005)"
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        metavar="N",
        help="runs side by side in N worker processes, each pinned to cpu_count // N threads (default 1)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise LotusError(f"--seeds: expected int >= 1, got {args.seeds}")
    if args.target is not None and not 0 < args.target <= 1:
        raise LotusError(f"--target: expected a float in (0, 1], got {args.target}")
    if args.jobs < 1:
        raise LotusError(f"--jobs: expected int >= 1, got {args.jobs}")
    if args.jobs > 1:
        print(
            f"note: --jobs {args.jobs}: runs share the machine side by side, so their wall times are slower than "
            "alone and comparable only within this bench (every config runs under the same load)",
            file=sys.stderr,
        )
    from lotus.bench import run_bench  # imports torch
    from lotus.bench_report import analyse, write_bench  # (with run_bench): once the arguments are checked
    from lotus.safe_io import output_lock, refuse_symlink

    refuse_symlink(args.out, "--out")
    with output_lock(args.out, "--out"):  # a second bench into this --out is refused while this one runs
        results = run_bench(
            args.configs, args.seeds, args.out, args.set, quiet=args.quiet, progress=not args.quiet, jobs=args.jobs
        )
        print(write_bench(analyse(results, args.target, args.target_drop), args.out))
    return 0
