"""Instant Soup Pruning (ISSP) vs plain one-shot magnitude pruning at the same sparsity, on a digits-trained ViT.

Both start from the same dense model (trained with lotus on configs/digits_preln.yaml unless --checkpoint is given):
  one-shot: magnitude-prune the dense weights layer-wise.
  ISSP:     K weak copies, each fine-tuned for --weak-epochs on a --fraction of the training data (own seed),
            are magnitude-pruned; their masks are merged by vote and applied to the dense weights.
Reported per sparsity: val accuracy right after pruning and after the same masked fine-tune (--ft-epochs),
mean over --seeds fine-tune seeds, plus ISSP's extra cost in epochs. Writes pruning_issp.{json,md}.

  python benchmarks/pruning_issp.py              # full: sparsities 0.5-0.9, K=4, 10% data (~10-20 min, 2 cores)
  python benchmarks/pruning_issp.py --quick      # micro ViT, one sparsity, K=2 (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pruning_common import QUICK_OVERRIDES, accuracy, add_folder_args, finetune, folder, trained_model  # noqa: E402

from benchmarks._common import write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits_preln.yaml")
    p.add_argument("--set", action="append", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--checkpoint", help="skip training: weights of the config's model")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--k", type=int, default=4, help="weak copies")
    p.add_argument("--fraction", type=float, default=0.1, help="data fraction each weak copy trains on")
    p.add_argument("--weak-epochs", type=float, default=1.0, help="epochs over its fraction per weak copy")
    p.add_argument("--weak-lr", type=float, default=1e-3)
    p.add_argument("--merge", choices=("vote", "union", "intersection"), default="vote")
    p.add_argument("--ft-epochs", type=float, default=2.0, help="masked fine-tune after pruning (both methods)")
    p.add_argument("--ft-lr", type=float, default=5e-4)
    add_folder_args(p, "pruning_issp", seeds=[0, 1])  # fine-tune seeds averaged
    args = p.parse_args()
    if args.quick:
        args.sparsities, args.k, args.seeds, args.ft_epochs = [0.8], 2, args.seeds[:1], 1.0
    out = folder(args)
    overrides = (QUICK_OVERRIDES if args.quick and not args.checkpoint else []) + args.set

    import pruning
    from pruning.report import markdown_table
    from pruning.soup import instant_soup_prune_

    dense, cfg, bundle, info = trained_model(args.config, overrides, args.checkpoint, out)
    dense_acc = accuracy(dense, bundle.val)
    rows = []
    for s in args.sparsities:
        for method in ("one-shot", "issp"):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if method == "one-shot":
                rep = pruning.prune_(model, pruning.MagnitudeConfig(sparsity=s))
                extra_epochs = 0.0
            else:

                def weak_train(copy_model, seed):
                    finetune(
                        copy_model,
                        bundle.train,
                        args.weak_epochs,
                        args.weak_lr,
                        seed=1000 + seed,
                        fraction=args.fraction,
                    )

                rep = instant_soup_prune_(model, weak_train, s, k=args.k, merge=args.merge, seeds=list(range(args.k)))
                extra_epochs = args.k * args.weak_epochs * args.fraction
            prune_s = time.perf_counter() - t0
            acc0 = accuracy(model, bundle.val)
            accs = []
            for seed in args.seeds:
                ft = copy.deepcopy(model)
                finetune(ft, bundle.train, args.ft_epochs, args.ft_lr, seed=seed)
                accs.append(accuracy(ft, bundle.val))
            rows.append(
                {
                    "sparsity": s,
                    "method": method,
                    "achieved": rep["total"]["sparsity"],
                    "acc_pruned": acc0,
                    "acc_finetuned": statistics.fmean(accs),
                    "acc_ft_min": min(accs),
                    "acc_ft_max": max(accs),
                    "extra_epochs": extra_epochs,
                    "prune_s": prune_s,
                    "mask_agreement": rep.get("agreement"),
                }
            )
            print(rows[-1], flush=True)
    md = "\n".join(
        [
            f"# ISSP vs one-shot magnitude: {cfg.model.name} on digits ({'quick' if args.quick else 'full'} run)",
            "",
            f"dense val acc {dense_acc:.4f}; ISSP: K={args.k} weak copies, {args.fraction:.0%} of the data for "
            f"{args.weak_epochs:g} epoch(s) each, merge={args.merge}; fine-tune {args.ft_epochs:g} epochs, "
            f"mean over {len(args.seeds)} seed(s); extra_epochs = ISSP's weak-training cost in full-data epochs",
            "",
            markdown_table(
                rows,
                [
                    "sparsity",
                    "method",
                    "achieved",
                    "acc_pruned",
                    "acc_finetuned",
                    "acc_ft_min",
                    "acc_ft_max",
                    "extra_epochs",
                    "mask_agreement",
                ],
            ),
        ]
    )
    result = {"model": cfg.model.name, "info": info, "dense_acc": dense_acc, "args": vars(args), "rows": rows}
    write_results(os.path.join(out, "pruning_issp"), result, md, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
