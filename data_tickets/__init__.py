"""data_tickets: data lottery tickets for (vision transformer) training, on plain PyTorch.

Score every training sample by informativeness, select a subset with a policy, store it as a ticket file
(with a dataset fingerprint) and reuse it in any training run; prune data dynamically during training
(InfoBatch-style) or keep only the informative patches of each image (patch tickets)::

    from data_tickets import score, select, TicketFile
    scores = score(model, dataset, scorer="el2n")            # tensor aligned with dataset indices
    idx = select(scores, policy="ccs", fraction=0.5, labels=labels, seed=0)  # class-balanced (labels given)
    TicketFile.create(idx, dataset=dataset, scores=scores, scorer="el2n", policy="ccs",
                      fraction=0.5, seed=0, class_balanced=True).save("tickets/el2n-50.npz")

Datasets yield ``(image, label, index)`` (or ``(image, label)``; the position is used as the index).
This package never imports ``lotus``. The top level exports the main entry points; everything else is
imported from its module:

=============== ==========================================================================================
module          holds
=============== ==========================================================================================
scorers         ``score``, ``SCORERS``, ``register_scorer``, ``Scorer``, ``ScoreContext``
policies        ``select`` (class-balanced whenever labels are given), ``POLICIES``, ``register_policy``,
                ``budget``, ``class_quotas``, ``uses_class_balance``
ticket_file     ``TicketFile`` (the ``.npz`` ticket format)
fingerprint     ``dataset_fingerprint``, ``compare_fingerprints``
proxy           ``make_proxy``, ``train_proxy``, the ``Proxy`` protocol
proxy_cache     ``cached_proxy`` (each seed's proxy training stored once, replayed for every scorer),
                ``proxy_fingerprint``
grad_norms      ``per_sample_grad_sq_norms`` (GraNd without per-sample weight gradients)
attention       ``cls_attention``, ``capture_attention`` (attention weights from q/k, via hooks)
rules           ``DataRule``, ``RulePlan``, ``RuleState``, ``register_rule``, ``make_rule``, ``rule_names``
                (dynamic data rules: which samples each epoch, with which loss weights)
dynamic         ``DynamicPruner`` (the sampler driven by a rule; scores, sync, export, resume)
dynamic_plan    ``InfoBatchRule`` (rule "infobatch"): InfoBatch's per-epoch plan; the sharding, as pure functions
random_subsets  ``fixed_subset``, ``rs2_subset``, ``FixedSubsetRule``, ``RS2Rule`` (rules "fixed", "rs2")
patches         ``PatchTicket`` (keep selection, offline rankings), ``patch_attention``,
                ``random_patch_scores``, ``rank_patches``
kept_tokens     ``forward_kept_tokens``, ``KeptPatchTokens``, ``apply_patch_tickets``
keep_rate       ``num_kept``, ``KeepRateSchedule``
=============== ==========================================================================================
"""

import importlib
from typing import Any

# name -> module that defines it; imported on first use (module __getattr__), so reading a config section
# that needs only ``KeepRateSchedule``, ``POLICIES`` or ``rule_names`` does not import torch (__all__ lists
# the main entry points; the rule interface names resolve here too)
_WHERE = {
    "__version__": "_version",
    "DynamicPruner": "dynamic",
    "DataRule": "rules",
    "RulePlan": "rules",
    "RuleState": "rules",
    "register_rule": "rules",
    "make_rule": "rules",
    "rule_names": "rules",
    "dataset_fingerprint": "fingerprint",
    "per_sample_grad_sq_norms": "grad_norms",
    "KeepRateSchedule": "keep_rate",
    "apply_patch_tickets": "kept_tokens",
    "PatchTicket": "patches",
    "POLICIES": "policies",
    "register_policy": "policies",
    "select": "policies",
    "make_proxy": "proxy",
    "SCORERS": "scorers",
    "register_scorer": "scorers",
    "score": "scorers",
    "TicketFile": "ticket_file",
}

__all__ = [
    "__version__",
    "score",
    "SCORERS",
    "register_scorer",
    "select",
    "POLICIES",
    "register_policy",
    "TicketFile",
    "dataset_fingerprint",
    "make_proxy",
    "per_sample_grad_sq_norms",
    "DynamicPruner",
    "register_rule",
    "PatchTicket",
    "KeepRateSchedule",
    "apply_patch_tickets",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
