"""data_tickets: data lottery tickets for (vision transformer) training, on plain PyTorch.

Score every training sample by informativeness, select a subset with a policy, store it as a ticket file
(with a dataset fingerprint) and reuse it in any training run; prune data dynamically during training
(InfoBatch-style) or keep only the informative patches of each image (patch tickets)::

    from data_tickets import score, select, TicketFile
    scores = score(model, dataset, scorer="el2n")            # tensor aligned with dataset indices
    idx = select(scores, policy="ccs", fraction=0.5, labels=labels, seed=0)
    TicketFile.create(idx, dataset=dataset, scores=scores, scorer="el2n", policy="ccs",
                      fraction=0.5, seed=0).save("tickets/el2n-50.npz")

Datasets yield ``(image, label, index)`` (or ``(image, label)``; the position is used as the index).
This package never imports ``lotus``.
"""
from ._version import __version__
from .attention import capture_attention, cls_attention
from .dynamic import DynamicPruner
from .fingerprint import compare_fingerprints, dataset_fingerprint
from .grad_norms import per_sample_grad_sq_norms
from .patches import (KeepRateSchedule, KeptPatchTokens, PatchTicket, apply_patch_tickets, forward_kept_tokens,
                      num_kept, patch_attention, random_patch_scores)
from .policies import POLICIES, budget, register_policy, select
from .proxy import Proxy, make_proxy, train_proxy
from .scorers import SCORERS, Scorer, ScoreContext, register_scorer, score
from .ticket_file import TicketFile

__all__ = [
    "__version__",
    "score", "SCORERS", "Scorer", "ScoreContext", "register_scorer",
    "select", "POLICIES", "register_policy", "budget",
    "TicketFile", "dataset_fingerprint", "compare_fingerprints",
    "Proxy", "make_proxy", "train_proxy",
    "cls_attention", "capture_attention", "per_sample_grad_sq_norms",
    "DynamicPruner", "PatchTicket", "KeepRateSchedule", "KeptPatchTokens", "apply_patch_tickets",
    "forward_kept_tokens", "num_kept", "patch_attention", "random_patch_scores",
]
