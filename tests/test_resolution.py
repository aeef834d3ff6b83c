"""Progressive resolution (``resolution:``): the side schedule, training on fewer tokens early, exact resume,
and composition with random patch tickets and thinning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.features.resolution.schedule import side_at
from lotus.training import Trainer


def test_side_schedule_rises_in_whole_patches_to_full():
    sides = [side_at(e, 12, 28, 4, 0.5, 0.5) for e in range(12)]
    assert sides[0] == 12 and sides[6:] == [28] * 6  # 0.5 x 28 = 14 -> 12 (whole patches); full from epoch 6
    assert sides == sorted(sides) and all(s % 4 == 0 for s in sides)
    assert side_at(0, 10, 30, 4, 0.5, 0.5) == 30  # not a multiple of the patch: never resized
    assert side_at(0, 10, 8, 4, 0.5, 0.5) == 8  # two patches a side is the floor
    assert side_at(0, 10, 32, 4, 0.1, 0.5) == 8  # at least two patches a side
    assert [side_at(e, 4, 16, 4, 0.5, 0.0) for e in range(4)] == [16] * 4  # full_at 0: off


def _cfg(d: dict, epochs: int = 3) -> dict:
    d = copy.deepcopy(d)
    d["model"]["kwargs"] = {"dynamic_img_size": True}
    d["data"]["limit_train"] = 256
    d["train"]["epochs"] = epochs
    d["resolution"] = {"enabled": True, "start": 0.5, "full_at": 0.67}
    return d


def _epochs(run) -> list[dict]:
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "epoch"]


def test_training_starts_on_fewer_tokens_and_resumes_bit_identical(tmp_path, tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict)
    full = tmp_path / "full"
    summary = Trainer(config_from_dict(d), run_dir=str(full), quiet=True).fit()
    eps = _epochs(full)
    assert [e["img_side"] for e in eps] == [8, 12, 16] and [e["tokens"] for e in eps] == [4, 9, 16]
    flops = [eps[0]["train_flops"]] + [b["train_flops"] - a["train_flops"] for a, b in zip(eps, eps[1:])]
    assert flops[0] < 0.5 * flops[2] and flops[1] < flops[2]  # fewer tokens: really cheaper
    assert summary["final_val_acc"] > 0.12  # above chance (0.1), evaluated at full size
    events = [e for e in summary["events"] if e["event"] == "resolution"]
    assert [e["side"] for e in events] == [8, 12, 16] and "from epoch 1" in events[0]["note"]
    part = tmp_path / "part"
    d1 = copy.deepcopy(d)
    d1["train"]["max_steps"] = 8  # 256 / 32: after the first epoch
    Trainer(config_from_dict(d1), run_dir=str(part), quiet=True).fit()
    Trainer(config_from_dict(d), run_dir=str(part), resume=True, quiet=True).fit()
    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_composes_with_random_patches_and_thinning(tmp_path, tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict, epochs=3)
    d["tickets"] = {
        "patches": {"enabled": True, "scorer": "random", "source": "online", "keep_rate": 0.5},
        "dynamic": {"enabled": True, "ratio": 0.5},
    }
    d["pruning"] = {"structured": {"mlp": 0.5, "at_epoch": 1}}
    run = tmp_path / "run"
    summary = Trainer(config_from_dict(d), run_dir=str(run), quiet=True).fit()
    eps = _epochs(run)
    assert [e["img_side"] for e in eps] == [8, 12, 16] and summary["epochs"] == 3
    # patches drop half of the epoch's grid: epoch 1 (4 tokens -> 2 kept) is cheaper than without patches
    plain = tmp_path / "plain"
    d2 = _cfg(tiny_cfg_dict, epochs=1)
    Trainer(config_from_dict(d2), run_dir=str(plain), quiet=True).fit()
    per_sample = lambda e: e["train_flops"] / e["epoch_samples"]  # noqa: E731
    assert per_sample(eps[0]) < per_sample(_epochs(plain)[0])


def test_needs_dynamic_img_size(tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict)
    d["model"]["kwargs"] = {}
    with pytest.raises(ConfigError, match="resolution.enabled: needs model.kwargs.dynamic_img_size: true"):
        config_from_dict(d)
    d = _cfg(tiny_cfg_dict)
    d["tickets"] = {"patches": {"enabled": True, "scorer": "cls_attention"}}
    from lotus.errors import LotusError

    with pytest.raises(
        LotusError, match="tickets.patches: models built with dynamic_img_size train only with scorer: random"
    ):
        Trainer(config_from_dict(d), write=False, quiet=True).fit()
