"""Training throughput of the default config with and without a busy neighbour: torch's default threads vs ``auto``,
and what the tuning costs.

Each measurement is a fresh process running lotus' own Trainer on ``configs/digits_preln.yaml`` (lotus_vit_tiny at
16 px, batch 64, augmentation on) for ``--steps`` optimiser steps (or until ``--max-seconds``), with
``train.eval_every`` raised so no evaluation falls inside the timed steps. Conditions, interleaved and repeated
``--rounds`` times (the order rotates each round):

* neighbour: ``none``; ``busy`` (a separate ``python -c "while True: pass"`` spinning one core, started before
  the measurement, killed after it); ``arrives`` (the same neighbour started by the worker after
  ``--arrive-at`` steps: exercises the re-tune on a sustained slowdown);
* threads: ``default`` (``train.threads: null``, torch's default thread count of a fresh process) or ``auto``
  (``train.threads: auto``, the Trainer's own ThreadTuner: it cycles the thread counts over the first real steps
  and re-tunes on a sustained slowdown; nothing of it is emulated here).

img/s counts the samples of all steps over the wall time from ``on_fit_start`` to the end of the last step, so the
tuning (its steps at slower counts and its stall checks) is inside it. The tuning overhead is the tuner's own
estimate (``total_overhead_s``: the extra time of the steps run at slower counts plus the stall checks) as a %
of that training time; the target is <= 2 %.

    python benchmarks/threads.py            # full: 150 steps, 3 rounds (~10 minutes on 2 cores)
    python benchmarks/threads.py --quick    # smoke run: 40 steps, 1 round (written under benchmarks/results/quick/)
    python benchmarks/threads.py --render benchmarks/results/threads.json   # re-write the .md from saved runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import add_harness_args, args_dict, md_table, out_path, write_results  # noqa: E402

NEIGHBOUR = [sys.executable, "-c", "while True: pass"]
CONDITIONS = [(nb, mode) for nb in ("none", "busy", "arrives") for mode in ("default", "auto")]


class _Stop(Exception):
    pass


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns its record."""
    import torch

    from lotus.callbacks import Callback
    from lotus.config import load_config
    from lotus.training import Trainer

    torch_default = torch.get_num_threads()
    threads = "auto" if args.worker == "auto" else "null"
    cfg = load_config(
        args.config,
        [f"train.max_steps={args.steps}", "train.eval_every=100000", "train.device=cpu", f"train.threads={threads}"],
    )

    class Meter(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.samples: list[int] = []
            self.threads: list[int] = []
            self.neighbour: subprocess.Popen | None = None
            self.start = 0.0
            self._n = 0

        def on_fit_start(self, trainer: Trainer) -> None:
            self.start = time.perf_counter()

        def transform_batch(self, trainer, images, labels, index):
            self._n = len(labels)
            return images, labels, index

        def on_step_end(self, trainer: Trainer, step: int) -> None:
            now = time.perf_counter()
            self.times.append(now)
            self.samples.append(self._n)
            self.threads.append(torch.get_num_threads())  # the count this step ran at
            if args.arrive_at and step == args.arrive_at and self.neighbour is None:
                self.neighbour = subprocess.Popen(NEIGHBOUR)
            if now - self.start > args.max_seconds:
                raise _Stop

    meter = Meter()
    trainer = Trainer(cfg, callbacks=[meter], write=False, quiet=True)
    try:
        trainer.fit()
    except _Stop:
        pass
    finally:
        if meter.neighbour is not None:
            meter.neighbour.kill()
            meter.neighbour.wait()
    n = len(meter.times)
    wall = meter.times[-1] - meter.start if n else float("nan")
    tuner = trainer.thread_tuner
    overhead = tuner.total_overhead_s if tuner is not None else 0.0
    events = [
        {k: e[k] for k in ("step", "threads", "step_s", "stalled", "aborted", "overhead_s", "tune_steps", "reason")}
        for e in trainer.events
        if e["event"] == "threads_tuned"
    ]
    return {
        "mode": args.worker,
        "torch_default_threads": torch_default,
        "steps": n,
        "img_s": sum(meter.samples) / wall if n else float("nan"),
        "wall_s": wall,
        "overhead_s": overhead,
        "overhead_pct": 100 * overhead / wall if n else float("nan"),
        "tune_steps": sum(e["tune_steps"] for e in events),
        "threads_used": sorted(set(meter.threads)),
        "tune_events": events,
        "capped": n < args.steps,
    }


def measure(args: argparse.Namespace, neighbour: str, mode: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--max-seconds",
        str(args.max_seconds),
    ]
    if neighbour == "arrives":
        cmd += ["--arrive-at", str(args.arrive_at)]
    load = os.getloadavg()[0]
    nb = subprocess.Popen(NEIGHBOUR) if neighbour == "busy" else None
    try:
        if nb is not None:
            time.sleep(0.5)
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.max_seconds + 300)
    finally:
        if nb is not None:
            nb.kill()
            nb.wait()
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec.update(neighbour=neighbour, load_before=round(load, 2))
    return rec


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for nb, mode in CONDITIONS:
        rs = [r for r in runs if r["neighbour"] == nb and r["mode"] == mode]
        if not rs:
            continue
        v = [r["img_s"] for r in rs]
        out[f"{nb}/{mode}"] = {
            "median_img_s": statistics.median(v),
            "min_img_s": min(v),
            "max_img_s": max(v),
            "n": len(v),
            "threads": sorted({t for r in rs for t in r["threads_used"]}),
            "median_overhead_s": statistics.median(r["overhead_s"] for r in rs),
            "median_overhead_pct": statistics.median(r["overhead_pct"] for r in rs),
            "max_overhead_pct": max(r["overhead_pct"] for r in rs),
            "retunes": [max(0, len(r["tune_events"]) - 1) for r in rs],
            "capped": sum(r["capped"] for r in rs),
        }
    return out


