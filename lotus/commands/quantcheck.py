"""Accuracy of simulated int8 W8A8 post-training quantisation vs the float model.

All Linear layers inside the transformer blocks get symmetric per-channel int8 weights and per-tensor int8
inputs whose range is calibrated on a few training batches (absmax by default; outlier features make that
range, and so the rounding error, large). Accuracy is measured on the val split.

examples:
  lotus quantcheck --config configs/digits.yaml --checkpoint runs/x/best.safetensors
  lotus quantcheck --config configs/digits.yaml --checkpoint runs/x/best.safetensors --observer percentile --json q.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from lotus.errors import LotusError
from lotus.run_files import checkpoint_file, run_config

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (its best.safetensors), or a .safetensors / state-dict file (e.g. runs/x/last.safetensors)",
    )
    p.add_argument(
        "--config", "-c", help="the YAML config the checkpoint was trained with (default: the run's config.yaml)"
    )
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument(
        "--calib-batches",
        type=int,
        default=None,
        help="training batches for activation calibration (default outliers.quant.calib_batches)",
    )
    p.add_argument(
        "--observer",
        choices=("absmax", "percentile"),
        default=None,
        help="activation range: absmax of |x| or a percentile (default outliers.quant.act_observer)",
    )
    p.add_argument("--percentile", type=float, default=None, help="percentile for --observer percentile (e.g. 99.99)")
    p.add_argument(
        "--scope",
        choices=("blocks", "all"),
        default=None,
        help="quantise Linear layers in the blocks only, or all (incl. the head)",
    )
    p.add_argument("--bits", type=int, default=None, help="weight and activation bits (default 8)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lotus.features.outliers.loading import EvalBatches, calibration_batches, load_model_and_data
    from lotus.features.outliers.quant import quantcheck

    args.checkpoint = checkpoint_file(args.checkpoint)
    args.config = args.config or run_config(args.checkpoint)
    if args.config is None:
        raise LotusError(f"--config: required; {args.checkpoint} has no config.yaml beside it (not in a run folder)")
    lm = load_model_and_data(args.config, args.checkpoint, args.set, args.device)
    qcfg = lm.cfg.outliers.quant
    changes = {}
    if args.calib_batches is not None:
        if args.calib_batches < 1:
            raise LotusError(f"--calib-batches: expected an integer >= 1, got {args.calib_batches}")
        changes["calib_batches"] = args.calib_batches
    if args.observer:
        changes["act_observer"] = args.observer
    if args.percentile is not None:
        if not 50.0 <= args.percentile <= 100.0:
            raise LotusError(f"--percentile: expected a value in [50, 100], got {args.percentile}")
        changes["percentile"] = args.percentile
    if args.scope:
        changes["scope"] = args.scope
    if args.bits is not None:
        if not 2 <= args.bits <= 8:
            raise LotusError(f"--bits: expected an integer in [2, 8], got {args.bits}")
        changes["weight_bits"] = changes["act_bits"] = args.bits
    qcfg = dataclasses.replace(qcfg, **changes)
    off = not sys.stderr.isatty()  # bars only on a terminal, like lotus train / prune
    calib = tqdm(
        calibration_batches(lm.data.train, lm.cfg, qcfg.calib_batches),
        desc="calibrate",
        leave=False,
        total=min(qcfg.calib_batches, math.ceil(len(lm.data.train) / lm.cfg.data.batch_size)),
        disable=off,
        dynamic_ncols=True,
    )
    evals = tqdm(
        EvalBatches(lm.data.val, lm.cfg.data.eval_batch_size),
        desc="eval float + int8",
        leave=False,
        total=math.ceil(len(lm.data.val) / lm.cfg.data.eval_batch_size),
        disable=off,
        dynamic_ncols=True,
    )
    try:
        res = quantcheck(lm.model, calib, evals, qcfg, device=lm.device)
    except ValueError as e:
        raise LotusError(str(e)) from None
    res = {
        "checkpoint": args.checkpoint,
        "w_bits": qcfg.weight_bits,
        "a_bits": qcfg.act_bits,
        "observer": qcfg.act_observer,
        "scope": qcfg.scope,
        **res,
    }
    print(f"float accuracy: {res['float_acc'] * 100:.2f}%")
    print(f"int8 W{qcfg.weight_bits}A{qcfg.act_bits} accuracy: {res['int8_acc'] * 100:.2f}%")
    print(
        f"drop: {res['drop_pp']:.2f} pp  (int8 logits off by {100 * res['logit_rel_err']:.2f}% relative L2; "
        f"{res['layers']} Linear layers, {qcfg.act_observer} calibration on "
        f"{qcfg.calib_batches} batches, largest input range {res['act_range_max']:.4g})"
    )
    if args.json:
        from lotus.safe_io import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=2))
        print(f"json: {args.json}")
    return 0
