"""benchmarks/outliers.py: the goal check and re-rendering a stored result (no training)."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "outliers.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("outliers_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mean(acc, peak, end, drop):
    return {"val_acc": acc, "kurtosis_peak": peak, "kurtosis_max": end, "int8_drop_pp": drop, "int8_logit_err": 0.01}


def test_goal_needs_ratio_equal_accuracy_and_smaller_int8_drop(bench):
    ok = bench.goal({"Pre-LN+AdamW": _mean(0.990, 20.0, 15.0, 1.0), "OP+SOAP": _mean(0.995, 1.9, 1.5, 0.1)})
    assert ok["met"] and ok["peak_kurtosis_ratio"] == pytest.approx(20 / 1.9)
    assert ok["end_kurtosis_ratio"] == pytest.approx(10.0)
    assert not bench.goal({"Pre-LN+AdamW": _mean(0.90, 20.0, 15.0, 1.0), "OP+SOAP": _mean(0.995, 1.9, 1.5, 0.1)})["met"]
    assert not bench.goal({"Pre-LN+AdamW": _mean(0.99, 9.0, 9.0, 1.0), "OP+SOAP": _mean(0.99, 1.0, 1.0, 0.1)})["met"]
    assert not bench.goal({"Pre-LN+AdamW": _mean(0.99, 20.0, 9.0, 0.1), "OP+SOAP": _mean(0.99, 1.0, 1.0, 0.1)})["met"]
    assert bench.goal({"OP+SOAP": _mean(0.99, 1.0, 1.0, 0.0)}) == {}


def test_recipe_epochs(bench):
    class A:
        provoke_epochs_factor, long_epochs = 2.0, 300

    assert [bench.recipe_epochs(r, 15, A) for r in ("default", "provoke", "long")] == [15, 30, 300]


def test_render_rewrites_markdown_and_rejects_bad_json(bench, tmp_path, capsys):
    run = {
        "val_acc": 0.99,
        "kurtosis_max": 5.0,
        "kurtosis_mean": 3.0,
        "kurtosis_peak": 6.0,
        "mmr_max": 8.0,
        "int8_drop_pp": 0.1,
        "int8_logit_err": 0.013,
        "probe_fraction": 0.02,
    }
    op = {**run, "kurtosis_max": 1.25, "kurtosis_peak": 2.0, "int8_drop_pp": 0.0}
    res = {
        "seeds": [0],
        "base": "configs/digits.yaml",
        "epochs": 40,
        "threads": 1,
        "every_n_steps": 50,
        "recipes": {
            "long": {
                "epochs": 300,
                "runs": {"Pre-LN+AdamW": [run], "OP+SOAP": [op]},
                "mean": {"Pre-LN+AdamW": run, "OP+SOAP": op},
            }
        },
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    assert bench.render(str(path)) == 0
    md = (tmp_path / "r.md").read_text()
    assert "**3.0x** (goal >= 10x; 4.0x at the end of training)" in md
    assert "| Pre-LN+AdamW | 99.00 |" in md
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench.render(str(bad)) == 2
    assert "--render" in capsys.readouterr().err
    assert not (tmp_path / "bad.md").exists()
