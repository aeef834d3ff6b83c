"""Train a ViT from a YAML config, or resume a run.

examples:
  lotus train --config configs/digits.yaml
  lotus train --config configs/digits.yaml --set optim.lr=1e-3 --set train.epochs=5 --out runs/try1
  lotus train --resume runs/try1                 # continue from runs/try1/state.pt
  lotus train --resume runs/try1 --set train.epochs=20   # continue and train longer
  lotus train --config configs/digits.yaml --out runs/try1 --force   # start runs/try1 over
  lotus train --config configs/digits.yaml --print-config            # every key: default and meaning
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lotus.config import config_to_dict, load_config
from lotus.errors import LotusError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint "
        "(model, optimiser, schedule, RNG, epoch); uses RUN_DIR/config.yaml",
    )
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable; VALUE is YAML)",
    )
    p.add_argument("--out", "-o", metavar="DIR", help="run directory (default: output.dir or runs/<name>-<time>)")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in a --out that holds a run (deletes that run's files; nothing else in the folder)",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar or per-epoch lines (the final result line is still printed)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the full resolved config (every key, "
        "defaults filled in) as YAML, each key's meaning as a comment, and exit without training "
        "(the same text as docs/configuration.md)",
    )


def run(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.resume):
        raise LotusError("train: pass exactly one of --config FILE or --resume RUN_DIR")
    if args.print_config:
        path = os.path.join(args.resume, "config.yaml") if args.resume else args.config
        from lotus.config_docs import commented_yaml  # each key's meaning from its dataclass docstring

        print(commented_yaml(config_to_dict(load_config(path, args.set))), end="")
        return 0
    if args.resume:
        if not os.path.isdir(args.resume):
            raise LotusError(f"--resume: {args.resume} is not a run directory")
        if args.out or args.force:
            flag = "--out" if args.out else "--force"
            raise LotusError(f"{flag}: cannot be combined with --resume (the run continues in its own directory)")
        if not os.path.isfile(os.path.join(args.resume, "config.yaml")):
            raise LotusError(f"--resume: {args.resume} has no config.yaml (not a Lotus run directory)")
        cfg = load_config(os.path.join(args.resume, "config.yaml"), args.set)
        from lotus.training import Trainer  # torch and timm: imported once the config is valid

        trainer = Trainer(cfg, run_dir=args.resume, resume=True, quiet=args.quiet, overrides=args.set)
    else:
        cfg = load_config(args.config, args.set)
        from lotus.training import Trainer  # torch and timm: imported once the config is valid

        trainer = Trainer(cfg, run_dir=args.out, quiet=args.quiet, force=args.force, overrides=args.set)
    summary = trainer.fit()
    if trainer.dist.is_main:  # the result, also with --quiet (which hides progress only)
        print(
            json.dumps(
                {k: summary[k] for k in ("run_dir", "epochs", "steps", "wall_s")}
                | {
                    k: summary.get(k)
                    for k in ("final_val_acc", "best_val_acc", "test_acc")
                    if k != "test_acc" or summary.get(k) is not None
                }
            )
        )
    if trainer.dist.world_size > 1:
        # all ranks meet, then tear gloo/nccl down; skip interpreter teardown, where gloo's threads can still
        # abort a rank ("terminate called without an active exception") after all work is saved
        from lotus.parallel.runtime import destroy

        destroy()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
