"""Data-ticket quality on digits: train on 30% / 50% subsets chosen by each scorer x policy vs random vs 100%.

Every run uses the same config, model and number of epochs (so subsets train fewer steps); only the ticket
file (``tickets.file``) differs. Per seed, the proxy models are trained once on the lotus loop
(``lotus.tickets.make_proxy``) and every scorer reads them (el2n averages ``--el2n-repeats`` proxies,
forgetting counts events during the first proxy's training). Accuracy is the final validation accuracy,
mean +- std over seeds; the "vs random" column is the mean difference to the random subset of the same size.

  python benchmarks/tickets_quality.py            # full run: 8 scorers x 4 policies x {30%, 50%} x 3 seeds,
                                                  # lotus_vit_micro (patch 4), 30 epochs: ~200 runs
  python benchmarks/tickets_quality.py --quick    # smoke run: 600 images, 5 epochs, 2 scorers x 2 policies, 2 seeds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402
from data_tickets import TicketFile, score, select  # noqa: E402
from lotus.bench_stats import seed_stats  # noqa: E402

SCORERS = ["el2n", "loss", "grand", "forgetting", "entropy", "margin", "prototype", "cls_attention"]
POLICIES = ["top", "ccs", "moderate", "bottom"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits_preln.yaml")
    p.add_argument("--set", action="append", default=[], help="config overrides KEY=VALUE (all runs)")
    p.add_argument("--scorers", nargs="+", default=SCORERS)
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default: config)")
    p.add_argument(
        "--model",
        default="lotus_vit_micro",
        help="model of every run and proxy (default lotus_vit_micro; the config's lotus_vit_tiny at "
        "patch 2 is ~10x slower per run)",
    )
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--proxy-epochs", type=int, default=3)
    p.add_argument("--el2n-repeats", type=int, default=3)
    p.add_argument("--class-balanced", action="store_true", help="select class-balanced subsets")
    p.add_argument("--threads", type=int, default=2)
    add_harness_args(
        p, "tickets_quality", seeds=[0, 1, 2], quick="smoke run: 600 images, 5 epochs, el2n+loss x top+ccs, 2 seeds"
    )
    args = p.parse_args()
    user_set = list(args.set)
    args.set = [f"model.name={args.model}", f"model.patch_size={args.patch_size}", *args.set]
    if args.quick:
        args.set = ["data.limit_train=600", "train.warmup_epochs=0.5", *args.set]
        args.epochs = args.epochs or 5
        args.scorers, args.policies, args.seeds = ["el2n", "loss"], ["top", "ccs"], [0, 1]
        args.proxy_epochs, args.el2n_repeats = 2, 2
    torch.set_num_threads(args.threads)

    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.features.tickets.proxy import make_proxy
    from lotus.models import resolve_img_size
    from lotus.training import Trainer

    base = [*args.set, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    cfg = load_config(args.config, base)
    data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans)
    train, labels, n = data.train, data.labels_train, len(data.train)
    tmp = Path(tempfile.mkdtemp(prefix="tickets_quality_"))
    runs: list[dict] = []
    scoring_s: dict[str, list[float]] = {}

    def fit(ticket: Path | None, seed: int) -> dict:
        over = [*base, f"train.seed={seed}"] + ([f"tickets.file={ticket}"] if ticket else [])
        s = Trainer(load_config(args.config, over), write=False, quiet=True).fit()
        return {"acc": s["final_val_acc"], "wall_s": s["wall_s"], "samples_seen": s["samples_seen"]}

    t_start = time.perf_counter()
    for seed in args.seeds:
        r = fit(None, seed)
        runs.append({"method": "full", "fraction": 1.0, "seed": seed, **r})
        print(f"seed {seed} full: acc {r['acc']:.4f}", flush=True)
        # proxies: trained once per seed, shared by all scorers
        proxy = make_proxy(cfg, epochs=args.proxy_epochs)
        trained: dict[int, torch.nn.Module] = {}
        pseed = 1000 * (seed + 1)

        def cached(s: int, on_epoch_end=None):
            if s not in trained or on_epoch_end is not None:
                trained[s] = proxy(s, on_epoch_end)
            return trained[s]

        scores: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        if "forgetting" in args.scorers:
            scores["forgetting"] = score(None, train, "forgetting", proxy=cached, seed=pseed, progress=False)
        cached(pseed)
        proxy_s = time.perf_counter() - t0
        for name in args.scorers:
            t1 = time.perf_counter()
            if name == "el2n":
                scores[name] = score(
                    None, train, "el2n", proxy=cached, seed=pseed, repeats=args.el2n_repeats, progress=False
                )
            elif name != "forgetting":
                scores[name] = score(trained[pseed], train, name, progress=False)
            scoring_s.setdefault(name, []).append(time.perf_counter() - t1 + proxy_s)
        for frac in args.fractions:
            picks = {
                ("random", "-"): select(
                    np.zeros(n), "random", fraction=frac, labels=labels, class_balanced=args.class_balanced, seed=seed
                )
            }
            for name in args.scorers:
                for pol in args.policies:
                    picks[(name, pol)] = select(
                        scores[name], pol, fraction=frac, labels=labels, class_balanced=args.class_balanced, seed=seed
                    )
            for (name, pol), idx in picks.items():
                path = tmp / f"{name}-{pol}-{frac}-{seed}.npz"
                TicketFile.create(
                    idx,
                    dataset=train,
                    labels=labels,
                    scorer=None if name == "random" else name,
                    policy="random" if name == "random" else pol,
                    fraction=frac,
                    seed=seed,
                ).save(path)
                r = fit(path, seed)
                method = "random" if name == "random" else f"{name}/{pol}"
                runs.append({"method": method, "fraction": frac, "seed": seed, **r})
                print(f"seed {seed} {method} {frac:.0%}: acc {r['acc']:.4f}", flush=True)

    # ---- aggregate
    table: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        table.setdefault((r["method"], r["fraction"]), []).append(r["acc"])
    rows, agg = [], []
    full_m, full_s = seed_stats(table[("full", 1.0)])
    for frac in args.fractions:
        rnd_m, rnd_s = seed_stats(table[("random", frac)])
        ordered = sorted(((m, f) for (m, f) in table if f == frac), key=lambda k: -statistics.fmean(table[k]))
        for key in ordered:
            m, s = seed_stats(table[key])
            d = m - rnd_m
            verdict = "-" if key[0] == "random" else ("yes" if d > 0 else "no")
            agg.append(
                {
                    "method": key[0],
                    "fraction": frac,
                    "mean_acc": m,
                    "std_acc": s,
                    "vs_random": d,
                    "seeds": len(table[key]),
                }
            )
            rows.append(f"| {frac:.0%} | {key[0]} | {m * 100:.2f} +- {s * 100:.2f} | {d * 100:+.2f} | {verdict} |")
    header = (
        f"### Digits data tickets: final val accuracy (%), mean +- std over seeds {args.seeds}, "
        f"{cfg.train.epochs} epochs, {cfg.model.name}{' (' + ', '.join(user_set) + ')' if user_set else ''}, "
        f"full data = {full_m * 100:.2f} +- {full_s * 100:.2f}\n\n"
        "| subset | method (scorer/policy) | val acc | vs random (pp) | beats random |\n|---|---|---|---|---|"
    )
    cost = "\n".join(f"| {k} | {statistics.fmean(v):.1f} |" for k, v in scoring_s.items())
    text = (
        header + "\n" + "\n".join(rows) + "\n\n### Scoring cost per seed (proxy training + scoring, s)\n\n"
        "| scorer | seconds |\n|---|---|\n" + cost + "\n"
    )
    write_results(
        out_path(args),
        {
            "config": args.config,
            "overrides": base,
            "model": cfg.model.name,
            "epochs": cfg.train.epochs,
            "train_size": n,
            "seeds": args.seeds,
            "class_balanced": args.class_balanced,
            "proxy_epochs": args.proxy_epochs,
            "el2n_repeats": args.el2n_repeats,
            "runs": runs,
            "summary": agg,
            "scoring_s": scoring_s,
            "total_s": time.perf_counter() - t_start,
        },
        text,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
