"""One ticket of ``lotus select``: score the samples (or reuse a ticket's scores), select with the policy, and
publish the ticket file with an exclusive create (a concurrent select on the same --out loses with an error)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from lotus.errors import LotusError, library_error
from lotus.safe_io import atomic_write

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    import torch

__all__ = ["Job", "write_ticket", "FLAGS"]

# library field -> flag, for data_tickets' "field: reason" errors
FLAGS = {
    "count": "--count",
    "fraction": "--fraction",
    "ccs beta": "--beta",
    "ccs strata": "--strata",
    "class_balanced": "--class-balance",
    "repeats": "--repeats",
}


@dataclasses.dataclass
class Job:
    """What every ticket of one ``lotus select`` shares."""

    args: argparse.Namespace
    train_set: Any
    labels: np.ndarray
    model: Any
    proxy: Any
    proxy_meta: dict | None
    balanced: bool
    device: torch.device
    bs: int
    progress: bool | None
    pol_kw: dict
    patch_rank: np.ndarray | None
    patch_extra: dict | None
    t0: float


def write_ticket(job: Job, scorer: str | None, out: str, kw: dict) -> None:
    """Score with ``scorer`` (or reuse --from-ticket's scores), select, write one ticket, print its summary."""
    import torch

    from data_tickets import TicketFile, score, select
    from lotus.features.tickets.callback import load_ticket

    args, train_set, labels, pol_kw = job.args, job.train_set, job.labels, job.pol_kw
    scores = None
    proxy_meta = None if job.proxy_meta is None else dict(job.proxy_meta)
    if args.from_ticket:
        src = load_ticket(args.from_ticket, "--from-ticket")
        try:
            src.validate_against(train_set, labels=labels)
        except ValueError as e:
            raise LotusError(f"--from-ticket: {e}") from None
        if src.scores is None:
            raise LotusError(f"--from-ticket: {args.from_ticket} stores no scores")
        scores, scorer, proxy_meta = torch.from_numpy(src.scores), src.scorer, src.proxy
    elif scorer is not None:
        try:
            scores = score(
                job.model,
                train_set,
                scorer,
                proxy=job.proxy,
                batch_size=job.bs,
                device=job.device,
                progress=job.progress,
                seed=args.seed,
                **kw,
            )
        except ValueError as e:  # e.g. a model the scorer cannot use, scores that diverged
            raise library_error(e, FLAGS, f"--scorer {scorer}") from None
    if proxy_meta is not None and args.repeats is not None:
        proxy_meta["repeats"] = args.repeats

    base = scores if scores is not None else np.zeros(len(train_set))
    try:
        idx = select(
            base,
            args.policy,
            fraction=args.fraction,
            count=args.count,
            labels=labels,
            class_balanced=job.balanced,
            seed=args.seed,
            **pol_kw,
        )
    except ValueError as e:
        raise library_error(e, FLAGS, f"--policy {args.policy}") from None

    counts = np.bincount(np.asarray(labels)[idx], minlength=int(np.asarray(labels).max()) + 1)
    extra: dict = {
        "config": os.path.abspath(args.config),
        "overrides": list(args.set),
        "policy_options": pol_kw,
        "scorer_options": dict(kw),
        "train_size": len(train_set),
        "class_counts": counts.tolist(),
    }
    if job.patch_extra is not None:
        extra["patches"] = job.patch_extra
    t = TicketFile.create(
        idx,
        dataset=train_set,
        labels=labels,
        scores=None if scores is None else scores.numpy(),
        scorer=scorer,
        policy=args.policy,
        fraction=args.fraction if args.fraction is not None else round(idx.size / len(train_set), 6),
        seed=args.seed,
        class_balanced=job.balanced,
        proxy=proxy_meta,
        patch_indices=job.patch_rank,
        extra=extra,
    )
    # published only if nothing took the name meanwhile (without --force): two selects never both succeed
    atomic_write(out, t.save, exclusive=not args.force, key="--out")
    print(
        json.dumps(
            {
                "out": out,
                "count": int(idx.size),
                "train_size": len(train_set),
                "fraction": round(idx.size / len(train_set), 4),
                "scorer": scorer,
                "policy": args.policy,
                "seed": args.seed,
                "class_balanced": job.balanced,
                "min_class_share": round(float(counts[counts > 0].min() / idx.size), 4) if idx.size else None,
                "max_class_share": round(float(counts.max() / idx.size), 4),
                "wall_s": round(time.perf_counter() - job.t0, 2),
            }
        ),
        flush=True,
    )
