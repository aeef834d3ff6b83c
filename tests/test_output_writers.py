"""Every command that writes a user-visible output (select, export, prune, bench, report) holds a lock on it or
creates it exclusively: two commands on one output never both succeed, and the loser says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lotus.cli import main
from lotus.config import config_from_dict
from lotus.models import create_model
from lotus.safe_io import output_lock
from lotus.training.run_dir import RunDir
from lotus.weights import save_weights


@pytest.fixture
def cfg_yaml(tiny_cfg_dict, tmp_path):
    tiny_cfg_dict["data"]["limit_train"] = 64
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return path


@pytest.fixture
def weights(tiny_cfg_dict, tmp_path):
    mcfg = config_from_dict(tiny_cfg_dict).model
    path = tmp_path / "w.safetensors"
    save_weights(create_model(mcfg, 10, 1), path, model_cfg=mcfg)
    return path


def _error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _busy(out) -> str:
    return f"error: --out: {os.path.abspath(out)} is in use by another Lotus process (pid {os.getpid()})"


def _select(cfg_yaml, out) -> list[str]:
    return [
        "select",
        "--config",
        str(cfg_yaml),
        "--policy",
        "random",
        "--fraction",
        "0.5",
        "--out",
        str(out),
        "--quiet",
    ]


def test_select_refuses_an_out_another_process_writes(cfg_yaml, tmp_path, capsys):
    out = tmp_path / "t.npz"
    with output_lock(out, "--out"):
        assert main(_select(cfg_yaml, out)) == 2
        assert _error(capsys).startswith(_busy(out))
    assert not out.exists()
    assert main(_select(cfg_yaml, out)) == 0 and out.is_file()
    assert sorted(os.listdir(tmp_path)) == ["t.npz", "tiny.yaml"]  # no lock or temp file left


def test_two_selects_at_once_one_wins(cfg_yaml, tmp_path):
    out = tmp_path / "t.npz"
    cmd = [sys.executable, "-m", "lotus", *_select(cfg_yaml, out)]
    procs = [
        subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip()
    assert loser.startswith("error: --out: ") and "\n" not in loser, loser
    assert sorted(os.listdir(tmp_path)) == ["t.npz", "tiny.yaml"]


def test_export_names_out_when_it_cannot_be_written(weights, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", str(weights), "--out", str(afile / "exp")]) == 2
    assert _error(capsys).startswith(
        f"error: --out: cannot write {afile / 'exp'}: a part of its path is a file, not a folder"
    )


def test_export_locks_refuses_symlinks_and_clears_its_own_temps(weights, tmp_path, capsys):
    out = tmp_path / "exp"
    with output_lock(out, "--out"):
        assert main(["export", str(weights), "--out", str(out)]) == 2
        assert _error(capsys).startswith(_busy(out))
    os.makedirs(tmp_path / ".lotus-tmp-exp-killed")  # what a killed export to exp left
    os.makedirs(tmp_path / ".lotus-tmp-other-killed")  # another output's: not ours to remove
    assert main(["export", str(weights), "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == [".lotus-tmp-other-killed", "exp", "w.safetensors"]
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    capsys.readouterr()
    assert main(["export", str(weights), "--out", str(tmp_path / "link")]) == 2
    assert _error(capsys).startswith(f"error: --out: {tmp_path / 'link'} is a symbolic link")
    assert os.listdir(tmp_path / "real") == []


def test_prune_and_bench_refuse_an_out_in_use(weights, cfg_yaml, tmp_path, capsys):
    out = tmp_path / "pruned"
    with output_lock(out, "--out"):
        assert main(["prune", "--checkpoint", str(weights), "--method", "magnitude", "--out", str(out)]) == 2
        assert _error(capsys).startswith(_busy(out))
    bench = tmp_path / "bench"
    with output_lock(bench, "--out"):
        assert main(["bench", "--configs", str(cfg_yaml), "--seeds", "1", "--out", str(bench), "--quiet"]) == 2
        assert _error(capsys).startswith(_busy(bench))
    assert not out.exists() and not bench.exists()


def test_report_waits_for_the_run_that_writes_the_folder(tmp_path, capsys):
    run = RunDir(str(tmp_path / "run"))
    run.lock()
    try:
        assert main(["report", run.path]) == 2
        assert _error(capsys).startswith(f"error: output.dir: {run.path} is in use by another Lotus process")
    finally:
        run.unlock()
