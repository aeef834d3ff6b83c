"""``parallel.mode: auto``: a resumed run keeps the per-block plan it was saved under (solving again would
time the blocks afresh and could choose another plan), unless the world size, batch size or budget changed."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lotus.parallel.apply as apply_mod
from lotus.config import config_from_dict
from lotus.parallel.apply import get_plan
from lotus.training import Trainer


def _auto(tiny_cfg_dict: dict) -> dict:
    d = copy.deepcopy(tiny_cfg_dict)
    d["data"]["limit_train"] = 128
    d["parallel"] = {"mode": "auto", "memory_budget": "1GiB"}
    return d


def _memories(model) -> list[str]:
    return [c.memory for c in get_plan(model).blocks]


@pytest.fixture
def scripted_planner(monkeypatch):
    """Plans from the real solver, or (``box["force"]``) every block on ``box["force"]``."""
    real, box = apply_mod.make_plan, {"force": None}

    def plan(*args, **kwargs):
        p = real(*args, **kwargs)
        if box["force"] is not None:
            p = dataclasses.replace(p, blocks=[dataclasses.replace(c, memory=box["force"]) for c in p.blocks])
        return p

    monkeypatch.setattr(apply_mod, "make_plan", plan)
    return box


def test_resume_keeps_the_saved_plan(tmp_path, tiny_cfg_dict, scripted_planner, one_thread):
    d = _auto(tiny_cfg_dict)
    scripted_planner["force"] = "full"
    first_cfg = copy.deepcopy(d)
    first_cfg["train"]["max_steps"] = 4  # stops inside epoch 1
    first = Trainer(config_from_dict(first_cfg), run_dir=str(tmp_path / "run"), quiet=True)
    first.fit()
    assert _memories(first.model) == ["full"] * len(first.unwrapped_model.blocks)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert [b["memory"] for b in state["parallel_plan"]["blocks"]] == _memories(first.model)
    # the solver would now choose otherwise; the resumed run keeps its plan to the end
    scripted_planner["force"] = "selective"
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), resume=True, quiet=True)
    summary = resumed.fit()
    assert summary["epochs"] == 2 and _memories(resumed.model) == _memories(first.model)
    fresh = Trainer(config_from_dict(d), run_dir=str(tmp_path / "fresh"), quiet=True)
    fresh.fit()
    assert set(_memories(fresh.model)) == {"selective"}  # what re-solving would have picked


def test_resume_with_another_batch_size_plans_again(tmp_path, tiny_cfg_dict, scripted_planner, one_thread):
    d = _auto(tiny_cfg_dict)
    scripted_planner["force"] = "full"
    first_cfg = copy.deepcopy(d)
    first_cfg["train"]["max_steps"] = 4
    Trainer(config_from_dict(first_cfg), run_dir=str(tmp_path / "run"), quiet=True).fit()
    scripted_planner["force"] = "selective"
    d["data"]["batch_size"] = 16  # the saved plan was made for 32 per rank
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), resume=True, quiet=True)
    resumed.fit()
    assert set(_memories(resumed.model)) == {"selective"}
