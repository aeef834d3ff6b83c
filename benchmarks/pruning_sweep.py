"""Essential sparsity of a digits-trained ViT: one-shot magnitude pruning 0-90% without retraining.

Trains the model with lotus (configs/digits_preln.yaml, lotus_vit_tiny) unless --checkpoint is given, then sweeps
layer-wise and global magnitude sparsity on the validation split and finds the knee: the largest sparsity with
every sparsity up to it within --tolerance of dense accuracy. Writes sweep_<scope>.{json,md,png} and
pruning_sweep.{json,md} under the folder --out (default $OUT/pruning_sweep or bench_out/pruning_sweep).

  python benchmarks/pruning_sweep.py                    # full: trains 30 epochs (~5-15 min on 2 CPU cores)
  python benchmarks/pruning_sweep.py --quick            # micro ViT, 4 epochs, step 0.3 (~1 min)
  python benchmarks/pruning_sweep.py --config configs/digits_preln.yaml --checkpoint runs/x/best.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pruning_common import QUICK_OVERRIDES, accuracy, add_folder_args, folder, trained_model  # noqa: E402

from benchmarks._common import write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits_preln.yaml")
    p.add_argument("--set", action="append", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--checkpoint", help="skip training: weights of the config's model")
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--max-sparsity", type=float, default=0.9)
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed accuracy drop (0.01 = 1 point)")
    add_folder_args(p, "pruning_sweep")
    args = p.parse_args()
    out = folder(args)
    overrides = (QUICK_OVERRIDES if args.quick and not args.checkpoint else []) + args.set
    step = 0.3 if args.quick else args.step

    import torch

    from pruning.report import markdown_table
    from pruning.sweep import essential_sparsity_sweep, save_sweep

    model, cfg, bundle, info = trained_model(args.config, overrides, args.checkpoint, out)
    results, rows = {}, []
    for scope in ("layer", "global"):
        t0 = time.perf_counter()
        res = essential_sparsity_sweep(
            model,
            lambda m: accuracy(m, bundle.val),
            step=step,
            max_sparsity=args.max_sparsity,
            scope=scope,
            tolerance=args.tolerance,
        )
        res["seconds"] = time.perf_counter() - t0
        save_sweep(
            res, out, title=f"Essential sparsity, {cfg.model.name} on digits ({scope} magnitude)", stem=f"sweep_{scope}"
        )
        results[scope] = res
        for pt in res["points"]:
            rows.append({"scope": scope, "sparsity": pt["sparsity"], "val_acc": pt["metric"], "delta": pt["delta"]})
    summary = [
        {
            "scope": s,
            "dense_acc": r["dense"],
            "knee": r["knee"],
            "knee_acc": r["knee_metric"],
            "largest_within_tol": r["largest_within_tolerance"],
        }
        for s, r in results.items()
    ]
    md = "\n".join(
        [
            f"# Essential sparsity: {cfg.model.name} trained on digits ({'quick' if args.quick else 'full'} run)",
            "",
            f"one-shot magnitude pruning of every Linear except the head (patch embedding dense), no retraining; "
            f"tolerance {args.tolerance:g} absolute accuracy; torch {torch.__version__}",
            "",
            markdown_table(summary),
            "",
            markdown_table(rows),
        ]
    )
    result = {
        "model": cfg.model.name,
        "info": info,
        "tolerance": args.tolerance,
        "step": step,
        "quick": args.quick,
        "summary": summary,
        "sweeps": results,
    }
    write_results(os.path.join(out, "pruning_sweep"), result, md, quick=args.quick)
    print(f"sweep_*.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
