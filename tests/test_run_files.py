"""Every command that takes --checkpoint takes a run folder too (its best weights, its config.yaml as --config)."""

from __future__ import annotations

import copy
import json

import pytest

from lotus.cli import main
from lotus.config import config_from_dict
from lotus.errors import LotusError
from lotus.run_files import checkpoint_file, run_config
from lotus.training import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import TINY

    d = copy.deepcopy(TINY)
    d["train"]["epochs"] = 1
    d["data"]["limit_train"] = 128
    out = tmp_path_factory.mktemp("r") / "run"
    Trainer(config_from_dict(d), run_dir=str(out), quiet=True).fit()
    return out


def test_resolution_rules(run, tmp_path):
    assert checkpoint_file(str(run)) == str(run / "best.safetensors")
    assert run_config(str(run)) == str(run / "config.yaml") == run_config(str(run / "last.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LotusError, match="--checkpoint: .*empty is a folder without best.safetensors"):
        checkpoint_file(str(tmp_path / "empty"))
    with pytest.raises(LotusError, match="--checkpoint: file not found"):
        checkpoint_file(str(tmp_path / "nope.safetensors"))
    assert run_config(str(tmp_path / "empty")) is None


def test_quantcheck_outliers_prune_take_a_run_folder(run, tmp_path, capsys, one_thread):
    assert (
        main(["quantcheck", "--checkpoint", str(run), "--calib-batches", "1", "--json", str(tmp_path / "q.json")]) == 0
    )
    assert json.loads((tmp_path / "q.json").read_text())["checkpoint"].endswith("best.safetensors")
    assert main(["outliers", "--checkpoint", str(run), "--samples", "16", "--out", str(tmp_path / "o")]) == 0
    assert any(p.name.endswith(".json") for p in (tmp_path / "o").iterdir())
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(run),
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(tmp_path / "p"),
                "--latency-iters",
                "0",
                "--max-eval",
                "32",
            ]
        )
        == 0
    )
    assert (tmp_path / "p" / "model.safetensors").is_file()
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run / "best.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["quantcheck", "--checkpoint", str(lone)]) == 2
    assert "--config: required" in capsys.readouterr().err