def _event(e: dict) -> str:
    medians = ", ".join(
        f"{n} thr {t:.3f} s" + (" (cut)" if int(n) in e["aborted"] else "") for n, t in e["step_s"].items()
    )
    stalled = "".join(f", {n} thr stalled" for n in e["stalled"])
    return (
        f"step {e['step']} {e['reason']}: {medians}{stalled} -> {e['threads']} thr "
        f"({e['tune_steps']} steps, overhead {e['overhead_s']:.3f} s)"
    )


def _tune_lines(runs: list[dict]) -> list[str]:
    """One line per auto run: each tune, when, why, the per-count medians and what it cost."""
    return [
        f"- {r['neighbour']}/auto round {r['round']}: " + "; ".join(_event(e) for e in r["tune_events"])
        for r in runs
        if r["mode"] == "auto"
    ]


def report(args: dict, runs: list[dict], cpu_count: int | None) -> tuple[str, dict]:
    """The markdown and the JSON payload for a finished set of runs."""
    summary = summarize(runs)
    default_threads = runs[0]["torch_default_threads"]

    def med(key: str) -> float:
        return summary[key]["median_img_s"] if key in summary else float("nan")

    ratios = {f"auto/default ({nb})": med(f"{nb}/auto") / med(f"{nb}/default") for nb in ("none", "busy", "arrives")}
    slowdown = {f"{mode}: none/busy": med(f"none/{mode}") / med(f"busy/{mode}") for mode in ("default", "auto")}
    rows = [
        [
            k,
            f"{s['median_img_s']:.1f}",
            f"{s['min_img_s']:.1f} - {s['max_img_s']:.1f}",
            s["n"],
            ", ".join(map(str, s["threads"])),
            f"{s['median_overhead_s']:.3f}",
            f"{s['median_overhead_pct']:.2f} (max {s['max_overhead_pct']:.2f})",
            ",".join(map(str, s["retunes"])),
            s["capped"],
        ]
        for k, s in summary.items()
    ]
    table = md_table(
        [
            "neighbour/threads",
            "img/s (median)",
            "range",
            "runs",
            "threads used",
            "tuning overhead s",
            "overhead % of run",
            "re-tunes per run",
            "runs capped",
        ],
        rows,
    )
    cmd = (
        "python benchmarks/threads.py"
        + (" --quick" if args["quick"] else "")
        + ("" if args["steps"] == 150 or args["quick"] else f" --steps {args['steps']}")
        + ("" if args["rounds"] == 3 or args["quick"] else f" --rounds {args['rounds']}")
    )
    tunes = _tune_lines(runs)
    md = "\n".join(
        [
            "# Thread count under a busy neighbour: torch default vs `train.threads: auto`",
            "",
            f"Command: `{cmd}` (from the repository root; {args['rounds']} rounds, interleaved).",
            "",
            (
                f"Machine: {cpu_count} CPUs, torch default threads in a fresh process: {default_threads}. "
                "Measured with lotus' own Trainer (`configs/digits_preln.yaml`: lotus_vit_tiny 16 px, batch 64) for "
                f"{args['steps']} steps or {args['max_seconds']:.0f} s of steps, whichever comes first ('runs "
                "capped'); "
                "`auto` = `train.threads: auto` (the Trainer's ThreadTuner on the real steps), `default` = "
                '`train.threads: null`. Busy neighbour = one `python -c "while True: pass"` process; '
                "'arrives' = it starts at step "
                f"{args['arrive_at']}."
            ),
            "",
            table,
            "",
            md_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in {**ratios, **slowdown}.items()]),
            "",
            (
                "img/s: samples of all steps over the wall time from fit start to the last step (tuning included). "
                "Tuning overhead: the tuner's estimate (extra time of the steps at slower counts + stall checks), "
                "as a % of that wall time; target <= 2 %. The machine is shared, so other processes add noise to "
                "every condition."
            ),
            "",
            "Tunes (`threads_tuned` events of the auto runs):",
            "",
            *(tunes or ["- none"]),
            *(["", f"Note: {args['note']}"] if args.get("note") else []),
        ]
    )
    payload = {
        "args": args,
        "command": cmd,
        "method": "lotus Trainer (configs/digits_preln.yaml), train.threads auto vs null",
        "summary": summary,
        "ratios": ratios,
        "slowdown_from_neighbour": slowdown,
        "runs": runs,
    }
    return md, payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits_preln.yaml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=45.0, help="cap on one measurement's timed steps")
    ap.add_argument("--arrive-at", type=int, default=30, help="step at which the 'arrives' neighbour starts")
    add_harness_args(ap, "threads", quick="smoke run: 40 steps, 1 round")
    ap.add_argument("--note", help="a remark to print under the results (kept in the JSON)")
    ap.add_argument("--render", metavar="JSON", help="re-write the report from a saved threads.json (no runs)")
    ap.add_argument("--worker", choices=["default", "auto"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        if args.note:
            saved["args"]["note"] = args.note
        md, payload = report(saved["args"], saved["runs"], saved["machine"]["cpu_count"])
        write_results(args.out or args.render, {**payload, "machine": saved["machine"]}, md)
        return
    if args.quick:
        args.steps, args.rounds, args.max_seconds, args.arrive_at = 40, 1, 20.0, 15
    runs: list[dict] = []
    for r in range(args.rounds):
        k = r % len(CONDITIONS)
        for nb, mode in CONDITIONS[k:] + CONDITIONS[:k]:
            rec = measure(args, nb, mode)
            rec["round"] = r
            runs.append(rec)
            print(
                f"round {r} {nb:8s} {mode:8s} {rec['img_s']:8.1f} img/s  threads {rec['threads_used']} "
                f"steps {rec['steps']} tuning {rec['overhead_s']:.3f}s ({rec['overhead_pct']:.2f} %) "
                f"load {rec['load_before']}",
                flush=True,
            )
    md, payload = report(
        {k: v for k, v in args_dict(args).items() if k not in ("worker", "render")}, runs, os.cpu_count()
    )
    write_results(out_path(args), payload, md, quick=args.quick)


if __name__ == "__main__":
    main()
