"""One benchmark harness (issue #33, item 5): every script in benchmarks/ that trains or times anything takes
``--quick`` and ``--out`` (and ``--seeds`` where seeds apply) and writes through ``benchmarks/_common.py``."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HELPERS = {"_common.py", "pruning_common.py", "lotus_schedule_report.py"}  # imported by the scripts, not run
DATA_MAKERS = {"make_shapes.py", "make_textures.py"}  # write image folders: neither train nor time anything
# not yet on the harness (none left; a script added here is skipped by the checks below)
PENDING: set[str] = set()
SEEDED = {
    "default_config.py",
    "lotus_distributed.py",
    "lotus_real.py",
    "lotus_schedule.py",
    "outliers.py",
    "pruning_issp.py",
    "pruning_vs_torch_pruning.py",
    "recipes_digits.py",
    "tickets_balance.py",
    "tickets_dynamic.py",
    "tickets_patches.py",
    "tickets_quality.py",
}
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS | DATA_MAKERS | PENDING)

# every script's --help in one interpreter: torch (which several scripts import at the top) loads once
_HELP = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys
    out = {}
    for name in sys.argv[1:]:
        path = os.path.join("benchmarks", name)
        buf, saved = io.StringIO(), list(sys.path)
        sys.argv = [path, "--help"]
        code = None
        with contextlib.redirect_stdout(buf):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                code = e.code
        sys.path[:] = saved
        out[name] = {"code": code, "help": buf.getvalue()}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def helps() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OUT": ""}
    r = subprocess.run(
        [sys.executable, "-c", _HELP, *SCRIPTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_script_lists_name_real_files():
    names = {p.name for p in BENCH.glob("*.py")}
    assert (HELPERS | DATA_MAKERS | PENDING | SEEDED) <= names
    assert len(SCRIPTS) >= 18


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_takes_the_harness_flags(helps, name):
    got = helps[name]
    assert got["code"] in (0, None), f"{name} --help exited with {got['code']}"
    text = got["help"]
    assert re.search(r"^\s+--quick\b", text, re.M), f"{name}: no --quick"
    assert re.search(r"^\s+--out \S+", text, re.M), f"{name}: no --out PATH"
    if name in SEEDED or "--seeds" in text:  # a list of seeds, as the harness takes them
        assert re.search(r"^\s+--seeds (\S+) \[\1 \.\.\.\]", text, re.M), f"{name}: no --seeds SEED [SEED ...]"


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n != "lotus_real.py"])
def test_script_writes_through_the_harness(name):
    """Results go through _common.write_results; no script keeps its own writer or statistics copy."""
    src = (BENCH / name).read_text()
    assert "write_results(" in src or "memory_plan.main(" in src, f"{name}: does not call write_results"
    assert not re.search(r"\.write_text\(|json\.dump\(", src), f"{name}: writes a results file itself"
    assert "def mean_std" not in src, f"{name}: a copy of lotus.bench.seed_stats / mean_std"


def test_out_path_and_write_results(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_harness_args, out_path, write_results

    p = argparse.ArgumentParser()
    add_harness_args(p, "demo", seeds=[0, 1])
    assert out_path(p.parse_args([])) == os.path.join("benchmarks", "results", "demo")
    assert out_path(p.parse_args(["--quick"])) == os.path.join("benchmarks", "results", "quick", "demo")
    assert out_path(p.parse_args(["--out", str(tmp_path / "x.json")])) == str(tmp_path / "x")
    assert out_path(p.parse_args(["--out", str(tmp_path)])) == str(tmp_path / "demo")
    assert p.parse_args(["--seeds", "3", "4"]).seeds == [3, 4]
    paths = write_results(str(tmp_path / "r.json"), {"value": 1.5}, "| a |\n|---|\n| 1 |", quick=True, echo=False)
    data = json.loads(Path(paths["json"]).read_text())
    assert data["value"] == 1.5 and data["quick"] is True and data["machine"]["cpu_count"]
    assert Path(paths["md"]).read_text().startswith("| a |") and "--quick" in Path(paths["md"]).read_text()
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]  # no temp file left
