"""Per-layer outlier-feature metrics of a trained model: kurtosis (He et al. 2024, Eq. 1) and max/median |x|
of the residual stream (every block input and the last block output) on a fixed batch of the val split.

Writes outliers_<checkpoint>.md/.json/.png into --out (default: the checkpoint's folder); when that folder is
a run with outlier metrics in metrics.jsonl, also outliers_history.png (values over training).

examples:
  lotus outliers --config configs/digits.yaml --checkpoint runs/x/best.safetensors
  lotus outliers --config configs/digits.yaml --checkpoint runs/x/best.safetensors --out reports/ --samples 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

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
    p.add_argument("--out", "-o", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split to probe (default val)")
    p.add_argument("--samples", type=int, default=256, help="number of probe images (default 256)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--layers", nargs="*", default=None, help="sites to measure (blocks.<i>, final); default all")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from lotus.data import batches
    from lotus.features.outliers.hooks import ResidualStreamProbe
    from lotus.features.outliers.layer_report import (
        layer_table,
        plot_history,
        plot_layers,
        read_outlier_records,
        summarize,
    )
    from lotus.features.outliers.loading import load_model_and_data
    from lotus.safe_io import atomic_write_text

    if args.samples < 1:
        raise LotusError(f"--samples: expected an integer >= 1, got {args.samples}")
    if args.batch_size < 1:
        raise LotusError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    args.checkpoint = checkpoint_file(args.checkpoint)
    args.config = args.config or run_config(args.checkpoint)
    if args.config is None:
        raise LotusError(f"--config: required; {args.checkpoint} has no config.yaml beside it (not in a run folder)")
    lm = load_model_and_data(args.config, args.checkpoint, args.set, args.device)
    dataset = lm.data.val if args.split == "val" else lm.data.train
    n = min(args.samples, len(dataset))
    g = torch.Generator().manual_seed(int(lm.cfg.train.seed) + 2024)
    idx = np.sort(torch.randperm(len(dataset), generator=g)[:n].numpy())
    try:
        probe = ResidualStreamProbe(lm.model, args.layers or None)
    except ValueError as e:
        raise LotusError(str(e).replace("outliers.layers", "--layers")) from None
    with torch.no_grad(), probe:
        for x, _, _ in tqdm(
            batches(dataset, idx, args.batch_size),
            total=math.ceil(n / args.batch_size),
            desc="probe",
            leave=False,
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        ):
            lm.model(x.to(lm.device))
    layers = probe.compute()
    summary = summarize(layers)

    out_dir = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]

    title = f"{stem} ({lm.cfg.model.name}, block={lm.cfg.model.block}, {n} {args.split} images)"
    table = layer_table(layers)
    md = "\n".join(
        [f"# Outlier features: {title}", "", table, "", " ".join(f"{k}={v:.4g}" for k, v in summary.items()), ""]
    )
    paths = {
        "markdown": os.path.join(out_dir, f"outliers_{stem}.md"),
        "json": os.path.join(out_dir, f"outliers_{stem}.json"),
    }
    atomic_write_text(paths["markdown"], md)
    atomic_write_text(
        paths["json"],
        json.dumps(
            {
                "checkpoint": os.path.abspath(args.checkpoint),
                "split": args.split,
                "samples": n,
                **summary,
                "layers": layers,
            },
            indent=2,
        ),
    )
    paths["plot"] = plot_layers(layers, os.path.join(out_dir, f"outliers_{stem}.png"), title=title)
    metrics = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "metrics.jsonl")
    if os.path.isfile(metrics):
        records = read_outlier_records(metrics)
        if records:
            paths["history"] = plot_history(
                records, os.path.join(out_dir, "outliers_history.png"), title=os.path.basename(os.path.dirname(metrics))
            )
    print(title)
    print(table)
    print(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
