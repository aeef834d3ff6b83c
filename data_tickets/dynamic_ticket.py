"""A :class:`data_tickets.DynamicPruner`'s final kept set as a ticket file: what its data rule (InfoBatch by
default) would keep, reusable offline (``lotus train --set tickets.file=...``); the rule names the policy."""

from __future__ import annotations

from typing import Any

import numpy as np

from .ticket_file import TicketFile

__all__ = ["dynamic_ticket"]


def dynamic_ticket(
    pruner: Any, dataset: Any = None, labels: Any = None, extra: dict[str, Any] | None = None
) -> TicketFile:
    """The pruner's :meth:`~data_tickets.DynamicPruner.final_kept_indices` as a :class:`TicketFile`; ``scores`` is
    the last seen loss per dataset index (``nan`` if never seen); with ``dataset``/``labels`` it stores their
    fingerprint."""
    idx = pruner.final_kept_indices()
    pool_size = pruner.num_samples if pruner.pool is None else int(pruner.pool.size)
    info = {
        "dynamic": {
            "rule": pruner.rule.name,
            "ratio": pruner.ratio,
            "anneal": pruner.anneal,
            "num_epochs": pruner.num_epochs,
            "last_epoch": int(pruner.epoch),
            "seen": int(pruner.seen.sum()),
        }
    }
    info.update(extra or {})
    fields = dict(
        scores=np.where(pruner.seen, pruner.scores, np.nan).astype(np.float32),
        scorer="dynamic_last_loss",
        fraction=float(idx.size / pool_size),
        seed=pruner.seed,
        extra=info,
    )
    fields.update(pruner.rule.ticket_fields())
    if dataset is None and labels is None:
        return TicketFile(idx, **fields).check()
    return TicketFile.create(idx, dataset=dataset, labels=labels, **fields)
