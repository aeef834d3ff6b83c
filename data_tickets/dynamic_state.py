"""A :class:`data_tickets.DynamicPruner`'s resume state as plain data (tensors and numbers only, so it loads with
``torch.load(weights_only=True)``): the shared scores, epoch and plan, plus the rule's own ``state_dict``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["STATE_VERSION", "pruner_state", "load_pruner_state"]

STATE_VERSION = 1


def pruner_state(p: Any) -> dict[str, Any]:
    """``p``'s state (its plan must be current)."""
    return {
        "version": STATE_VERSION,
        "num_samples": p.num_samples,
        "rule": p.rule.name,
        "rule_state": p.rule.state_dict(),
        "ratio": p.ratio,
        "anneal": p.anneal,
        "num_epochs": -1 if p.num_epochs is None else p.num_epochs,
        "seed": p.seed,
        "epoch": p.epoch,
        "scores": torch.from_numpy(p.scores.copy()),
        "seen": torch.from_numpy(p.seen.copy()),
        "updated": torch.from_numpy(p._updated.copy()),
        "order": torch.from_numpy(p._order.copy()),
        "weights": torch.from_numpy(p._weights.copy()),
        "plan_stats": dict(p._stats),
    }


def load_pruner_state(p: Any, state: dict[str, Any]) -> None:
    """Restore :func:`pruner_state` output into ``p`` (a state without ``rule`` is an InfoBatch one)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("DynamicPruner state: expected a dict from DynamicPruner.state_dict() (version 1)")
    if int(state["num_samples"]) != p.num_samples:
        raise ValueError(
            f"DynamicPruner state: saved for {int(state['num_samples'])} samples, this dataset has {p.num_samples}"
        )
    saved_rule = state.get("rule", "infobatch")
    if saved_rule != p.rule.name:
        raise ValueError(f"DynamicPruner state: saved with rule {saved_rule!r}, this pruner uses {p.rule.name!r}")
    rule = p.rule
    rule.set_ratio(float(state["ratio"]))
    rule.seed = int(state["seed"])
    p.anneal = float(state["anneal"])
    p.num_epochs = rule.num_epochs = None if int(state["num_epochs"]) < 0 else int(state["num_epochs"])
    rule.load_state_dict(dict(state.get("rule_state", {})))
    p.epoch = int(state["epoch"])
    p.scores = state["scores"].numpy().astype(np.float32).copy()
    p.seen = state["seen"].numpy().astype(bool).copy()
    p._updated = state["updated"].numpy().astype(bool).copy()
    p._order = state["order"].numpy().astype(np.int64).copy()
    p._weights = state["weights"].numpy().astype(np.float32).copy()
    p._stats = dict(state.get("plan_stats", {}))
