"""The probes of ``schedule.mode: auto``: what its rules (:mod:`lotus.features.schedule.auto_rules`, where the
rule table is) read, measured on the model.

Probes run on ``schedule.auto.probe_batches`` fixed, un-augmented train batches (:func:`probe_batches`: the same
seeded draw on every rank) and leave the model, its mode and the RNG streams as they found them. Under torchrun
every measurement is reduced across ranks before a rule sees it (:func:`mean_over_ranks`: probe losses and
attention masses are averaged, step timings too), thinned copies are calibrated on sharded batches whose
statistics are summed (as the pruning feature does), and an FSDP2-sharded model is probed through a plain full
copy (:func:`probe_model`), so every rank feeds the rules the same numbers; :func:`rank_digests` then
compares a digest of each rank's decision list
(:func:`~lotus.features.schedule.auto_rules.check_agreement`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pruning
from data_tickets import DynamicPruner, PatchTicket, apply_patch_tickets
from data_tickets.patches import patch_attention, random_patch_scores
from lotus.callbacks import Trainer
from lotus.data import batches
from lotus.errors import library_error
from lotus.features.resolution.schedule import resize
from lotus.features.schedule import auto_rules as rules

__all__ = [
    "probe_batches",
    "probe_model",
    "probe_loss",
    "random_keep_rises",
    "side_rises",
    "side_gap",
    "attention_masses",
    "step_seconds",
    "thinned_loss",
    "eval_mode",
    "seen_losses",
    "mean_over_ranks",
    "rank_digests",
]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------- ranks
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """``values`` averaged over ranks (one ``all_reduce``); unchanged on one process."""
    w = _world()
    if w == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) / w for v in t.cpu()]


def rank_digests(decisions: list[dict[str, Any]]) -> list[str]:
    """Every rank's :func:`decisions_digest` (one ``all_gather_object``; one entry on one process)."""
    mine = rules.decisions_digest(decisions)
    if _world() == 1:
        return [mine]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]


# ---------------------------------------------------------------------- inputs
def probe_batches(trainer: Trainer, n: int) -> Batches:
    """``n`` fixed training batches of ``data.batch_size`` (seeded, no augmentation; the same on every rank)."""
    bs = trainer.cfg.data.batch_size
    g = torch.Generator().manual_seed(trainer.cfg.train.seed + 104729)
    idx = torch.randperm(len(trainer.train_set), generator=g)[: n * bs].numpy()
    return [(x, y) for x, y, _ in batches(trainer.train_set, idx, bs, trainer.cfg.data.num_workers)]


def probe_model(trainer: Trainer, widths: dict | None = None) -> torch.nn.Module:
    """The model to probe: the live (unwrapped) model, or for an FSDP2-sharded one a plain full copy with the
    thinned ``widths`` (a collective: every rank calls it)."""
    model = trainer.unwrapped_model
    from lotus.parallel.full_state import is_sharded

    if not is_sharded(model):
        return model
    from lotus.features.pruning.distributed import restore_shapes
    from lotus.parallel.rebuild import full_state, plain_copy

    model_sd, _ = full_state(trainer.model, None)
    plain = plain_copy(trainer, model_sd, lambda m, sd: restore_shapes(m, sd, widths))
    if hasattr(getattr(model, "patch_drop", None), "keep"):  # patch tickets: the same kept-token slot
        apply_patch_tickets(plain)
    plain.train(model.training)
    return plain


def seen_losses(sampler: Any) -> np.ndarray | None:
    """The dynamic pruner's last-seen per-sample losses of its pool (the same on every rank: they are summed
    over ranks each epoch), or None without one."""
    if not isinstance(sampler, DynamicPruner):
        return None
    pool = sampler.pool if sampler.pool is not None else slice(None)
    return sampler.scores[pool][sampler.seen[pool]].astype("float64")


# ---------------------------------------------------------------------- losses
@torch.no_grad()
def probe_loss(
    trainer: Trainer, model: torch.nn.Module, data: Batches, keep: int | None = None, side: int | None = None
) -> float:
    """Mean loss on ``data`` (averaged over ranks); with ``keep``, on that many random patches per image (seeded:
    the same draw at every call); with ``side``, on the images resized to that side (``resolution.mode``)."""
    total, n = 0.0, 0
    for b, (x, y) in enumerate(data):
        x, y = x.to(trainer.device), y.to(trainer.device)
        if side is not None:
            x = resize(x, side, trainer.cfg.resolution.mode)
        kept: Any = contextlib.nullcontext()
        if keep is not None:
            scores = random_patch_scores(
                torch.arange(len(x)) + b * len(x),
                int(model.patch_embed.num_patches),
                seed=trainer.cfg.train.seed + 7919,
                epoch=keep,
            )
            kept = model.patch_drop.keep(PatchTicket.keep_from_scores(scores, keep).to(x.device))
        with kept, trainer.autocast():
            logits = model(x)
        total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        n += len(y)
    return mean_over_ranks([total / max(n, 1)], trainer.device)[0]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block, then back to the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def random_keep_rises(
    trainer: Trainer,
    model: torch.nn.Module,
    data: Batches,
    ks: list[int],
    full: float | None = None,
    gate: float = math.inf,
) -> tuple[float, dict[int, float]]:
    """The probe loss on all patches (``full``, when not given), and per ``k`` its rise on ``k`` random patches
    as a share of the loss learned (:func:`~lotus.features.schedule.auto_rules.loss_rise_of_learned`). No ``k``
    is probed (an empty dict) while the loss on all patches is at least ``gate``."""
    classes = trainer.data.num_classes
    with eval_mode(model):
        full = probe_loss(trainer, model, data) if full is None else full
        if full >= gate:
            return full, {}
        return full, {
            k: rules.loss_rise_of_learned(probe_loss(trainer, model, data, keep=k), full, classes) for k in ks
        }


