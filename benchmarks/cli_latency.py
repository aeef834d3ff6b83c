"""How fast the CLI answers when no model is needed: ``lotus --help``, ``lotus train --help`` and config errors.

Each case is a fresh ``lotus`` process (the console script, else ``python -m lotus``), timed from start to exit;
the median of ``--repeats`` runs is reported with the range, beside a bare ``python -c pass`` and one
``python -c "import torch, timm"`` for scale. The target (issue #33): ``lotus --help`` and a config error in
under 1 s on a quiet machine. The load average at the start and end says how quiet the machine was.

  python benchmarks/cli_latency.py            # 5 runs per case -> benchmarks/results/cli_latency.{json,md}
  python benchmarks/cli_latency.py --quick    # 2 runs per case
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, add_harness_args, md_table, out_path, write_results  # noqa: E402

TARGET_S = 1.0
BAD_CONFIGS = {  # name -> (YAML text, the exit code and the text the error line must contain)
    "YAML syntax error": ("model: [\n", "not valid YAML"),
    "unknown key": ("train:\n  epoch: 3\n", "train.epoch"),
    "wrong type": ("train:\n  epochs: ten\n", "train.epochs"),
}


def _lotus() -> list[str]:
    exe = shutil.which("lotus")
    return [exe] if exe else [sys.executable, "-m", "lotus"]


def _time(cmd: list[str], repeats: int, code: int, needle: str | None) -> dict:
    """Median / min / max wall seconds of ``repeats`` runs of ``cmd``; each must exit ``code`` (and say ``needle``)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != code or (needle and needle not in r.stdout + r.stderr):
            raise SystemExit(f"error: {' '.join(cmd)} exited {r.returncode} (expected {code}): {r.stderr[-500:]}")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per case (default 5; the median is reported)")
    add_harness_args(p, "cli_latency", quick="smoke run: 2 runs per case")
    args = p.parse_args()
    repeats = 2 if args.quick else args.repeats
    lotus = _lotus()
    load_start = os.getloadavg()[0]
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            "python -c pass (interpreter start-up)": ([sys.executable, "-c", "pass"], 0, None),
            "python -c 'import torch, timm' (for scale, 1 run)": (
                [sys.executable, "-c", "import torch, timm"],
                0,
                None,
            ),
            "lotus --help": (lotus + ["--help"], 0, "usage: lotus"),
            "lotus train --help": (lotus + ["train", "--help"], 0, "usage: lotus train"),
        }
        for name, (text, needle) in BAD_CONFIGS.items():
            path = os.path.join(tmp, name.replace(" ", "_") + ".yaml")
            with open(path, "w") as f:
                f.write(text)
            cmds[f"lotus train --config <{name}>"] = (lotus + ["train", "--config", path], 2, needle)
        cmds["lotus train --config <missing file>"] = (
            lotus + ["train", "--config", os.path.join(tmp, "no.yaml")],
            2,
            "config file not found",
        )
        for name, (cmd, code, needle) in cmds.items():
            cases[name] = _time(cmd, 1 if "1 run" in name else repeats, code, needle)
            print(f"{name}: median {cases[name]['median_s']:.3f} s", flush=True)
    load_end = os.getloadavg()[0]
    judged = [n for n in cases if n.startswith("lotus")]
    met = all(cases[n]["median_s"] < TARGET_S for n in judged)
    rows = [
        [
            n,
            f"{c['median_s']:.3f}",
            f"{c['min_s']:.3f} - {c['max_s']:.3f}",
            ("yes" if c["median_s"] < TARGET_S else "NO") if n in judged else "-",
        ]
        for n, c in cases.items()
    ]
    md = "\n".join(
        [
            "# CLI latency: answers that need no model",
            "",
            f"`python benchmarks/cli_latency.py{' --quick' if args.quick else ''}`: each case a fresh "
            "process, median of "
            f"{repeats} runs; target < {TARGET_S:g} s for every `lotus` case. {os.cpu_count()} CPUs, load "
            "average (1 min) "
            f"{load_start:.2f} at the start, {load_end:.2f} at the end (above the CPU count: other jobs "
            "shared the cores).",
            "",
            md_table(["case", "median s", "range s", f"< {TARGET_S:g} s"], rows),
            "",
            f"Target met: **{'yes' if met else 'NO'}**.",
        ]
    )
    write_results(
        out_path(args),
        {
            "repeats": repeats,
            "command": lotus,
            "load_start": load_start,
            "load_end": load_end,
            "target_s": TARGET_S,
            "target_met": met,
            "cases": cases,
        },
        md,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
