"""The ``lotus`` command line: one subcommand per module in ``lotus.commands``.

User errors (bad config, missing files, bad values) print one ``error: ...`` line and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lotus import __version__
from lotus.errors import LotusError

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
}


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message for usage errors."""

    def error(self, message: str) -> None:  # noqa: D401
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lotus", description="Lotus: cheaper vision-transformer training "
                     "(data tickets + pruning + outlier monitoring + memory planning).")

    parser.add_argument("--version", action="version", version=f"lotus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # feature not installed in this build
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LotusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; files written so far are complete (checkpoints are atomic)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
