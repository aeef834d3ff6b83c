"""Class balance in data tickets: ccs tickets (el2n, forgetting scores) with class balance on vs off vs random.

Two real datasets: scikit-learn's digits (1437 train images, 8x8 upsampled to 16 px) and a stratified
5000-image subset of Fashion-MNIST (16 px; the idx files come from ``--fashion-root`` or are unpacked from
the Debian ``dataset-fashion-mnist`` package in the apt cache). Per dataset and seed one set of proxy
trainings on the lotus loop is shared by both scorers (el2n averages ``--el2n-repeats`` proxies, forgetting
counts events during the first one); then every ticket (30 % and 50 %: random, el2n/ccs, forgetting/ccs, each
class-balanced and not) is trained with the same config, model and epochs, plus the full set once. Seeds are
interleaved (seed -> dataset -> fraction -> tickets) in one invocation with fixed threads. Per ticket the
class counts are recorded (min/max class share of the ticket); per method the table gives mean +- std
accuracy over seeds and the per-seed difference balanced - unbalanced (median, range).

  python benchmarks/tickets_balance.py                  # 5 seeds, both datasets (~30 min on 1 thread)
  python benchmarks/tickets_balance.py --quick          # smoke run: 2 seeds, 3 epochs, small subsets
"""

from __future__ import annotations

import argparse
import glob
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import add_harness_args, args_dict, out_path, write_results  # noqa: E402
from data_tickets import TicketFile, score, select  # noqa: E402
from lotus.bench_stats import seed_stats  # noqa: E402

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def fashion_root(given: str | None, tmp: Path) -> str:
    """A folder with FashionMNIST/raw/<idx files> (torchvision's layout), unpacked from the apt cache if needed."""
    if given:
        return given
    debs = sorted(glob.glob("/var/cache/apt/archives/dataset-fashion-mnist_*.deb"))
    if not debs:
        raise SystemExit("no --fashion-root and no dataset-fashion-mnist .deb in /var/cache/apt/archives")
    subprocess.run(["dpkg-deb", "-x", debs[-1], str(tmp / "deb")], check=True)
    raw = tmp / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_FILES:
        src = next(iter(glob.glob(str(tmp / "deb" / "**" / f"{name}.gz"), recursive=True)))
        with gzip.open(src, "rb") as f, open(raw / name, "wb") as g:
            shutil.copyfileobj(f, g)
    return str(tmp / "root")


def class_shares(labels: np.ndarray, idx: np.ndarray, num_classes: int) -> dict:
    counts = np.bincount(labels[idx], minlength=num_classes)
    share = counts / idx.size
    return {"counts": counts.tolist(), "min_share": float(share.min()), "max_share": float(share.max())}


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 100:+.2f} [{min(xs) * 100:+.2f}, {max(xs) * 100:+.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"], choices=["digits", "fashion_mnist"])
    p.add_argument("--fashion-root", default=None, help="folder holding FashionMNIST/raw/ idx files")
    p.add_argument("--fashion-train", type=int, default=5000, help="stratified Fashion-MNIST train subset")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--model", default="lotus_vit_micro")
    p.add_argument("--proxy-epochs", type=int, default=3)
    p.add_argument("--el2n-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    add_harness_args(
        p, "tickets_balance", seeds=[0, 1, 2, 3, 4], quick="smoke run: 2 seeds, 3 epochs, 600/1000 train images"
    )
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.fashion_train, args.el2n_repeats, args.proxy_epochs = [0, 1], 3, 1000, 1, 2
    torch.set_num_threads(args.threads)

    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.features.tickets.proxy import make_proxy
    from lotus.models import resolve_img_size
    from lotus.training import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="tickets_balance_"))
    common = [
        f"model.name={args.model}",
        "model.patch_size=4",
        "model.img_size=16",
        f"train.epochs={args.epochs}",
        f"train.eval_every={args.epochs}",
        f"train.threads={args.threads}",
    ]
    overrides = {"digits": common + (["data.limit_train=600"] if args.quick else [])}
    if "fashion_mnist" in args.datasets:
        overrides["fashion_mnist"] = common + [
            "data.name=fashion_mnist",
            f"data.root={fashion_root(args.fashion_root, tmp)}",
            f"data.limit_train={args.fashion_train}",
        ]
    setups = {}
    for ds in args.datasets:
        cfg = load_config("configs/digits.yaml", overrides[ds])
        data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans)
        setups[ds] = (cfg, data)
        print(
            f"{ds}: {len(data.train)} train, {len(data.val)} val, classes {np.bincount(data.labels_train).tolist()}",
            flush=True,
        )

    runs: list[dict] = []
    out = out_path(args)
    t_start = time.perf_counter()

    def fit(ds: str, ticket: Path | None, seed: int) -> dict:
        over = [*overrides[ds], f"train.seed={seed}"] + ([f"tickets.file={ticket}"] if ticket else [])
        s = Trainer(load_config("configs/digits.yaml", over), write=False, quiet=True).fit()
        return {"acc": s["final_val_acc"], "wall_s": s["wall_s"]}

    for seed in args.seeds:
        for ds in args.datasets:
            cfg, data = setups[ds]
            train, labels, n, nc = data.train, data.labels_train, len(data.train), data.num_classes
            r = fit(ds, None, seed)
            runs.append({"dataset": ds, "method": "full", "balanced": None, "fraction": 1.0, "seed": seed, **r})
            print(f"seed {seed} {ds} full: acc {r['acc']:.4f}", flush=True)
            proxy, trained, pseed = make_proxy(cfg, epochs=args.proxy_epochs), {}, 1000 * (seed + 1)

            def cached(s: int, on_epoch_end=None):
                if s not in trained or on_epoch_end is not None:
                    trained[s] = proxy(s, on_epoch_end)
                return trained[s]

            t0 = time.perf_counter()
            scores = {
                "forgetting": score(None, train, "forgetting", proxy=cached, seed=pseed, progress=False),
                "el2n": score(None, train, "el2n", proxy=cached, seed=pseed, repeats=args.el2n_repeats, progress=False),
            }
            scoring_s = time.perf_counter() - t0
            for frac in args.fractions:
                for bal in (True, False):
                    picks = {
                        "random": select(
                            np.zeros(n), "random", fraction=frac, labels=labels, class_balanced=bal, seed=seed
                        )
                    }
                    for name in ("el2n", "forgetting"):
                        picks[f"{name}/ccs"] = select(
                            scores[name], "ccs", fraction=frac, labels=labels, class_balanced=bal, seed=seed
                        )
                    for method, idx in picks.items():
                        path = tmp / f"{ds}-{method.replace('/', '-')}-{frac}-{bal}-{seed}.npz"
                        TicketFile.create(
                            idx,
                            dataset=train,
                            labels=labels,
                            scorer=method.split("/")[0],
                            policy=method.split("/")[-1],
                            fraction=frac,
                            seed=seed,
                            class_balanced=bal,
                        ).save(path)
                        r = fit(ds, path, seed)
                        sh = class_shares(labels, idx, nc)
                        runs.append(
                            {
                                "dataset": ds,
                                "method": method,
                                "balanced": bal,
                                "fraction": frac,
                                "seed": seed,
                                "scoring_s": scoring_s,
                                **r,
                                **sh,
                            }
                        )
                        print(
                            f"seed {seed} {ds} {method} {frac:.0%} balanced={bal}: acc {r['acc']:.4f} "
                            f"class share {sh['min_share']:.3f}..{sh['max_share']:.3f}",
                            flush=True,
                        )
        write(args, setups, runs, out, time.perf_counter() - t_start)  # after every seed: partial results survive


