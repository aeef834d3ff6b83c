"""Offline data tickets on Fashion-MNIST: every scorer (through ``lotus select``) against random subsets and RS2.

Pool: a fixed class-stratified 25 000-image share of the 55 000 training images left after the 5 000 held-out
validation images (``data.limit_train``); the 10 000 test images report, the validation split decides.
Model and recipe: configs/fashion_op.yaml (a width-64, depth-4 timm ViT with SOAP) at patch 7 (16 tokens),
3 epochs on the full pool (the reference), 1 thread per run, runs side by side (``--jobs``), seed by seed.

Per seed, ``lotus select`` scores the pool once (one cached proxy training, ``--proxy-epochs 2`` of a
narrower width-32 copy of the model, shared by every scorer: aum, el2n, forgetting, loss, margin, prototype)
and writes the ticket it picks by default (aum scores, ccs with the hardest share cut by the pruning rate,
class-balanced). Its CPU seconds (proxy training + scoring + start-up) are the scoring cost, reported in units
of one full-data epoch of the reference run. Then, at 10 %, 30 % and 50 % of the pool:

* **same epochs** (the DeepCore/CCS convention: 3 epochs on the subset, so fewer steps): the default ticket,
  every other scorer under ccs (same rule), aum under ``top`` and ``moderate``, a class-stratified random
  subset (``tickets.random`` fixed) and RS2 (a fresh random share every epoch, ``tickets.random`` rs2);
* **same steps** as the full-data run (3 / fraction epochs, warm-up scaled alike): the default ticket and the
  random subset (RS2 at full-data steps sees every sample once per pass, i.e. it is the full-data run).

Reported: final test accuracy mean +- std over seeds, the per-seed difference to random (median, range),
validation accuracy, and whether the ticket beats random by more than the seed spread (every seed ahead and
the median gain above random's std). Writes ``benchmarks/results/tickets_real.{json,md}``::

    python benchmarks/tickets_real.py            # 3 seeds, ~40 minutes of 2 cores
    python benchmarks/tickets_real.py --quick    # smoke run: 2 000 images, 1 seed, 2 scorers (~4 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import add_harness_args, args_dict, machine, md_table, out_path, write_results  # noqa: E402

CONFIG = "configs/fashion_op.yaml"
SCORERS = ["aum", "el2n", "forgetting", "loss", "margin", "prototype"]
DEFAULT = "aum/ccs (default)"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _pct(f: float) -> str:
    return f"{round(f * 100)}"


def score_seed(args: argparse.Namespace, base: list[str], seed: int, folder: str) -> dict:
    """Run ``lotus select`` once for all scorers (1 thread); the default ticket per fraction; the cost record."""
    record_path = os.path.join(folder, "scoring.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [x for s in [*base, "train.threads=1", "model.kwargs.embed_dim=32"] for x in ("--set", s)]
    common = [sys.executable, "-m", "lotus", "select", "-c", CONFIG, *sets, "--seed", str(seed), "--quiet", "--force"]
    cache = ["--proxy-cache", os.path.join(args.runs, "proxy-cache")]
    first = f"{_pct(args.fractions[0])}"
    t0, c0 = time.perf_counter(), _children_cpu()
    with_repeats = [s for s in args.scorers if s != "prototype"]
    calls = [[*common, *cache, "--scorer", *with_repeats, "--repeats", "1", "--proxy-epochs", str(args.proxy_epochs)]]
    if "prototype" in args.scorers:
        calls.append([*common, *cache, "--scorer", "prototype", "--proxy-epochs", str(args.proxy_epochs)])
    for call in calls:
        out = os.path.join(folder, f"{{scorer}}-default-{first}.npz")
        subprocess.run([*call, "--fraction", str(args.fractions[0]), "--out", out], check=True, env=env)
    cost = {"cpu_s": _children_cpu() - c0, "wall_s": time.perf_counter() - t0}
    for frac in args.fractions[1:]:  # the default pick at the other sizes: scores reused, no scoring
        src = os.path.join(folder, f"aum-default-{first}.npz")
        out = os.path.join(folder, f"aum-default-{_pct(frac)}.npz")
        subprocess.run([*common, "--from-ticket", src, "--fraction", str(frac), "--out", out], check=True, env=env)
    from lotus.safe_io import atomic_write_text

    atomic_write_text(record_path, json.dumps(cost))  # the seed's scoring is reused by a rerun
    return cost


def pool_labels(base: list[str]):
    """Labels of the pool's training images, in dataset order (for class-balanced variants)."""
    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.models import resolve_img_size

    cfg = load_config(CONFIG, base)
    return build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans).labels_train


