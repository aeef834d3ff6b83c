"""The one list of training features: which config section turns each on, what it may change on the
trainer, and the order its hooks run in.

Order is the data path: which samples (``subset``), in which order (``sampler``), how they are mixed
(``batch``), then the model (pruning, then its EMA), then which tokens (``forward``), then monitoring. Slots a
feature writes, and the hook that writes each:

=========== ============================ ===================================================================
slot        hook                         meaning
=========== ============================ ===================================================================
subset      ``epoch_subset``             the epoch's train indices (at most one feature answers per epoch)
batch       ``transform_batch``          the batch and its targets (mixup's, then distill's soft targets)
sampler     ``epoch_sampler``            the epoch's index order drawn from the subset
loss        ``per_sample_loss``          re-weighted per-sample losses
forward     ``wrap_forward``             the training forward (e.g. kept patch tokens only)
model       ``rebuild_optimizer`` & co.  parameter shapes/masks (the optimiser is rebuilt to match)
=========== ============================ ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lotus.callbacks import Callback, overrides
from lotus.config import Config
from lotus.features.distill.callback import DistillCallback
from lotus.features.dynamic.callback import DynamicPruningCallback
from lotus.features.ema.callback import EmaCallback
from lotus.features.mixup.callback import MixupCallback
from lotus.features.outliers.callback import OutlierMonitor
from lotus.features.patches.callback import PatchTicketsCallback
from lotus.features.pruning.callback import PruningCallback
from lotus.features.resolution.callback import ResolutionCallback
from lotus.features.schedule.auto_callback import AutoScheduleCallback
from lotus.features.schedule.callback import ReselectCallback
from lotus.features.schedule.phases import Schedule
from lotus.features.subsets.callback import RandomSubsetCallback
from lotus.features.tickets.callback import TicketSubset

__all__ = ["Feature", "FEATURES", "SLOT_HOOKS", "build_callbacks", "published"]

SLOT_HOOKS: dict[str, str] = {
    "subset": "epoch_subset",
    "sampler": "epoch_sampler",
    "batch": "transform_batch",
    "loss": "per_sample_loss",
    "forward": "wrap_forward",
}


@dataclass(frozen=True)
class Feature:
    """``name``: folder under ``lotus/features``; ``section``: the config key that turns it on; ``writes``:
    the trainer slots it owns; ``build(cfg, schedule)``: its callbacks (empty when off)."""

    name: str
    section: str
    writes: tuple[str, ...]
    build: Callable[[Config, Schedule], list[Callback]]


FEATURES: tuple[Feature, ...] = (
    Feature(
        "tickets",
        "tickets.file",
        ("subset",),
        lambda cfg, s: [TicketSubset(cfg.tickets.file)] if cfg.tickets.file else [],
    ),
    Feature(
        "subsets",
        "tickets.random",
        ("subset",),
        lambda cfg, s: [RandomSubsetCallback(cfg.tickets.random, cfg.train.seed)] if cfg.tickets.random.enabled else [],
    ),
    Feature(
        "schedule",
        "schedule.reselect",
        ("subset",),
        lambda cfg, s: [ReselectCallback(cfg.schedule.reselect, cfg.train.seed)] if s.reselect_epochs else [],
    ),
    Feature(
        "schedule",
        "schedule.mode",
        (),  # auto: decides the plan; the features below follow it
        lambda cfg, s: [AutoScheduleCallback(cfg, s.auto)] if s.auto is not None else [],
    ),
    Feature(
        "dynamic",
        "tickets.dynamic",
        ("sampler", "loss"),
        lambda cfg, s: (
            [
                DynamicPruningCallback(
                    cfg.tickets.dynamic, cfg.train.seed, s.dynamic_anneal, follow_plan=s.auto is not None
                )
            ]
            if cfg.tickets.dynamic.enabled
            else []
        ),
    ),
    Feature(
        "pruning",
        "pruning",
        ("model",),
        lambda cfg, s: [PruningCallback(cfg.pruning, s.auto)] if cfg.pruning.enabled else [],
    ),
    Feature(
        "resolution",
        "resolution",
        ("batch",),  # before mixup: mixup mixes the resized images
        lambda cfg, s: [ResolutionCallback(cfg.resolution, s.auto)] if cfg.resolution.enabled else [],
    ),
    Feature(
        "mixup",
        "mixup",
        ("batch",),
        lambda cfg, s: [MixupCallback(cfg.mixup, cfg.train.label_smoothing)] if cfg.mixup.enabled else [],
    ),
    Feature(
        "distill",
        "distill",
        ("batch",),  # after mixup: the teacher labels the mixed images
        lambda cfg, s: [DistillCallback(cfg.distill, cfg.train.label_smoothing)] if cfg.distill.enabled else [],
    ),
    Feature("ema", "ema", (), lambda cfg, s: [EmaCallback(cfg.ema)] if cfg.ema.enabled else []),
    Feature(
        "patches",
        "tickets.patches",
        ("forward",),
        lambda cfg, s: (
            [PatchTicketsCallback(cfg.tickets.patches, cfg.train.seed, s.patch_keep_rates)]
            if cfg.tickets.patches.enabled
            else []
        ),
    ),
    Feature("outliers", "outliers", (), lambda cfg, s: [OutlierMonitor(cfg.outliers)] if cfg.outliers.enabled else []),
)


def published(callbacks: list[Callback]) -> dict[str, Callback]:
    """What features may reach of each other: config section -> its callback (``trainer.features``), for the
    enabled features among ``callbacks`` (user callbacks are not published)."""
    out: dict[str, Callback] = {}
    for cb in callbacks:
        section = getattr(cb, "_lotus_section", None)
        if section is not None:
            out.setdefault(section, cb)
    return out


def build_callbacks(cfg: Config, schedule: Schedule) -> list[Callback]:
    """Every enabled feature's callbacks, in :data:`FEATURES` order; a callback that implements the hook
    of a slot its feature does not declare is a bug (raised here, not left to silently race)."""
    out: list[Callback] = []
    for feature in FEATURES:
        for cb in feature.build(cfg, schedule):
            stray = [slot for slot, hook in SLOT_HOOKS.items() if overrides(cb, hook) and slot not in feature.writes]
            if stray:
                raise RuntimeError(
                    f"feature {feature.name}: {type(cb).__name__} writes {', '.join(stray)} "
                    "without declaring it in lotus.features.registry.FEATURES"
                )
            cb._lotus_section = feature.section  # what published() keys it by
            out.append(cb)
    return out