def write(args: argparse.Namespace, setups: dict, runs: list[dict], out: str, total_s: float) -> None:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"### Class-balanced data tickets: final val accuracy (%), mean +- std over seeds {seeds}, "
        f"{args.epochs} epochs, {args.model} (patch 4, 16 px), proxies {args.proxy_epochs} epochs "
        f"(el2n: {args.el2n_repeats} proxies), {args.threads} thread(s)\n",
        "`bal - unbal`: per-seed accuracy difference class-balanced minus not (median [min, max]); "
        "`vs random`: per-seed difference to the class-balanced random ticket of the same size (median "
        "[min, max]); class share: smallest / largest class's share of the ticket (mean over seeds).\n",
    ]
    summary = []
    for ds in args.datasets:
        cfg, data = setups[ds]
        full = [r["acc"] for r in runs if r["dataset"] == ds and r["method"] == "full"]
        if not full:
            continue
        fm, fs = seed_stats(full)
        share = 1.0 / data.num_classes
        lines += [
            f"\n**{ds}** ({len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
            f"uniform share {share:.3f}; full data {fm * 100:.2f} +- {fs * 100:.2f})\n",
            "| subset | ticket | class balance | val acc | min / max class share | bal - unbal (pp) | vs random (pp) |",
            "|---|---|---|---|---|---|---|",
        ]
        for frac in args.fractions:

            def get(method: str, bal: bool) -> dict[int, dict]:
                return {
                    r["seed"]: r
                    for r in runs
                    if r["dataset"] == ds and r["method"] == method and r["fraction"] == frac and r["balanced"] is bal
                }

            rnd = get("random", True)
            for method in ("random", "el2n/ccs", "forgetting/ccs"):
                on, off = get(method, True), get(method, False)
                for bal, rs in ((True, on), (False, off)):
                    if not rs:
                        continue
                    m, s = seed_stats([r["acc"] for r in rs.values()])
                    mn = statistics.fmean(r["min_share"] for r in rs.values())
                    mx = statistics.fmean(r["max_share"] for r in rs.values())
                    common = sorted(set(on) & set(off))
                    diff = [on[k]["acc"] - off[k]["acc"] for k in common]
                    vs = [rs[k]["acc"] - rnd[k]["acc"] for k in sorted(set(rs) & set(rnd))]
                    d_txt = median_range(diff) if bal and diff else ""
                    v_txt = median_range(vs) if vs and not (method == "random" and bal) else "-"
                    lines.append(
                        f"| {frac:.0%} | {method} | {'on' if bal else 'off'} | {m * 100:.2f} +- {s * 100:.2f} "
                        f"| {mn:.3f} / {mx:.3f} | {d_txt} | {v_txt} |"
                    )
                    summary.append(
                        {
                            "dataset": ds,
                            "fraction": frac,
                            "method": method,
                            "balanced": bal,
                            "mean_acc": m,
                            "std_acc": s,
                            "min_share": mn,
                            "max_share": mx,
                            "bal_minus_unbal": diff if bal else None,
                            "vs_random_balanced": vs,
                            "seeds": sorted(rs),
                        }
                    )
    text = "\n".join(lines) + "\n"
    text += f"\ncommand: `python benchmarks/tickets_balance.py` (total {total_s / 60:.1f} min)\n"
    write_results(
        out, {"args": args_dict(args), "runs": runs, "summary": summary, "total_s": total_s}, text, quick=args.quick
    )


if __name__ == "__main__":
    main()
