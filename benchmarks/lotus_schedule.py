"""The LOTUS schedule against the strongest dense baseline: the script behind every LOTUS table in the README.

Per dataset ("suite") it trains the dense configs at several epoch budgets and the LOTUS configs, seed by
seed interleaved (seed 0 of every config, then seed 1, ...) in one process with fixed threads
(``train.threads=1``), through :func:`lotus.bench.run_bench` (finished runs are reused, so an interrupted
benchmark resumes where it stopped). Then, per dataset:

* target = the strongest dense config's (highest mean final accuracy) mean final val accuracy - 0.5 pp;
* the dense baseline of a seed is the *fastest* dense config/budget that reaches the target in that seed
  (a dense run counts from the epoch it first reaches it: stopping it there is allowed), separately for
  wall time, training FLOPs and samples forwarded;
* each config's speed-up is the per-seed ratio baseline / config (median and range over seeds), and its
  final model's params and inference img/s (batch 256, 1 thread) are compared with the strongest dense one.

Writes ``<out>/<dataset>.{json,md}`` through ``benchmarks/_common.py`` (``--out``: the results folder, default
``benchmarks/results/lotus_schedule``; ``--results`` is its deprecated alias), runs under ``--runs`` (git-ignored)::

    python benchmarks/lotus_schedule.py                                    # every dataset, seeds 0-2
    python benchmarks/lotus_schedule.py --quick    # smoke run, a few minutes: digits16, seed 0, 200 images, 6 epochs
    python benchmarks/lotus_schedule.py --datasets digits32 --seeds 0      # quick, one seed
    python benchmarks/lotus_schedule.py --datasets digits32_ablation shapes32_ablation  # ablations
    python benchmarks/lotus_schedule.py --datasets digits16 --configs configs/my_lotus.yaml  # add a config
    python benchmarks/lotus_schedule.py --datasets shapes32 \\
        --configs "configs/shapes32_lotus.yaml:name=s_r07,tickets.dynamic.ratio=0.7"
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks._common import RESULTS, add_harness_args, out_path, write_results  # noqa: E402
from benchmarks.lotus_schedule_report import decisions, markdown  # noqa: E402
from lotus.bench import run_bench  # noqa: E402
from lotus.bench_report import analyse  # noqa: E402
from lotus.bench_stats import _finite, _time_to, seed_ratios  # noqa: E402
from lotus.run_report import read_metrics  # noqa: E402


def _dense(path: str, name: str, epochs: list[int], extra: list[str] | None = None) -> list[dict]:
    return [
        {"name": f"{name}_{e}ep", "path": path, "set": [f"train.epochs={e}"] + list(extra or []), "role": "dense"}
        for e in epochs
    ]


_SOAP = ["optim.name=soap"]  # the LOTUS configs on SOAP: the same schedule, the stronger optimiser
# the resolution lever of schedule.mode: auto added to the one auto config: both token levers from about a quarter of
# the tokens (the side from 3/4 of the full side, half of the patches at random), decided by the same rules
_TOKENS = [
    "model.kwargs.dynamic_img_size=true",
    "resolution.enabled=true",
    "resolution.start=0.75",
    "tickets.patches.keep_rate=0.5",
]
# the resolution lever alone (no random patches: shapes32's small objects are where dropping patches hurts)
_SIDE = [
    "model.kwargs.dynamic_img_size=true",
    "resolution.enabled=true",
    "resolution.start=0.75",
    "tickets.patches.enabled=false",
]


def _dense_both(path: str, name: str, epochs: list[int]) -> list[dict]:
    """The dense OP model with AdamW (the LOTUS configs' optimiser) and with SOAP, at each epoch budget."""
    return _dense(path, name, epochs) + _dense(path, f"{name}_soap", epochs, _SOAP)


def _dense_soap(path: str, name: str, epochs: list[int]) -> list[dict]:
    """The dense OP model with SOAP alone: in every stored table of the 32 px suites (digits32, textures,
    shapes32) dense AdamW ends 0.1-20 pp below dense SOAP at each budget and is never the fastest to the target."""
    return _dense(path, f"{name}_soap", epochs, _SOAP)


def _lotus(path: str, name: str, extra: list[str] | None = None, role: str = "lotus") -> dict:
    return {"name": name, "path": path, "set": list(extra or []), "role": role}


# tokens per image, the speed-up target (median per-seed ratio), the data to generate, and the configs
def _ablations(path: str, name: str, switches: tuple, extra: list[str] | None = None) -> list[dict]:
    return [_lotus(path, f"{name}-{what}", list(extra or []) + [key], "ablation") for what, key in switches]


# one feature of an auto config switched at a time (the 64-token auto configs leave tickets.dynamic off: these
# ablations are where that choice comes from; patches_forced lowers the keep rate even where the timed check
# says the dropped patches save less than re-ranking costs)
_AUTO_SWITCHES = (
    ("no_patches", "tickets.patches.enabled=false"),
    ("no_thinning", "pruning.structured.mlp=0.0"),
    ("with_dynamic", "tickets.dynamic.enabled=true"),
    ("patches_forced", "schedule.auto.patches_must_pay=false"),
)

# the hand-made 64-token schedule (12 epochs) stretched to a 40-epoch budget: the same rates, longer phases
_HAND_40EP = [
    "train.epochs=40",
    "schedule.warmup_epochs=4",
    "schedule.anneal_epochs=8",
    "pruning.structured.at_epoch=6",
]

# tokens per image, the speed-up target (median per-seed ratio), the data to generate, and the configs
SUITES: dict[str, dict] = {
    "digits16": {
        "tokens": 16,
        "target_speedup": 1.5,
        "data": None,
        "configs": _dense_both("configs/digits_op.yaml", "digits_op", [10, 20])
        + [
            _lotus("configs/digits_lotus.yaml", "digits_lotus"),
            _lotus(
                "configs/digits_lotus.yaml",
                "digits_lotus_15ep",
                ["train.epochs=15", "pruning.structured.at_epoch=3", "schedule.anneal_epochs=3"],
            ),
            _lotus("configs/digits_auto.yaml", "digits_auto"),
            _lotus("configs/digits_auto.yaml", "digits_auto_soap", _SOAP),
            # the strongest dense model here is SOAP at 10 epochs: the auto schedule at that budget too (dynamic
            # pruning off: at 10 epochs the model has not yet learned what it would drop)
            _lotus(
                "configs/digits_auto.yaml",
                "digits_auto_soap_10ep",
                _SOAP + ["train.epochs=10", "tickets.dynamic.enabled=false"],
            ),
        ],
    },
    "digits32": {
        "tokens": 64,
        "target_speedup": 2.0,
        "data": None,
        "configs": _dense_soap("configs/digits32_op.yaml", "digits32_op", [10, 20])
        + [
            _lotus("configs/digits32_lotus.yaml", "digits32_lotus"),
            _lotus("configs/digits32_auto.yaml", "digits32_auto", role="auto"),  # the one auto config
            _lotus("configs/digits32_auto.yaml", "digits32_auto_tokens", _TOKENS, role="ablation"),
            _lotus("configs/digits32_flip.yaml", "digits32_flip_soap"),
        ],
    },
    # one feature off (or on) at a time, seed 0 by default; shares digits32's run folders, so its dense, hand and
    # auto runs are reused: python benchmarks/lotus_schedule.py --datasets digits32_ablation --seeds 0
    "digits32_ablation": {
        "tokens": 64,
        "target_speedup": 2.0,
        "data": None,
        "runs": "digits32",
        "configs": _dense_both("configs/digits32_op.yaml", "digits32_op", [10, 20])
        + [_lotus("configs/digits32_lotus.yaml", "digits32_lotus")]
        + _ablations(
            "configs/digits32_lotus.yaml",
            "digits32_lotus",
            (
                ("no_patches", "tickets.patches.enabled=false"),
                ("no_dynamic", "tickets.dynamic.enabled=false"),
                ("no_thinning", "pruning.structured.mlp=0.0"),
            ),
        )
        + [_lotus("configs/digits32_auto.yaml", "digits32_auto", role="auto")]
        + _ablations("configs/digits32_auto.yaml", "digits32_auto", _AUTO_SWITCHES),
    },
    # 20 epochs are far from converged on shapes (dense SOAP 85 +- 4 %, still rising): the budgets here are 20 and
    # 40 epochs, and the auto configs (configs/shapes32_auto.yaml) train 40
    "shapes32": {
        "tokens": 64,
        "target_speedup": 2.0,
        "data": ("make_shapes", "data/shapes32", 250, 60),
        "configs": _dense_soap("configs/shapes32_op.yaml", "shapes32_op", [20, 40])
        + [
            _lotus("configs/shapes32_lotus.yaml", "shapes32_lotus"),
            _lotus("configs/shapes32_lotus.yaml", "shapes32_lotus_40ep", _HAND_40EP),
            _lotus("configs/shapes32_auto.yaml", "shapes32_auto", role="auto"),  # the one auto config
            _lotus("configs/shapes32_auto.yaml", "shapes32_auto_tokens", _TOKENS, role="ablation"),
            _lotus("configs/shapes32_auto.yaml", "shapes32_auto_side", _SIDE, role="ablation"),
            _lotus("configs/shapes32_flip.yaml", "shapes32_flip_soap"),
        ],
    },
    "shapes32_ablation": {
        "tokens": 64,
        "target_speedup": 2.0,
        "data": ("make_shapes", "data/shapes32", 250, 60),
        "runs": "shapes32",
        "configs": _dense_both("configs/shapes32_op.yaml", "shapes32_op", [20, 40])
        + [_lotus("configs/shapes32_auto.yaml", "shapes32_auto", role="auto")]
        + _ablations("configs/shapes32_auto.yaml", "shapes32_auto", _AUTO_SWITCHES),
    },
    "textures": {
        "tokens": 64,
        "target_speedup": 2.0,
        "data": ("make_textures", "data/textures", 350, 150),
        "configs": _dense_soap("configs/textures_op.yaml", "textures_op", [10, 20])
        + [
            _lotus("configs/textures_lotus.yaml", "textures_lotus"),
            _lotus("configs/textures_auto.yaml", "textures_auto", role="auto"),  # the one auto config
            _lotus("configs/textures_auto.yaml", "textures_auto_tokens", _TOKENS, role="ablation"),
            _lotus("configs/textures_flip.yaml", "textures_flip_soap"),
        ],
    },
}


# --quick: the first suite only, seed 0, 200 training images, and every run at 6 epochs, the fewest
# configs/digits_lotus.yaml accepts (its thinning at epoch 5 must fall before train.epochs; its 3 anneal epochs
# need warm-up + anneal < train.epochs); digits_auto decides its phases itself. Runs under <--runs>_quick.
QUICK = {
    "suite": "digits16",
    "only": ["digits_lotus", "digits_auto"],
    "epochs": 6,
    "sets": ["data.limit_train=200"],
}


def _ensure_data(spec: tuple | None) -> None:
    """Generate the suite's ImageFolder (deterministic from seed 0) when it is not there yet."""
    if spec is None:
        return
    module, out, n_train, n_val = spec
    if os.path.isdir(ROOT / out / "train") and os.path.isdir(ROOT / out / "val"):
        return
    import importlib

    importlib.import_module(module).make(str(ROOT / out), n_train, n_val, 32, 0)
    print(f"made {out}", flush=True)


def _parse_extra(text: str, role: str) -> dict:
    """``PATH[:KEY=VALUE,KEY=VALUE]`` (a ``name=`` override names the variant) -> a config entry."""
    path, _, rest = text.partition(":")
    sets = [s for s in rest.split(",") if s]
    name = next((s.split("=", 1)[1] for s in sets if s.startswith("name=")), Path(path).stem)
    return {"name": name, "path": path, "set": [s for s in sets if not s.startswith("name=")], "role": role}


def _analyse_suite(suite: str, entries: list[dict], results: list, seeds: list[int], drop: float) -> dict:
    finals = {}
    for e, res in zip(entries, results):
        finals[e["name"]] = [read_metrics(r)[0][-1]["val_acc"] for r in res.runs]
    dense = [e["name"] for e in entries if e["role"] == "dense"]
    strongest = max(dense, key=lambda n: statistics.fmean(finals[n]))
    target = statistics.fmean(finals[strongest]) - drop
    analysis = analyse(results, target=target, target_drop=drop)
    rows = {r["name"]: r for r in analysis["rows"]}
    for r, (e, res) in zip(analysis["rows"], zip(entries, results)):
        r["role"] = e["role"]
        r["overrides"] = e["set"]
        epochs = [read_metrics(d)[0] for d in res.runs]
        r["epoch_to_target"] = [_time_to(ep, target, "epoch") for ep in epochs]
        r["auto_decisions"] = [decisions(d) for d in res.runs]
        r["cpu_to_target"] = [_time_to(ep, target, "cpu_s") for ep in epochs]
        r["cpu_total"] = [ep[-1]["cpu_s"] for ep in epochs]
        r["samples_to_target"] = [_time_to(ep, target, "samples_seen") for ep in epochs]
        r["total_time"] = [ep[-1]["wall_s"] for ep in epochs]
        r["samples_total"] = [ep[-1]["samples_seen"] for ep in epochs]
    base = {}
    for key in ("time_to_target", "cpu_to_target", "flops_to_target", "samples_to_target"):
        per_seed = []
        for k in range(len(seeds)):
            reached = [(rows[n][key][k], n) for n in dense if math.isfinite(rows[n][key][k])]
            per_seed.append(min(reached) if reached else (math.inf, None))
        base[key] = per_seed
    ref = rows[strongest]
    for r in analysis["rows"]:
        for key, short in (
            ("time_to_target", "time"),
            ("cpu_to_target", "cpu"),
            ("flops_to_target", "flops"),
            ("samples_to_target", "samples"),
        ):
            r[f"speedup_{short}_per_seed"] = seed_ratios([b for b, _ in base[key]], r[key])
        r["delta_final_pp"] = (r["final_acc_mean"] - ref["final_acc_mean"]) * 100
        r["param_ratio"] = r["params"] / ref["params"]
        r["inference_speedup_vs_strongest"] = r["inf_img_per_s"] / ref["inf_img_per_s"]
        r.pop("curves", None)
    return {
        "suite": suite,
        "tokens": SUITES[suite]["tokens"] if suite in SUITES else None,
        "seeds": seeds,
        "target": target,
        "target_drop": drop,
        "strongest_dense": strongest,
        "baseline_per_seed": {k: [{"value": v, "config": n} for v, n in b] for k, b in base.items()},
        "rows": analysis["rows"],
        "auto_vs_hand": _auto_vs_hand(analysis["rows"]),
    }


def _auto_vs_hand(rows: list[dict]) -> list[dict]:
    """Each auto config (role ``auto``) against the best hand-made schedule (role ``lotus``: the most seeds at the
    target, then the lowest median CPU time to it, then the highest final accuracy): per-seed CPU-time ratios
    hand / auto."""
    hand = [r for r in rows if r["role"] == "lotus"]
    if not hand:
        return []

    def reached(r: dict) -> int:
        return sum(map(math.isfinite, r["cpu_to_target"]))

    def key(r: dict) -> tuple:  # the most seeds at the target, then the fastest there, then the highest final
        times = [t for t in r["cpu_to_target"] if math.isfinite(t)]
        return (-reached(r), statistics.median(times) if times else math.inf, -r["final_acc_mean"])

    best = min(hand, key=key)
    return [
        {
            "auto": r["name"],
            "hand": best["name"],
            "speedup_cpu_per_seed": seed_ratios(best["cpu_to_target"], r["cpu_to_target"]),
            "auto_seeds_reached": reached(r),
            "hand_seeds_reached": reached(best),
            "auto_delta_final_pp": r["delta_final_pp"],
            "hand_delta_final_pp": best["delta_final_pp"],
        }
        for r in rows
        if r["role"] == "auto"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=list(SUITES),
        help="suites (default every non-ablation suite; --quick: digits16)",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=[],
        metavar="PATH[:K=V,...]",
        help="more LOTUS configs for every selected dataset (e.g. an auto-schedule config)",
    )
    ap.add_argument("--dense", nargs="+", default=[], metavar="PATH[:K=V,...]", help="more dense baselines")
    ap.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="dense epoch budgets instead of the suite's (e.g. 20 alone when compute is short)",
    )
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these config names")
    ap.add_argument(
        "--runs",
        default="bench/lotus_schedule",
        help="run folders (git-ignored; reused when rerun; --quick: this + _quick)",
    )
    ap.add_argument("--target-drop", type=float, default=0.005)
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run (before each config's own; e.g. data.limit_train=200 for a smoke test)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1: timings comparable)")
    add_harness_args(
        ap,
        "lotus_schedule",
        seeds=[0, 1, 2],
        quick=f"smoke run: {QUICK['suite']}, the first seed, 200 images, {QUICK['epochs']} epochs, "
        + " and ".join(QUICK["only"]),
    )
    for action in ap._actions:  # here --out names a folder: one result pair per suite
        if action.dest == "out":
            action.help = (
                f"results folder: writes PATH/<dataset>.json and .md (default {RESULTS}/lotus_schedule; "
                f"--quick: {RESULTS}/quick/lotus_schedule)"
            )
    ap.add_argument("--results", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old --out
    a = ap.parse_args()
    if a.quick and a.datasets not in (None, [QUICK["suite"]]):
        ap.error(f"--quick runs {QUICK['suite']} only")
    datasets = a.datasets or ([QUICK["suite"]] if a.quick else [s for s in SUITES if "ablation" not in s])
    seeds, budgets, only, sets, runs = a.seeds, a.budgets, a.only, a.sets, a.runs
    if a.quick:
        seeds, budgets, only = seeds[:1], budgets or [QUICK["epochs"]], only or QUICK["only"]
        sets = QUICK["sets"] + [f"train.epochs={QUICK['epochs']}"] + sets
        runs = runs.rstrip("/") + "_quick"
    results_dir = a.out or out_path(a)  # out_path: the default folder, benchmarks/results[/quick]/lotus_schedule
    os.chdir(ROOT)
    for suite in datasets:
        spec = SUITES[suite]
        _ensure_data(spec["data"])
        entries = (
            list(spec["configs"])
            + [_parse_extra(c, "lotus") for c in a.configs]
            + [_parse_extra(c, "dense") for c in a.dense]
        )
        if budgets:
            dense = [e for e in entries if e["role"] == "dense" and e in spec["configs"]]
            variants: dict[tuple[str, str], list[str]] = {}
            for e in dense:  # one per path and optimiser: its name and overrides without the epoch budget
                variants.setdefault(
                    (e["path"], e["name"].rsplit("_", 1)[0]), [x for x in e["set"] if not x.startswith("train.epochs=")]
                )
            entries = [d for (path, name), extra in variants.items() for d in _dense(path, name, budgets, extra)] + [
                e for e in entries if e not in dense
            ]
        if only:
            entries = [e for e in entries if e["name"] in only or e["role"] == "dense"]
        load_start, started, t0 = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
        results = run_bench(
            [(e["path"], [f"name={e['name']}"] + e["set"]) for e in entries],
            seeds,
            os.path.join(runs, spec.get("runs", suite)),
            overrides=["train.threads=1"] + sets,
            jobs=a.jobs,
        )
        res = _analyse_suite(suite, entries, results, seeds, a.target_drop)
        done = [os.path.getmtime(os.path.join(d, "summary.json")) for r in results for d in r.runs]
        span = " - ".join(time.strftime("%H:%M", time.gmtime(t)) for t in (min(done), max(done)))
        meta = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1 per run",
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "target_speedup": spec["target_speedup"],
            "jobs": a.jobs,
            "runs_finished_utc": span,
            "runs_reused": sum(t < t0 for t in done),
            "runs": len(done),
        }
        command = (  # the flags as given (--quick implies its own seeds, budgets, --only, --set and --runs)
            "python benchmarks/lotus_schedule.py"
            + (" --quick" if a.quick else "")
            + " --datasets "
            + suite
            + ("" if a.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, a.seeds)))
            + ("" if not a.configs else " --configs " + " ".join(a.configs))
            + ("" if not a.budgets else " --budgets " + " ".join(map(str, a.budgets)))
            + ("" if not a.dense else " --dense " + " ".join(a.dense))
            + ("" if not a.only else " --only " + " ".join(a.only))
            + "".join(f" --set {x}" for x in a.sets)
            + ("" if a.jobs == 1 else f" --jobs {a.jobs}")
            + ("" if a.runs == ap.get_default("runs") else f" --runs {a.runs}")
            + ("" if a.target_drop == ap.get_default("target_drop") else f" --target-drop {a.target_drop:g}")
            + ("" if a.out is None else f" --out {a.out}")
        )
        res["meta"], res["command"] = meta, command
        md = markdown(res, command, meta)  # before _finite: the table reads the infinite times as "not reached"
        write_results(os.path.join(results_dir, suite), _finite(res), md, quick=a.quick)


if __name__ == "__main__":
    main()
