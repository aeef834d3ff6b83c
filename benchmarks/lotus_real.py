"""LOTUS on real data: Fashion-MNIST, every peer in one loop, 3 seeds interleaved, 1 thread per run.

Configs (all ``configs/fashion_*.yaml``: one model, OP block, recipe and data; only the method differs):

* dense SOAP (the stronger optimiser here) at 4, 8 and 12 epochs, each with its cosine lr annealed to its own
  budget; dense AdamW checked at 12;
* everything below on SOAP at a 16-epoch budget (cheaper epochs need more of them to reach the dense accuracy;
  time to target counts from the first epoch that reaches it): a smaller dense ViT (embed_dim 40 instead of 64:
  about 0.4x the FLOPs);
* peers alone: a fixed random 50 % subset, RS2 (a fresh random 50 % every epoch),
  InfoBatch at its defaults (r 0.5, the last 12.5 % of epochs on all data), FLIP (50 % random patches),
  progressive resolution (``configs/fashion_res.yaml``);
* the hand-made LOTUS schedule (``configs/fashion_lotus.yaml``) and ``schedule.mode: auto``: the one auto config
  (``configs/fashion_auto.yaml``, the same method sections as the digits32 / textures / shapes32 auto configs:
  random patches and thinning decided by the auto rules) and the resolution lever of the same rules, added to it
  (both levers from about a quarter of the tokens) or alone.

Data: a fixed class-stratified 8 000-image training subset of the 55 000 training images left after the
5 000-image validation split (the split decides the target and every time-to-target); the 10 000 test images
report final accuracy only. The subset, width (64) and budgets keep the whole benchmark near an hour on two
cores (two runs side by side, one thread each); the dense curve still rises from 4 to 12 epochs, so the
budgets span the accuracy-vs-cost trade a user faces.

Per seed: CPU seconds to the target (process CPU time of the 1-thread run: every probe, scoring and pruning
pass counted, evaluation not), training FLOPs to the target, final val and test accuracy, final params and
inference img/s. Target = the strongest dense config's mean final val accuracy - 0.3 pp. A seed's dense
baseline is the fastest dense config/budget that reaches the target in that seed (counted from the epoch it
first does). Per method: median and range of the per-seed ratios. Writes
``benchmarks/results/lotus_real/fashion.{json,md,png}``; finished runs (``bench/lotus_real``) are reused only
when their machine fingerprint matches this machine's::

    python benchmarks/lotus_real.py              # the full benchmark (about an hour on 2 cores)
    python benchmarks/lotus_real.py --quick      # a smoke run in a few minutes (1 seed, tiny data)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lotus.bench import run_bench  # noqa: E402
from lotus.bench_report import analyse  # noqa: E402
from lotus.bench_stats import _finite, _time_to, baselines_line, format_ratio, mean_std, seed_ratios  # noqa: E402


def _ratio(d: dict) -> str:
    return format_ratio(d, "not reached")


from lotus.run_report import read_metrics  # noqa: E402
from lotus.safe_io import atomic_write_text  # noqa: E402

OP, RES, LOTUS, AUTO = (f"configs/fashion_{n}.yaml" for n in ("op", "res", "lotus", "auto"))


def _e(name: str, path: str, sets: list[str], role: str, label: str) -> dict:
    return {"name": name, "path": path, "set": sets, "role": role, "label": label}


# the resolution lever of schedule.mode: auto (auto_side_rules) on top of the one auto config: both token levers
# from about a quarter of the tokens (the side from 3/4, half of the patches), or the resolution alone (no patches)
AUTO_TOKENS = [
    "model.kwargs.dynamic_img_size=true",
    "resolution.enabled=true",
    "resolution.start=0.75",
    "tickets.patches.keep_rate=0.5",
]
AUTO_SIDE = [
    "model.kwargs.dynamic_img_size=true",
    "resolution.enabled=true",
    "resolution.start=0.75",
    "tickets.patches.enabled=false",
    "tickets.patches.keep_rate=0.5",  # unused (patches off); as the stored runs were configured
]
SOAP = ["optim.name=soap"]  # the stronger optimiser here (dense SOAP beats dense AdamW by ~5 pp at 12 epochs)


def entries(budgets: list[int], peer_epochs: int) -> list[dict]:
    """Every config of the benchmark: the dense curve (SOAP at each budget, AdamW checked at the longest), then
    every other method on SOAP at ``peer_epochs`` (a third more than the longest dense budget: a method that
    spends less per epoch needs more epochs to reach the dense accuracy; time to target counts from the epoch it
    first does, so a longer budget costs nothing there)."""
    out = [
        _e(f"dense_soap_{b}ep", OP, [f"train.epochs={b}"] + SOAP, "dense", f"dense SOAP, {b} epochs") for b in budgets
    ]
    out.append(
        _e(
            f"dense_adamw_{budgets[-1]}ep",
            OP,
            [f"train.epochs={budgets[-1]}", "optim.name=adamw"],
            "dense",
            f"dense AdamW, {budgets[-1]} epochs",
        )
    )
    ep = [f"train.epochs={peer_epochs}"] + SOAP
    out += [
        _e("small_dense", OP, ep + ["model.kwargs.embed_dim=40"], "peer", "smaller dense ViT (width 40)"),
        _e(
            "random_fixed",
            OP,
            ep + ["tickets.random.enabled=true", "tickets.random.mode=fixed"],
            "peer",
            "fixed random 50 % subset",
        ),
        _e("rs2", OP, ep + ["tickets.random.enabled=true", "tickets.random.mode=rs2"], "peer", "RS2, 50 % per epoch"),
        _e("infobatch", OP, ep + ["tickets.dynamic.enabled=true"], "peer", "InfoBatch (r 0.5, anneal 0.875)"),
        _e(
            "flip",
            OP,
            ep + ["tickets.patches.enabled=true", "tickets.patches.scorer=random", "tickets.patches.keep_rate=0.5"],
            "peer",
            "FLIP, 50 % random patches",
        ),
        _e("prog_res", RES, ep, "peer", "progressive resolution"),
        _e(
            "lotus_hand",
            LOTUS,
            ep + [f"pruning.structured.at_epoch={max(1, round(peer_epochs * 2 / 3))}"],
            "lotus",
            "LOTUS, hand-made",
        ),
        _e("lotus_auto", AUTO, ep, "lotus", "LOTUS, schedule: auto (the one auto config)"),
        _e("lotus_auto_tokens", AUTO, ep + AUTO_TOKENS, "lotus", "LOTUS auto, + the resolution lever"),
        _e("lotus_auto_side", AUTO, ep + AUTO_SIDE, "lotus", "LOTUS auto, the resolution lever alone"),
    ]
    return out


def fingerprint() -> dict:
    """What identifies this machine for timing purposes, plus a 1-thread calibration time (a fixed matmul)."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    ident = {"machine": platform.machine(), "cpu": model, "cpus": os.cpu_count(), "torch": torch.__version__}
    return {**ident, "id": hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]}