def variant_tickets(args: argparse.Namespace, folder: str, frac: float, labels) -> dict[str, str]:
    """Ticket files of every scorer/policy variant at ``frac`` (from the scores ``lotus select`` stored)."""
    from data_tickets import TicketFile, select

    first = f"{_pct(args.fractions[0])}"
    out = {DEFAULT: os.path.join(folder, f"aum-default-{_pct(frac)}.npz")}
    variants = [(s, "ccs") for s in args.scorers if s != "aum"] + [("aum", "top"), ("aum", "moderate")]
    for scorer, policy in variants:
        path = os.path.join(folder, f"{scorer}-{policy}-{_pct(frac)}.npz")
        if not os.path.isfile(path):
            src = TicketFile.load(os.path.join(folder, f"{scorer}-default-{first}.npz"))
            idx = select(src.scores, policy, fraction=frac, labels=labels, seed=src.seed)
            TicketFile(
                idx,
                scores=src.scores,
                fingerprint=src.fingerprint,
                scorer=scorer,
                policy=policy,
                fraction=frac,
                seed=src.seed,
                class_balanced=True,
            ).save(path)
        out[f"{scorer}/{policy}"] = path
    return out


def run_specs(args: argparse.Namespace, folder: str, labels) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every training run of ``seed``: full data, then each fraction's methods."""
    e = args.epochs
    specs = [("full", [f"train.epochs={e}", f"train.eval_every={e}"])]
    for frac in args.fractions:
        p = _pct(frac)
        steps_e, warm = round(e / frac), round(1 / frac, 3)
        same_e = [f"train.epochs={e}", f"train.eval_every={e}"]
        same_s = [f"train.epochs={steps_e}", f"train.eval_every={steps_e}", f"train.warmup_epochs={warm}"]
        rnd = ["tickets.random.enabled=true", f"tickets.random.fraction={frac}"]
        specs.append((f"random-{p}-epochs", [*same_e, *rnd, "tickets.random.mode=fixed"]))
        specs.append((f"rs2-{p}-epochs", [*same_e, *rnd, "tickets.random.mode=rs2"]))
        specs.append((f"random-{p}-steps", [*same_s, *rnd, "tickets.random.mode=fixed"]))
        for method, path in variant_tickets(args, folder, frac, labels).items():
            tag = method.split(" ")[0].replace("/", "-")
            specs.append((f"{tag}-{p}-epochs", [*same_e, f"tickets.file={path}"]))
            if method == DEFAULT:
                specs.append((f"{tag}-{p}-steps", [*same_s, f"tickets.file={path}"]))
    return [(n, [f"name={n}", *o]) for n, o in specs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=25000, help="training images (class-stratified share of 55 000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the full-data reference run")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--scorers", nargs="+", default=SCORERS)
    p.add_argument("--proxy-epochs", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, 1 thread each")
    p.add_argument("--runs", default="bench/tickets_real", help="run folders (git-ignored; finished runs reused)")
    add_harness_args(p, "tickets_real", seeds=[0, 1, 2], quick="smoke run: 2 000 images, 1 seed, aum + el2n")
    args = p.parse_args()
    if args.quick:
        args.pool, args.epochs, args.seeds, args.scorers = 2000, 2, args.seeds[:1], ["aum", "el2n"]
        args.runs = args.runs.rstrip("/") + "_quick"
    base = [
        "model.patch_size=7",
        f"data.limit_train={args.pool}",
        "output.report=false",
        *(["data.val_size=1000"] if args.quick else []),
    ]
    from lotus.bench import run_bench

    t0 = time.perf_counter()
    labels = pool_labels(base)
    scoring, runs = {}, []
    for seed in args.seeds:
        folder = os.path.join(args.runs, "tickets", f"seed{seed}")
        scoring[seed] = score_seed(args, base, seed, folder)
        specs = run_specs(args, folder, labels)
        res = run_bench(
            [(CONFIG, o) for _, o in specs],
            [seed],
            os.path.join(args.runs, f"seed{seed}"),
            overrides=[*base, "train.threads=1"],
            quiet=True,
            jobs=args.jobs,
        )
        for (name, _), r in zip(specs, res):
            with open(os.path.join(r.runs[0], "summary.json")) as f:
                s = json.load(f)
            runs.append(
                {
                    "name": name,
                    "seed": seed,
                    "test_acc": s["test_acc"],
                    "val_acc": s["final_val_acc"],
                    "cpu_s": s["cpu_s"],
                    "samples_seen": s["samples_seen"],
                }
            )
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(args, runs, scoring, time.perf_counter() - t0)


def report(args: argparse.Namespace, runs: list[dict], scoring: dict, total_s: float) -> None:
    from lotus.bench_stats import seed_stats

    by = {(r["name"], r["seed"]): r for r in runs}
    full_epoch = {s: by[("full", s)]["cpu_s"] / args.epochs for s in args.seeds}
    cost = [scoring[s]["cpu_s"] / full_epoch[s] for s in args.seeds]
    full_m, full_sd = seed_stats([by[("full", s)]["test_acc"] for s in args.seeds])
    sections, summary = [], []
    for conv in ("epochs", "steps"):
        for frac in args.fractions:
            p = _pct(frac)
            names = sorted({r["name"] for r in runs if r["name"].endswith(f"-{p}-{conv}")})
            rnd = [by[(f"random-{p}-{conv}", s)]["test_acc"] for s in args.seeds]
            rnd_sd = seed_stats(rnd)[1]
            rows = []
            for name in names:
                t = [by[(name, s)]["test_acc"] for s in args.seeds]
                v = [by[(name, s)]["val_acc"] for s in args.seeds]
                d = [a - b for a, b in zip(t, rnd)]
                m, sd = seed_stats(t)
                method = name.rsplit(f"-{p}-", 1)[0].replace("-", "/", 1)
                method = DEFAULT if method == "aum/ccs" else method
                beats = "-" if method == "random" else ("yes" if min(d) > 0 and statistics.median(d) > rnd_sd else "no")
                summary.append(
                    {"convention": conv, "fraction": frac, "method": method, "test": t, "val": v, "vs_random": d}
                )
                rng = f" ({min(d) * 100:+.2f} to {max(d) * 100:+.2f})" if len(d) > 1 else ""
                rows.append(
                    (
                        method,
                        f"{m * 100:.2f} +- {sd * 100:.2f}",
                        f"{statistics.median(d) * 100:+.2f}{rng}" if method != "random" else "-",
                        f"{seed_stats(v)[0] * 100:.2f}",
                        beats,
                        f"{statistics.fmean(by[(name, s)]['samples_seen'] for s in args.seeds):,.0f}",
                    )
                )
            rows.sort(key=lambda r: -float(r[3]))
            title = "same epochs as the full run" if conv == "epochs" else "same optimiser steps as the full run"
            sections.append(
                f"### {p} % of the pool, {title}\n\n"
                + md_table(
                    [
                        "method",
                        "test acc (%)",
                        "vs random, pp (median, range)",
                        "val acc (%)",
                        "beats random",
                        "samples forwarded",
                    ],
                    rows,
                )
            )
    cmd = "python benchmarks/tickets_real.py" + (" --quick" if args.quick else "")
    head = (
        f"# Offline data tickets on Fashion-MNIST\n\n`{cmd}`\n\n"
        f"Pool: {args.pool:,} class-stratified training images (validation: {1000 if args.quick else 5000:,} held "
        "out; test: 10 000). "
        f"Model: configs/fashion_op.yaml at patch 7, {args.epochs} epochs on the full pool, 1 thread per run, "
        f"seeds {args.seeds}. Full data: test {full_m * 100:.2f} +- {full_sd * 100:.2f}%. Tickets are "
        "class-balanced. 'beats random' = ahead of the random subset in every seed and by more than its std "
        "(median). Rows sorted by validation accuracy (the split that decides).\n\n"
        f"Scoring cost of `lotus select` (one width-32 proxy, {args.proxy_epochs} epochs, cached and shared by "
        f"{len(args.scorers)} scorers, scoring passes and start-up included): "
        f"{statistics.median(cost):.2f} full-data epochs (median; per seed "
        + ", ".join(f"{c:.2f}" for c in cost)
        + f"; {statistics.fmean(scoring[s]['cpu_s'] for s in args.seeds):.0f} CPU s vs "
        f"{statistics.fmean(full_epoch.values()):.0f} CPU s per full-data epoch).\n"
    )
    text = head + "\n" + "\n\n".join(sections) + f"\n\nMachine: {machine()['processor']}; total {total_s:.0f} s.\n"
    write_results(
        out_path(args),
        {"args": args_dict(args), "runs": runs, "scoring": scoring, "scoring_cost_epochs": cost, "summary": summary},
        text,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
