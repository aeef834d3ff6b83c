"""Training throughput of the default config with and without a busy neighbour: torch's default threads vs ``auto``.

Each measurement is a fresh process running lotus' own Trainer on ``configs/digits_preln.yaml`` (lotus_vit_tiny at
16 px, batch 64, augmentation on) for ``--steps`` optimiser steps (or until ``--max-seconds``), with
``train.eval_every`` raised so no evaluation falls inside the timed steps. Conditions, interleaved and repeated
``--rounds`` times (the order rotates each round):

* neighbour: ``none``; ``busy`` (a separate ``python -c "while True: pass"`` spinning one core, started before
  the measurement, killed after it); ``arrives`` (the same neighbour started by the worker after
  ``--arrive-at`` steps: exercises the re-check);
* threads: ``default`` (torch's default thread count of a fresh process, ``train.threads`` unset) or ``auto``
  (a callback does what the Trainer integration will do: in ``on_fit_start`` :class:`ThreadTuner` probes
  forward+backward of a deep copy of the model on a fixed batch and sets the thread count; every step's wall
  time goes to ``tuner.observe``, and a flag triggers a re-tune).

img/s counts the samples of steps 2..N over the wall time from the end of step 1 to the end of step N
(re-tunes included, the start-up tune excluded and reported separately as ``tune_s``).

    python benchmarks/threads.py            # full: 150 steps, 3 rounds (~10 minutes on 2 cores)
    python benchmarks/threads.py --quick    # smoke run: 12 steps, 1 round (written under benchmarks/results/quick/)
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
    from lotus.training.threads import ThreadTuner, probe_step_fn

    torch_default = torch.get_num_threads()
    cfg = load_config(args.config, [f"train.max_steps={args.steps}", "train.eval_every=100000", "train.device=cpu"])
    auto = args.worker == "auto"

    class Meter(Callback):
        def __init__(self) -> None:
            self.tuner = ThreadTuner() if auto else None
            self.times: list[float] = []
            self.samples: list[int] = []
            self.threads: list[int] = []
            self.events: list[dict] = []
            self.neighbour: subprocess.Popen | None = None
            self.tune_s = 0.0

        def _tune(self, trainer: Trainer) -> None:
            idx = torch.arange(cfg.data.batch_size)
            x, y = trainer.train_set.get_batch(idx)[:2]
            self.tuner.tune(probe_step_fn(trainer.unwrapped_model, x, y, autocast=trainer.autocast))
            self.events.append({"step": trainer.step, **self.tuner.describe()})

        def on_fit_start(self, trainer: Trainer) -> None:
            t0 = time.perf_counter()
            if self.tuner is not None:
                self._tune(trainer)
            self.prev = time.perf_counter()
            self.tune_s = self.prev - t0
            self._n = 0

        def transform_batch(self, trainer, images, labels, index):
            self._n = len(labels)
            return images, labels, index

        def on_step_end(self, trainer: Trainer, step: int) -> None:
            now = time.perf_counter()
            self.times.append(now)
            self.samples.append(self._n)
            self.threads.append(torch.get_num_threads())
            dt, self.prev = now - self.prev, now
            if args.arrive_at and step == args.arrive_at and self.neighbour is None:
                self.neighbour = subprocess.Popen(NEIGHBOUR)
            if self.tuner is not None and self.tuner.observe(dt):
                reason = self.tuner.reason
                self._tune(trainer)
                self.events[-1]["reason"] = reason
                self.prev = time.perf_counter()  # the re-tune is in the wall time, not in the next step's dt
            if now - self.times[0] > args.max_seconds:
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
    wall = meter.times[-1] - meter.times[0] if n > 1 else float("nan")
    return {
        "mode": args.worker,
        "torch_default_threads": torch_default,
        "steps": n,
        "img_s": sum(meter.samples[1:]) / wall if n > 1 else float("nan"),
        "wall_s": wall,
        "tune_s": meter.tune_s,
        "threads_used": sorted(set(meter.threads)),
        "tune_events": meter.events,
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
            "median_tune_s": statistics.median(r["tune_s"] for r in rs),
            "retunes": [max(0, len(r["tune_events"]) - 1) for r in rs],
            "capped": sum(r["capped"] for r in rs),
        }
    return out


def _retune_lines(runs: list[dict]) -> list[str]:
    """One line per auto run that re-tuned: when, why, to what, and the probe timings behind it."""
    lines = []
    for r in runs:
        for e in r["tune_events"][1:] if r["mode"] == "auto" else []:
            probe = ", ".join(
                f"{n} thr {t:.3f} s" + (" (cut short)" if int(n) in e["aborted"] else "")
                for n, t in e["probe_s"].items()
            )
            first = ", ".join(f"{n} thr {t:.3f} s" for n, t in r["tune_events"][0]["probe_s"].items())
            lines.append(
                f"- {r['neighbour']}/auto round {r['round']}: start probe {first} -> "
                f"{r['tune_events'][0]['threads']} thr; step {e['step']} {e['reason']}: probe {probe} "
                f"-> {e['threads']} thr"
            )
    return lines


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
            f"{s['median_tune_s']:.2f}",
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
            "tune s",
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
    retunes = _retune_lines(runs)
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
                "`auto` = ThreadTuner in a callback (start-up probe + observe/re-tune), `default` = `train.threads` "
                "unset. Busy neighbour = one `python -c \"while True: pass\"` process; 'arrives' = it starts at step "
                f"{args['arrive_at']}."
            ),
            "",
            table,
            "",
            md_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in {**ratios, **slowdown}.items()]),
            "",
            (
                "img/s: samples of steps 2..N over the wall time of those steps (re-tunes included); 'tune s' is the "
                "start-up probe, not in img/s. The machine is shared, so other processes add noise to every condition."
            ),
            "",
            "Re-tunes triggered by `observe()` (auto runs):",
            "",
            *(retunes or ["- none"]),
            *(["", f"Note: {args['note']}"] if args.get("note") else []),
        ]
    )
    payload = {
        "args": args,
        "command": cmd,
        "method": "lotus Trainer (configs/digits_preln.yaml) with a ThreadTuner callback for auto",
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
    add_harness_args(ap, "threads", quick="smoke run: 12 steps, 1 round")
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
        args.steps, args.rounds, args.max_seconds, args.arrive_at = 12, 1, 10.0, 4
    runs: list[dict] = []
    for r in range(args.rounds):
        k = r % len(CONDITIONS)
        for nb, mode in CONDITIONS[k:] + CONDITIONS[:k]:
            rec = measure(args, nb, mode)
            rec["round"] = r
            runs.append(rec)
            print(
                f"round {r} {nb:8s} {mode:8s} {rec['img_s']:8.1f} img/s  threads {rec['threads_used']} "
                f"steps {rec['steps']} tune {rec['tune_s']:.2f}s load {rec['load_before']}",
                flush=True,
            )
    md, payload = report(
        {k: v for k, v in args_dict(args).items() if k not in ("worker", "render")}, runs, os.cpu_count()
    )
    write_results(out_path(args), payload, md, quick=args.quick)


if __name__ == "__main__":
    main()
