"""Random-subset baselines: RS2 without replacement and a fixed stratified subset, in the library and in training."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from data_tickets.random_subsets import fixed_subset, rs2_subset
from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.training import Trainer


def test_rs2_sees_every_sample_once_before_any_twice():
    n, frac = 103, 0.3
    draws = [rs2_subset(n, frac, e, seed=4) for e in range(7)]
    assert all(len(x) == 31 for x in draws[:3])
    first = np.concatenate(draws[:3])
    assert len(np.unique(first)) == len(first)  # the first 93 draws are distinct
    counts = np.bincount(np.concatenate(draws), minlength=n)
    assert counts.min() >= 2 and counts.max() <= 3  # 7 x 31 = 217 = 2 full passes + 11
    assert not np.array_equal(draws[0], rs2_subset(n, frac, 0, seed=5))
    assert np.array_equal(draws[4], rs2_subset(n, frac, 4, seed=4))  # a pure function: resume draws the same


def test_fixed_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    s = fixed_subset(len(labels), 0.5, seed=1, labels=labels)
    assert len(s) == 50 and np.bincount(labels[s]).tolist() == [20, 15, 10, 5]
    assert np.array_equal(s, fixed_subset(len(labels), 0.5, seed=1, labels=labels))
    with pytest.raises(ValueError, match="fraction"):
        fixed_subset(10, 0.0)


@pytest.mark.parametrize("mode", ["rs2", "fixed"])
def test_training_on_random_subsets(tmp_path, tiny_cfg_dict, mode):
    d = copy.deepcopy(tiny_cfg_dict)
    d["data"]["limit_train"] = 200
    d["train"]["epochs"] = 2
    d["tickets"] = {"random": {"enabled": True, "mode": mode, "fraction": 0.25}}
    run = tmp_path / "run"
    Trainer(config_from_dict(d), run_dir=str(run), quiet=True).fit()
    eps = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "epoch"]
    assert [e["epoch_samples"] for e in eps] == [50, 50]
    d["tickets"]["file"] = "t.npz"
    with pytest.raises(ConfigError, match="tickets.random.enabled: a random subset replaces tickets.file"):
        config_from_dict(d)
