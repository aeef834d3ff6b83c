"""Dynamic data rules: which samples to train on each epoch, with which loss weights, from which state.

A rule is a :class:`DataRule` subclass registered under a name with :func:`register_rule`. The sampler
(:class:`data_tickets.DynamicPruner`) owns what every rule shares: the last-seen loss of each sample (merged
across ranks), the epoch, the pool of candidate indices, the anneal and the sharding across ranks. Once per
epoch it asks the rule for a :class:`RulePlan` (kept indices, loss weights, counts) from a :class:`RuleState`.
The rule keeps only its own knobs and extra state (``state_dict`` / ``load_state_dict`` for resume).

Adding a rule is its class plus the decorator, in any module::

    @register_rule("toy")
    class KeepEven(DataRule):
        \"\"\"Every even index, weight 1.\"\"\"
        def epoch_plan(self, epoch, pool, state):
            kept = pool[pool % 2 == 0]
            return RulePlan(kept, np.ones(state.num_samples, np.float32), {"pool": pool.size, "kept": kept.size})

then ``DynamicPruner(n, rule="toy")`` or ``lotus train --set tickets.dynamic.rule=toy`` trains through it.
The built-in rules (``infobatch`` in :mod:`data_tickets.dynamic_plan`, ``rs2`` and ``fixed`` in
:mod:`data_tickets.random_subsets`) are registered the same way; their modules are imported on first lookup.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

__all__ = [
    "DataRule",
    "RulePlan",
    "RuleState",
    "RULES",
    "DEFAULT_RULE",
    "register_rule",
    "get_rule",
    "make_rule",
    "rule_names",
]

DEFAULT_RULE = "infobatch"
"""The rule a :class:`data_tickets.DynamicPruner` (and ``tickets.dynamic``) uses unless told otherwise."""

# modules that register the built-in rules; imported on the first lookup (they import this module)
_BUILTIN_MODULES = ("data_tickets.dynamic_plan", "data_tickets.random_subsets")


@dataclass
class RuleState:
    """What the sampler knows when it asks for a plan (read-only for the rule).

    ``scores``: last seen loss per dataset index (float32); ``seen``: which indices have a loss;
    ``annealing``: this epoch is in the final full-data phase (rules should keep the whole pool, weight 1).
    """

    scores: np.ndarray
    seen: np.ndarray
    annealing: bool = False

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, num_samples: int) -> RuleState:
        """No losses seen yet (what a loss-free rule, such as a random subset, is planned from)."""
        return cls(np.zeros(num_samples, dtype=np.float32), np.zeros(num_samples, dtype=bool))


class RulePlan(NamedTuple):
    """One epoch's answer: ``indices`` (sorted kept dataset indices, a subset of the pool), ``weights``
    (float32 loss weight per dataset index) and ``stats`` (counts; at least ``pool``, ``kept``, ``pruned``; the
    sampler adds ``annealing`` when missing)."""

    indices: np.ndarray
    weights: np.ndarray
    stats: dict[str, Any]


class DataRule(ABC):
    """A dynamic data rule (see the module docstring).

    Every rule is built with the same keywords, so a trainer can build any registered rule from one config:
    ``num_samples``, ``seed`` (draws must be a pure function of it and the epoch, for resume), ``num_epochs``,
    ``ratio`` (the rule's strength, the share of the pool it may skip: what ``tickets.dynamic.ratio`` sets and
    ``schedule.mode: auto`` moves) and ``labels`` (optional, per dataset index). A subclass may add its own
    keyword options.
    """

    name: ClassVar[str] = ""
    uses_losses: ClassVar[bool] = True
    """Whether plans depend on the recorded losses (False: the trainer need not record them)."""
    distributed: ClassVar[bool] = True
    """Whether every rank computes the same plan from the merged state (so the sampler may shard it)."""

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        num_epochs: int | None = None,
        ratio: float = 0.5,
        labels: np.ndarray | None = None,
    ) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.num_epochs = num_epochs
        self.ratio = float(ratio)
        self.labels = None if labels is None else np.asarray(labels)

    @abstractmethod
    def epoch_plan(self, epoch: int, pool: np.ndarray, state: RuleState) -> RulePlan:
        """The plan for ``epoch`` over the sorted candidate indices ``pool``; pure (no state change)."""

    def observe(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Per-sample losses just recorded (finite only); the sampler keeps the last one per sample in
        :class:`RuleState` already, so most rules ignore this."""
        return None

    def drop_candidates(self, losses: np.ndarray) -> np.ndarray | None:
        """The losses (of the pool's seen samples) of the samples this rule would skip at a higher ratio, which
        ``schedule.mode: auto`` weighs to move the ratio; None: the auto controller leaves the ratio alone."""
        return None

    def set_ratio(self, ratio: float) -> None:
        """Change the strength (takes effect at the next plan)."""
        self.ratio = float(ratio)

    def ticket_fields(self) -> dict[str, Any]:
        """``TicketFile`` fields of an exported kept set (``policy`` names the rule)."""
        return {"policy": self.name, "scorer": "dynamic_last_loss"}

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state beyond the sampler's (tensors/numbers only); empty for stateless rules."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, seed={self.seed})"


RULES: dict[str, type[DataRule]] = {}


def register_rule(name: str) -> Callable[[type[DataRule]], type[DataRule]]:
    """Class decorator registering a :class:`DataRule` subclass under ``name`` (re-registering replaces it)."""

    def deco(cls: type[DataRule]) -> type[DataRule]:
        if not (isinstance(cls, type) and issubclass(cls, DataRule)):
            raise TypeError(f"register_rule({name!r}): expected a DataRule subclass, got {cls!r}")
        cls.name = name
        RULES[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def rule_names() -> list[str]:
    """Names of every registered rule (built-in ones included), sorted."""
    _load_builtins()
    return sorted(RULES)


def get_rule(name: str) -> type[DataRule]:
    """The rule class registered under ``name`` (ValueError naming the choices otherwise)."""
    _load_builtins()
    if name not in RULES:
        raise ValueError(f"rule: unknown data rule {name!r}; registered: {', '.join(sorted(RULES))}")
    return RULES[name]


def make_rule(name: str, num_samples: int, **options: Any) -> DataRule:
    """An instance of the rule registered under ``name``."""
    return get_rule(name)(num_samples, **options)