def side_rises(
    trainer: Trainer, model: torch.nn.Module, data: Batches, sides: list[int], full: float, gate: float = math.inf
) -> dict[int, float]:
    """Per side, the probe loss with the images at that side minus ``full`` (the loss at full size, on all
    patches), as a share of the loss learned at the better of the two (:func:`side_gap`): positive when the
    smaller side loses what the model needs, negative when the model fits the side it trains at better than
    the full size it is evaluated at. A side is left out while neither loss is under ``gate``."""
    classes, out = trainer.data.num_classes, {}
    with eval_mode(model):
        for s in sides:
            loss = probe_loss(trainer, model, data, side=s)
            if min(loss, full) < gate:
                out[s] = side_gap(loss, full, classes)
    return out


def side_gap(side_loss: float, full_loss: float, num_classes: int) -> float:
    """(``side_loss`` - ``full_loss``) / (ln(classes) - the lower of both)."""
    return (side_loss - full_loss) / max(math.log(num_classes) - min(side_loss, full_loss), 1e-3)


def thinned_loss(
    trainer: Trainer,
    model: torch.nn.Module,
    data: Batches,
    structured: Any,
    heads: float,
    mlp: float,
    calib: Batches | None,
) -> float:
    """The probe loss of a copy of ``model`` thinned to ``heads`` / ``mlp`` (``pruning.structured``'s other
    settings; calibrated on ``calib``: sharded across ranks, statistics summed); the model is untouched."""
    from lotus.features.pruning.distributed import calibration

    mine, reduce = calibration(trainer, calib) if calib is not None else (None, None)
    trial = copy.deepcopy(model)
    try:
        pruning.prune_structured(
            trial, dataclasses.replace(structured.library(), heads=heads, mlp=mlp), calib_loader=mine, reduce_sum=reduce
        )
    except ValueError as e:
        raise library_error(e, {}, "pruning.structured") from None
    trial.eval()
    loss = probe_loss(trainer, trial, data)
    del trial
    return loss


# ---------------------------------------------------------------------- attention and time
@torch.no_grad()
def attention_masses(
    trainer: Trainer, model: torch.nn.Module, data: Batches, ks: list[int], rollout: bool
) -> tuple[dict[int, float], float]:
    """Mean CLS attention (rollout if ``rollout``) on each image's top ``k`` patches, and the seconds it took
    per sample (one sample's ranking); both averaged over ranks."""
    t0, seen = time.perf_counter(), sum(len(x) for x, _ in data)
    masses: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for x, _ in data:
        with trainer.autocast():
            att = patch_attention(model, x.to(trainer.device), rollout=rollout).float()
        att = att / att.sum(dim=1, keepdim=True).clamp_min(1e-12)
        top = att.sort(dim=1, descending=True).values.cumsum(dim=1)
        for k in masses:
            masses[k].append(top[:, k - 1])
    rank_s = (time.perf_counter() - t0) / max(seen, 1)
    values = mean_over_ranks([float(torch.cat(masses[k]).mean()) for k in ks] + [rank_s], trainer.device)
    return dict(zip(ks, values[:-1], strict=True)), values[-1]


def step_seconds(
    trainer: Trainer,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    k: int | None,
    repeats: int = 3,
    side: int | None = None,
) -> tuple[float, float]:
    """Fastest of ``repeats`` forward + backward passes of a copy of ``model``, on all patches at full size and
    on ``k`` of them (all: None) at ``side`` (full: None), alternating, after one untimed pass each, averaged over
    ranks; the model and the RNG streams are untouched."""
    trial = copy.deepcopy(model)
    trial.train()
    kept = trial.patch_drop  # timm's Identity when the model has no patch tickets: then k is None, never used
    keep = None if k is None else torch.arange(k, device=x.device).expand(len(x), k)
    small = x if side is None else resize(x, side, trainer.cfg.resolution.mode)
    sync: Callable[[], None] = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = {None: math.inf, "reduced": math.inf}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for r in range(repeats + 1):
            for which in (None, "reduced"):
                sync()
                t0 = time.perf_counter()
                xs = x if which is None else small
                drop = contextlib.nullcontext() if keep is None else kept.keep(None if which is None else keep)
                with drop, trainer.autocast():
                    loss = F.cross_entropy(trial(xs).float(), y)
                loss.backward()
                sync()
                if r:
                    best[which] = min(best[which], time.perf_counter() - t0)
                trial.zero_grad(set_to_none=True)
    del trial
    full, kept_s = mean_over_ranks([best[None], best["reduced"]], trainer.device)
    return full, kept_s
