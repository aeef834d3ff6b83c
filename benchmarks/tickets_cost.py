"""Scoring cost of data_tickets scorers, side by side with one evaluation pass (and GraNd vmap vs a loop).

Two targets (issue 3):
  * a single-pass scorer (loss, entropy, ...) over the whole train split takes <= 1.2x the time of one
    evaluation pass over it (the lotus ``Trainer.evaluate`` loop: batched forward + loss + argmax);
  * ``grand`` via ``torch.func`` vmap is >= 5x faster than a per-sample loop computing the same norms
    (shown next to plain ``vmap(grad)``, which materialises a full gradient per sample).
All timings of one run are interleaved (A B A B ...) and the median of ``--repeats`` is reported, so load
from other processes hits both sides alike. Models are freshly initialised: cost does not depend on weights.

  python benchmarks/tickets_cost.py                 # full run (digits train split, lotus_vit_tiny, 5 repeats)
  python benchmarks/tickets_cost.py --quick         # smoke run (~1 min on a quiet machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402
from data_tickets import score  # noqa: E402

SINGLE_PASS = ["loss", "entropy", "margin", "el2n", "cls_attention", "prototype"]


class _Head(Dataset):
    def __init__(self, ds: Dataset, n: int):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x, y, _ = self.ds[i]
        return x, y, i

    def get_batch(self, index: torch.Tensor):
        return self.ds.get_batch(index)


def eval_pass(model: torch.nn.Module, dataset: Dataset, batch_size: int) -> float:
    """The lotus evaluation loop (``lotus.evaluation.evaluate``, as the Trainer runs it) over ``dataset``."""
    from lotus.evaluation import evaluate

    return evaluate(model, dataset, batch_size=batch_size)["val_loss"]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(model_name: str, cfg_path: str, overrides: list[str]):
    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.models import create_model, resolve_img_size

    cfg = load_config(cfg_path, [*overrides, f"model.name={model_name}"])
    data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans)
    torch.manual_seed(0)
    model = create_model(cfg.model, data.num_classes, data.in_chans, data.img_size).eval()
    return cfg, data, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits_preln.yaml")
    p.add_argument("--set", action="append", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--model", default="lotus_vit_tiny", help="model for the single-pass comparison")
    p.add_argument("--grand-models", nargs="+", default=["lotus_vit_micro", "lotus_vit_tiny"])
    p.add_argument("--grand-samples", type=int, default=256, help="samples for the vmap vs loop comparison")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--grand-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scorers", nargs="+", default=SINGLE_PASS, help="single-pass scorers to time")
    add_harness_args(
        p, "tickets_cost", quick="smoke run: 400 train images, loss/entropy, micro ViT GraNd on 32 samples, 2 repeats"
    )
    args = p.parse_args()
    if args.quick:
        args.repeats, args.grand_samples, args.grand_models = 2, 32, ["lotus_vit_micro"]
        args.scorers, args.set = ["loss", "entropy"], ["data.limit_train=400", *args.set]
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*batching rule.*")

    cfg, data, model = build(args.model, args.config, args.set)
    train = data.train
    n = len(train)
    rows, results = (
        [],
        {
            "config": args.config,
            "overrides": args.set,
            "model": args.model,
            "train_size": n,
            "threads": args.threads,
            "repeats": args.repeats,
            "quick": args.quick,
            "torch": torch.__version__,
            "single_pass": {},
            "grand": [],
        },
    )
    # ---- single-pass scorers vs one evaluation pass, interleaved
    eval_pass(model, train, args.batch_size)  # warm-up
    for name in args.scorers:
        score(model, train, name, batch_size=args.batch_size, progress=False)  # warm-up
        te, ts = [], []
        for _ in range(args.repeats):
            te.append(timed(lambda: eval_pass(model, train, args.batch_size)))
            ts.append(timed(lambda: score(model, train, name, batch_size=args.batch_size, progress=False)))
        e, s = statistics.median(te), statistics.median(ts)
        results["single_pass"][name] = {"eval_s": e, "score_s": s, "ratio": s / e}
        rows.append(f"| {name} | {n} | {e:.3f} | {s:.3f} | {s / e:.2f}x | {'yes' if s / e <= 1.2 else 'no'} |")
    print(
        f"\n### Single-pass scorers vs one evaluation pass ({args.model}, {n} train images, "
        f"{args.threads} threads, median of {args.repeats})\n"
    )
    print("| scorer | images | eval pass (s) | scorer (s) | ratio | <= 1.2x |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nprototype includes k-means (scikit-learn); cls_attention recomputes q k^T of the last block.")

    # ---- grand: vmap vs per-sample loop, same samples, same parameters
    grows = []
    for mname in args.grand_models:
        _, gdata, gmodel = build(mname, args.config, args.set)
        sub = _Head(gdata.train, args.grand_samples)
        for params in ("all", "head"):
            kw = dict(params=params, batch_size=args.grand_batch_size, progress=False)
            for m in ("vmap", "vmap_plain", "loop"):  # warm-up every path
                score(gmodel, _Head(sub, 8), "grand", method=m, **kw)
            tv, tp, tl, diff = [], [], [], 0.0
            for _ in range(max(1, args.repeats // 2)):
                out = {}
                tv.append(timed(lambda: out.__setitem__("v", score(gmodel, sub, "grand", **kw))))
                tl.append(timed(lambda: out.__setitem__("l", score(gmodel, sub, "grand", method="loop", **kw))))
                tp.append(timed(lambda: out.__setitem__("p", score(gmodel, sub, "grand", method="vmap_plain", **kw))))
                diff = max(diff, float(((out["v"] - out["l"]).abs() / out["l"].abs().clamp_min(1e-12)).max()))
            v, pl, loop = statistics.median(tv), statistics.median(tp), statistics.median(tl)
            results["grand"].append(
                {
                    "model": mname,
                    "params": params,
                    "samples": len(sub),
                    "vmap_s": v,
                    "vmap_plain_s": pl,
                    "loop_s": loop,
                    "speedup": loop / v,
                    "speedup_plain": loop / pl,
                    "max_rel_diff": diff,
                }
            )
            grows.append(
                f"| {mname} | {params} | {len(sub)} | {loop:.3f} | {pl:.3f} ({loop / pl:.1f}x) | {v:.3f} | "
                f"{loop / v:.1f}x | {'yes' if loop / v >= 5 else 'no'} | {diff:.1e} |"
            )
    print(f"\n### GraNd per-sample gradient norms: torch.func vmap vs per-sample loop ({args.threads} threads)\n")
    print("| model | params | samples | loop (s) | plain vmap (s) | vmap (s) | speedup | >= 5x | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(grows))
    md = "\n".join(
        [
            "| scorer | images | eval pass (s) | scorer (s) | ratio | <= 1.2x |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "| model | params | samples | loop (s) | plain vmap (s) | vmap (s) | speedup | >= 5x | max rel. diff |",
            "|---|---|---|---|---|---|---|---|---|",
            *grows,
        ]
    )
    write_results(out_path(args), results, md, quick=args.quick, echo=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
