"""Dynamic data rules (data_tickets.rules): the registry, the built-in rules behind the one interface, and a new
rule added from this file alone (class + register_rule) that trains a tiny lotus run."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_tickets import DynamicPruner, TicketFile
from data_tickets.random_subsets import fixed_subset, rs2_subset
from data_tickets.rules import RULES, DataRule, RulePlan, RuleState, get_rule, make_rule, register_rule, rule_names
from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.features.schedule.phases import Schedule
from lotus.parallel.compat import check_compat
from lotus.training import Trainer


class EveryOther(DataRule):
    """Keep every other pool sample (the half alternates by epoch) at loss weight 2; counts observed losses."""

    def __init__(self, num_samples: int, **common) -> None:
        super().__init__(num_samples, **common)
        self.observed = 0

    def epoch_plan(self, epoch: int, pool: np.ndarray, state: RuleState) -> RulePlan:
        weights = np.ones(state.num_samples, dtype=np.float32)
        kept = pool if state.annealing else pool[epoch % 2 :: 2]
        if not state.annealing:
            weights[kept] = 2.0
        stats = {"pool": int(pool.size), "kept": int(kept.size), "pruned": int(pool.size - kept.size)}
        return RulePlan(kept, weights, {**stats, "weight": 1.0 if state.annealing else 2.0})

    def observe(self, indices: np.ndarray, losses: np.ndarray) -> None:
        self.observed += int(len(indices))

    def state_dict(self) -> dict:
        return {"observed": self.observed}

    def load_state_dict(self, state: dict) -> None:
        self.observed = int(state["observed"])


@pytest.fixture
def toy_rule():
    """``EveryOther`` registered as ``toy`` for the test only."""
    register_rule("toy")(EveryOther)
    yield "toy"
    RULES.pop("toy", None)


def test_registry_lists_the_built_in_rules_and_names_the_choices():
    assert {"infobatch", "rs2", "fixed"} <= set(rule_names())
    with pytest.raises(ValueError, match="unknown data rule 'nope'; registered: .*infobatch"):
        get_rule("nope")
    with pytest.raises(TypeError):
        register_rule("bad")(int)
    assert DynamicPruner(10).rule.name == "infobatch"  # the default rule


def test_random_rules_over_the_whole_data_draw_the_subset_functions():
    n, labels = 120, np.repeat(np.arange(4), 30)
    rs2 = make_rule("rs2", n, seed=3, fraction=0.25)
    fixed = make_rule("fixed", n, seed=3, fraction=0.25, labels=labels)
    for epoch in range(5):
        plan = rs2.epoch_plan(epoch, np.arange(n), RuleState.empty(n))
        assert np.array_equal(plan.indices, rs2_subset(n, 0.25, epoch, 3)) and plan.weights.min() == 1.0
        assert np.array_equal(
            fixed.epoch_plan(epoch, np.arange(n), RuleState.empty(n)).indices, fixed_subset(n, 0.25, 3, labels)
        )
    pool = np.arange(0, n, 3)  # within a pool: the same share of the pool
    assert set(rs2.epoch_plan(0, pool, RuleState.empty(n)).indices) <= set(pool)
    annealing = RuleState(np.zeros(n, np.float32), np.zeros(n, bool), annealing=True)
    assert np.array_equal(rs2.epoch_plan(0, pool, annealing).indices, pool)
    assert make_rule("rs2", n, ratio=0.75).fraction == 0.25  # the strength knob: the share skipped


def test_a_rule_drives_the_sampler_weights_and_resume(toy_rule):
    p = DynamicPruner(10, num_epochs=4, anneal=0.25, shuffle=False, rule=toy_rule)
    p.set_epoch(1)
    assert list(p) == [1, 3, 5, 7, 9] and p.weights([1, 2]).tolist() == [2.0, 1.0]
    out = p.reweight(torch.ones(3), torch.tensor([1, 3, 5]))
    assert out.tolist() == [2.0, 2.0, 2.0] and p.rule.observed == 3
    state = p.state_dict()
    assert state["rule"] == "toy" and state["rule_state"] == {"observed": 3}
    q = DynamicPruner(10, rule=toy_rule)
    q.load_state_dict(state)
    assert q.rule.observed == 3 and q.num_epochs == 4 and list(q) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="saved with rule 'toy', this pruner uses 'infobatch'"):
        DynamicPruner(10).load_state_dict(state)
    q.set_epoch(3)  # the anneal: the whole pool
    assert len(q) == 10 and q.stats["annealing"] is True and q.weights([1]).tolist() == [1.0]
    assert q.to_ticket().policy == "toy"


def test_a_rule_registered_here_trains_a_tiny_run(tmp_path, tiny_cfg_dict, toy_rule):
    d = copy.deepcopy(tiny_cfg_dict)
    d["data"]["limit_train"] = 200
    d["train"]["epochs"] = 2
    d["tickets"] = {"dynamic": {"enabled": True, "rule": toy_rule, "anneal": 0.0, "export_ticket": True}}
    run = tmp_path / "run"
    summary = Trainer(config_from_dict(d), run_dir=str(run), quiet=True).fit()
    eps = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "epoch"]
    assert [e["epoch_samples"] for e in eps] == [100, 100]
    assert [e["dyn_weight"] for e in eps] == [2.0, 2.0]
    assert summary["dynamic_pruning"]["rule"] == "toy" and summary["dynamic_pruning"]["pruned_total"] == 200
    ticket = TicketFile.load(run / "dynamic_ticket.npz")
    assert ticket.policy == "toy" and ticket.extra["dynamic"]["rule"] == "toy"


def test_config_names_unknown_rules_and_distributed_ones(tiny_cfg_dict):
    d = copy.deepcopy(tiny_cfg_dict)
    d["tickets"] = {"dynamic": {"enabled": True, "rule": "nope"}}
    with pytest.raises(ConfigError, match=r"^tickets\.dynamic\.rule: unknown data rule 'nope'; expected one of: "):
        config_from_dict(d)
    d["tickets"]["dynamic"]["rule"] = "rs2"  # no drop_candidates: schedule.mode: auto has nothing to move
    d["train"]["epochs"] = 8
    d["schedule"] = {"mode": "auto"}
    with pytest.raises(ConfigError, match="tickets.dynamic.rule: schedule.mode: auto moves the ratio"):
        Schedule(config_from_dict(d))

    @register_rule("local_only")
    class LocalOnly(EveryOther):
        distributed = False

    try:
        cfg = SimpleNamespace(
            parallel=SimpleNamespace(mode="ddp"),
            tickets=SimpleNamespace(dynamic=SimpleNamespace(enabled=True, rule="local_only")),
        )
        with pytest.raises(ConfigError, match="tickets.dynamic.rule: the data rule 'local_only' does not support"):
            check_compat(cfg)
        cfg.tickets.dynamic.rule = "infobatch"
        check_compat(cfg)
    finally:
        RULES.pop("local_only", None)
