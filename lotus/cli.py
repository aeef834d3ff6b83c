"""The ``lotus`` command line: one subcommand per module in ``lotus.commands``.

User errors (bad config, missing files, bad values; :class:`lotus.errors.LotusError`) print one
``error: ...`` line and exit with code 2. Any other exception is a bug in Lotus: one ``internal error: ...``
line and exit code 1; ``--debug`` (before or after the subcommand) prints the traceback too. Under torchrun
a user error that every rank raises (config, data set-up) is printed by rank 0 only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

from lotus import __version__
from lotus.errors import USER_EXIT, LotusError, describe

__all__ = ["main", "COMMANDS"]

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lotus.commands.train", "train a model from a YAML config (or resume a run)"),
    "select": ("lotus.commands.select", "score training samples and write a data-ticket file"),
    "prune": ("lotus.commands.prune", "prune a timm model (magnitude, Wanda, 2:4, structured) or sweep sparsity"),
    "bench": ("lotus.commands.bench", "run configs x seeds side by side and compare time-to-accuracy"),
    "report": ("lotus.commands.report", "summarise a run directory (report.md + plots)"),
    "outliers": ("lotus.commands.outliers", "per-layer outlier-feature metrics (kurtosis, max/median) of a model"),
    "quantcheck": ("lotus.commands.quantcheck", "accuracy drop of simulated int8 W8A8 quantisation"),
    "plan": ("lotus.commands.plan", "plan per-block memory optimisation and sharding under a memory budget"),
    "export": ("lotus.commands.export", "export weights for plain timm: model.safetensors + config.json + load.py"),
    "validate": ("lotus.commands.validate", "top-1/top-5, loss and per-class accuracy of a run or export on a split"),
    "predict": ("lotus.commands.predict", "top-k labels and scores of image files (CSV or JSON) from a run or export"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message for usage errors."""

    def error(self, message: str) -> None:  # noqa: D401
        # every torchrun rank parses the same arguments: rank 0 says it once
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n" if _rank()[0] == 0 else None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lotus",
        description="Lotus: cheaper vision-transformer training "
        "(data tickets + pruning + outlier monitoring + memory planning).",
    )

    parser.add_argument("--version", action="version", version=f"lotus {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # feature not installed in this build
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        # also accepted after the subcommand; SUPPRESS keeps `lotus --debug train` from being reset
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback of any error"
        )
        p.set_defaults(_run=mod.run)
    return parser


def _rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


_QUIET_RANK_GRACE_S = 2.0  # how long a silent rank waits before exiting on an error every rank raises


def report_error(e: BaseException, debug: bool = False) -> int:
    """Print the one-line report of ``e`` (and its traceback with ``debug``); return the exit code.

    Under torchrun (WORLD_SIZE > 1) a user error that every rank raises is printed by rank 0 only; the
    others exit with the same code silently. Rank-specific and internal errors are printed by each rank
    that has one, tagged with its rank.
    """
    code, line = describe(e)
    rank, world = _rank()
    if world > 1:
        shared = code == USER_EXIT and (not isinstance(e, LotusError) or e.same_on_every_rank)
        if shared and rank != 0 and not debug:
            # torchrun stops every rank once one has exited: leave rank 0 the moment it needs to say it
            time.sleep(_QUIET_RANK_GRACE_S)
            return code
        if not shared:
            head, _, rest = line.partition(": ")
            line = f"{head}: [rank {rank}] {rest}"
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the ``lotus`` command line; returns the exit code (0 ok, 1 internal error, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help/--version (0) or a usage error (2)
            return e.code if isinstance(e.code, int) else 2
        debug = bool(getattr(args, "debug", False))
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if _rank()[0] == 0:
            print("error: interrupted; files written so far are complete (checkpoints are atomic)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: every exception becomes one line
        return report_error(e, debug)


if __name__ == "__main__":
    sys.exit(main())