def calibrate() -> float:
    """CPU seconds of a fixed 1-thread workload (256x256 matmuls): the speed of this machine right now."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        t0 = time.process_time()
        for _ in range(400):
            a = torch.tanh(a @ a)
        return time.process_time() - t0
    finally:
        torch.set_num_threads(threads)


def _prepare_runs(runs: str, fp: dict, seeds: list[int]) -> None:
    """Keep finished runs of this machine; remove this invocation's unfinished runs (they restart) and refuse
    another machine's. Runs of other seeds are left alone (another invocation may be training them)."""
    os.makedirs(runs, exist_ok=True)
    stamp = os.path.join(runs, "machine.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            old = json.load(f)
        if old.get("id") != fp["id"]:
            raise SystemExit(
                f"error: {runs} holds runs of another machine ({old.get('cpu')!r}); rerun with "
                "another --runs folder instead of mixing machines in one table"
            )
    atomic_write_text(stamp, json.dumps(fp, indent=2))
    for cfg in Path(runs).iterdir():
        for seed in seeds:
            seed_dir = cfg / f"seed{seed}"
            if cfg.is_dir() and seed_dir.is_dir() and not (seed_dir / "summary.json").is_file():
                shutil.rmtree(seed_dir)


def _per_run(run_dir: str, target: float) -> dict:
    epochs = read_metrics(run_dir)[0]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {
        "cpu_to_target": _time_to(epochs, target, "cpu_s"),
        "flops_to_target": _time_to(epochs, target, "train_flops"),
        "epoch_to_target": _time_to(epochs, target, "epoch"),
        "final_val": epochs[-1]["val_acc"],
        "test": summary.get("test_acc"),
        "cpu_total": epochs[-1]["cpu_s"],
        "flops_total": epochs[-1]["train_flops"],
        "curve": [(e["cpu_s"], e["train_flops"], e.get("val_acc")) for e in epochs],
    }


def analyse_runs(ents: list[dict], results: list, seeds: list[int], drop: float) -> dict:
    finals = {e["name"]: [read_metrics(r)[0][-1]["val_acc"] for r in res.runs] for e, res in zip(ents, results)}
    dense = [e["name"] for e in ents if e["role"] == "dense"]
    strongest = max(dense, key=lambda n: statistics.fmean(finals[n]))
    target = statistics.fmean(finals[strongest]) - drop
    inf = {r["name"]: r for r in analyse(results, target=target, target_drop=drop)["rows"]}  # params, img/s
    rows = []
    for e, res in zip(ents, results):
        runs = [_per_run(d, target) for d in res.runs]
        rows.append(
            {**e, "runs": runs, "params": inf[e["name"]]["params"], "inf_img_per_s": inf[e["name"]]["inf_img_per_s"]}
        )
    base = {}
    for key in ("cpu_to_target", "flops_to_target"):
        base[key] = []
        for k in range(len(seeds)):
            reached = [
                (r["runs"][k][key], r["name"])
                for r in rows
                if r["role"] == "dense" and math.isfinite(r["runs"][k][key])
            ]
            base[key].append(min(reached) if reached else (math.inf, None))
    ref = next(r for r in rows if r["name"] == strongest)
    for r in rows:
        for key, short in (("cpu_to_target", "time"), ("flops_to_target", "flops")):
            r[f"speedup_{short}"] = seed_ratios([b for b, _ in base[key]], [x[key] for x in r["runs"]])
        r["delta_val_pp"] = (
            statistics.fmean(x["final_val"] for x in r["runs"]) - statistics.fmean(x["final_val"] for x in ref["runs"])
        ) * 100
        tests = [x["test"] for x in r["runs"] if x["test"] is not None]
        r["delta_test_pp"] = (statistics.fmean(tests) - statistics.fmean(x["test"] for x in ref["runs"])) * 100
    return {
        "seeds": seeds,
        "target": target,
        "target_drop": drop,
        "strongest_dense": strongest,
        "baseline_per_seed": {k: [{"value": v, "config": n} for v, n in b] for k, b in base.items()},
        "rows": rows,
    }


def _fmt(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{v:.{digits}f}" if math.isfinite(v) else "-" for v in values)


def verdict(res: dict) -> list[str]:
    """The issue's targets for the auto schedule, checked against this table."""
    rows = {r["name"]: r for r in res["rows"]}
    auto = rows["lotus_auto"]
    out = []
    for r in (rows["lotus_auto"], rows["lotus_hand"]):
        t, f = r["speedup_time"], r["speedup_flops"]
        n = len(t["per_seed"])
        fast = (
            t["median"] is not None
            and t["median"] >= 2.0
            and t["seeds_with_ratio"] == n
            and all(v >= 1.6 for v in t["per_seed"] if v is not None)
        )
        flops = f["median"] is not None and f["median"] >= 2.5 and f["seeds_with_ratio"] == n
        close = r["delta_test_pp"] >= -0.3
        small = r["params"] < rows[res["strongest_dense"]]["params"]
        out.append(
            f"- **{r['label']}**: CPU-time speed-up {_ratio(t)} (target >= 2.0x, every seed >= 1.6x: "
            f"{'met' if fast else 'MISSED'}); FLOP speed-up {_ratio(f)} (>= 2.5x: {'met' if flops else 'MISSED'}); "
            f"test {r['delta_test_pp']:+.2f} pp vs {res['strongest_dense']} (within 0.3 pp: "
            f"{'met' if close else 'MISSED'}); final params "
            f"x{r['params'] / rows[res['strongest_dense']]['params']:.2f} "
            f"({'smaller' if small else 'NOT smaller'})."
        )

    def ahead(peer: dict) -> bool:  # reaches the target in more seeds, or in as many with a median as high
        p, a = peer["speedup_time"], auto["speedup_time"]
        if p["seeds_with_ratio"] != a["seeds_with_ratio"]:
            return p["seeds_with_ratio"] > a["seeds_with_ratio"]
        return p["median"] is not None and (a["median"] is None or p["median"] >= a["median"])

    beaten = [r["label"] for r in res["rows"] if r["role"] == "peer" and ahead(r)]
    out.append(
        "- Peers at least as fast to the target as the auto schedule (more seeds at the target, or as many with a "
        "median CPU-time ratio as high): " + (", ".join(beaten) if beaten else "none") + "."
    )
    return out


def markdown(res: dict, command: str, meta: dict) -> str:
    head = [
        "method",
        "config",
        "final val acc",
        "final test acc",
        "test vs strongest dense",
        f"CPU s to {res['target'] * 100:.2f}% (per seed)",
        "CPU-time speed-up",
        "FLOP speed-up",
        "epoch reached (per seed)",
        "total CPU s",
        "total train TFLOP",
        "params",
        "inf img/s",
    ]
    ref = next(r for r in res["rows"] if r["name"] == res["strongest_dense"])
    out = [
        "# LOTUS on Fashion-MNIST: every method in one loop",
        "",
        f"`{command}`",
        "",
        f"Seeds {res['seeds']}, runs interleaved seed by seed, {meta['jobs']} side by side, 1 thread each. "
        f"{meta['data']}. Target = {res['strongest_dense']}'s mean final val accuracy - "
        f"{res['target_drop'] * 100:.1f} pp = **{res['target'] * 100:.2f}%** (val split). Speed-ups are per-seed "
        "ratios (median, range) against the seed's fastest dense config/budget that reaches the target; CPU "
        "seconds are the 1-thread run's process CPU time (probes, scoring and pruning included; evaluation "
        "not). Test accuracy is measured once, after training, and chooses nothing.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in res["rows"]:
        runs = r["runs"]
        out.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"`{r['name']}`",
                    mean_std([x["final_val"] for x in runs]),
                    mean_std([x["test"] for x in runs]),
                    f"{r['delta_test_pp']:+.2f} pp",
                    _fmt([x["cpu_to_target"] for x in runs]),
                    _ratio(r["speedup_time"]),
                    _ratio(r["speedup_flops"]),
                    _fmt([x["epoch_to_target"] for x in runs]),
                    f"{statistics.fmean(x['cpu_total'] for x in runs):.0f}",
                    f"{statistics.fmean(x['flops_total'] for x in runs) / 1e12:.2f}",
                    f"{r['params'] / 1e6:.3f} M (x{r['params'] / ref['params']:.2f})",
                    f"{r['inf_img_per_s']:.0f} ({r['inf_img_per_s'] / ref['inf_img_per_s']:.2f}x)",
                ]
            )
            + " |"
        )
    base = res["baseline_per_seed"]["cpu_to_target"]
    out += [
        "",
        baselines_line(res["seeds"], base, digits=0),
        "",
        "Targets (issue: auto >= 2.0x CPU time, >= 2.5x FLOPs, within "
        "0.3 pp on test, smaller model, faster than each peer):",
        "",
    ]
    out += verdict(res)
    out += [
        "",
        f"![val accuracy vs CPU time and FLOPs]({meta['plot']})",
        "",
        f"Machine: {meta['fingerprint']['cpu']} ({meta['fingerprint']['cpus']} CPUs, torch "
        f"{meta['fingerprint']['torch']}); calibration (1-thread matmul workload, CPU s) {meta['calib_start']:.3f} "
        f"at the start, {meta['calib_end']:.3f} at the end; load average {meta['load_start']:.2f} -> "
        f"{meta['load_end']:.2f}. Invocation {meta['started']} - {meta['finished']}; {meta['runs_reused']} of "
        f"{meta['runs']} runs reused from an earlier invocation on this machine.",
        "",
    ]
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    """Val accuracy (mean over seeds, per epoch) against CPU seconds and against training FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in res["rows"]:
        curves = [x["curve"] for x in r["runs"]]
        n = min(len(c) for c in curves)
        for ax, axis, scale in ((axes[0], 0, 1.0), (axes[1], 1, 1e12)):
            xs = [statistics.fmean(c[i][axis] for c in curves) / scale for i in range(n)]
            ys = [statistics.fmean(c[i][2] for c in curves) * 100 for i in range(n)]
            ax.plot(
                xs,
                ys,
                marker="o",
                ms=3,
                lw=2.2 if r["role"] == "lotus" else 1.2,
                ls="--" if r["role"] == "dense" else "-",
                label=r["label"],
            )
    for ax, xl in ((axes[0], "training CPU seconds (1 thread)"), (axes[1], "training TFLOPs")):
        ax.axhline(res["target"] * 100, color="k", lw=0.8, ls=":")
        ax.set_xlabel(xl)
        ax.set_ylabel("val accuracy (%)")
        lo = res["target"] * 100 - 8
        ax.set_ylim(lo, None)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fashion-MNIST, mean of seeds {res['seeds']}; dotted: target {res['target'] * 100:.2f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 1 000 images, budgets 1-3 epochs")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="seed offsets (default 0 1 2)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/lotus_real)")
    ap.add_argument("--runs", default=None, help="run folders (git-ignored; finished runs are reused)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, 1 thread each (default 2)")
    ap.add_argument("--train-size", type=int, default=8000, help="training images (default 8000)")
    ap.add_argument("--target-drop", type=float, default=0.003)
    a = ap.parse_args()
    os.chdir(ROOT)
    if a.quick:
        seeds, budgets, peer, sets = a.seeds or [0], [1, 2], 3, ["data.limit_train=1000", "data.val_size=1000"]
        out, runs = a.out or "bench/lotus_real_quick/results", a.runs or "bench/lotus_real_quick"
    else:
        seeds, budgets, peer, sets = a.seeds or [0, 1, 2], [4, 8, 12], 16, [f"data.limit_train={a.train_size}"]
        out, runs = a.out or "benchmarks/results/lotus_real", a.runs or "bench/lotus_real"
    fp = fingerprint()
    _prepare_runs(runs, fp, seeds)
    ents = entries(budgets, peer)
    load_start, started, t0, calib_start = (
        os.getloadavg()[0],
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        time.time(),
        calibrate(),
    )
    results = run_bench(
        [(e["path"], [f"name={e['name']}"] + e["set"]) for e in ents],
        seeds,
        runs,
        overrides=["train.threads=1"] + sets,
        jobs=a.jobs,
    )
    res = analyse_runs(ents, results, seeds, a.target_drop)
    done = [os.path.getmtime(os.path.join(d, "summary.json")) for r in results for d in r.runs]
    os.makedirs(out, exist_ok=True)
    meta = {
        "fingerprint": fp,
        "calib_start": calib_start,
        "calib_end": calibrate(),
        "jobs": a.jobs,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "plot": "fashion.png",
        "runs_reused": sum(t < t0 for t in done),
        "runs": len(done),
        "data": (
            "Fashion-MNIST (Debian's dataset-fashion-mnist): "
            + ("1 000" if a.quick else f"{a.train_size:,}")
            + " training images (class-stratified, fixed), "
            + ("1 000" if a.quick else "5 000")
            + " validation images held out of the 60 000, the 10 000 test images"
        ),
    }
    command = (
        "python benchmarks/lotus_real.py"
        + (" --quick" if a.quick else "")
        + (f" --seeds {' '.join(map(str, a.seeds))}" if a.seeds else "")
        + (f" --train-size {a.train_size}" if a.train_size != 8000 else "")
        + (f" --jobs {a.jobs}" if a.jobs != 2 else "")
    )
    res.update(meta=meta, command=command)
    plot(res, os.path.join(out, "fashion.png"))
    for r in res["rows"]:
        for x in r["runs"]:
            x.pop("curve")
    atomic_write_text(
        os.path.join(out, "fashion.json"), json.dumps(_finite(res), indent=2, default=str, allow_nan=False)
    )
    md = markdown(res, command, meta)
    atomic_write_text(os.path.join(out, "fashion.md"), md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
