"""The resolution rules of ``schedule.mode: auto`` (``resolution.enabled``): the token budget's second lever.

Random patch tickets drop tokens by position; a lower input resolution drops them by frequency (EfficientTrain:
low frequencies first). Under auto the training side is a decision, not a function of the epoch: it starts at
``resolution.start`` of the full side from epoch 0 (:func:`side_start`) and rises in whole patches on the same
two signals as random patches (:func:`side_decision`): the probe loss at the current side and at full size are
more than ``keep_tolerance`` of the loss learned apart, or the train loss stalls (``keep_stall``). The gap counts
both ways: higher at the side means the smaller images lose what the model needs; lower means the model fits
the side it trains at better than the full size it is evaluated at (the train/test resolution discrepancy of
Touvron et al., FixRes 2019), which no val accuracy taken at full size would forgive. When both levers are on,
a stall raises the one whose probe gives back more (:func:`stall_lever`), so the data decides which tokens
matter: a small object lost among random patches raises the keep rate, fine texture lost at low resolution
raises the side. Pure functions; the rule table is in :mod:`lotus.features.schedule.auto_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lotus.features.resolution.schedule import lowest_side
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.auto_rules import Decision
from lotus.features.schedule.config import AutoConfig

__all__ = ["SideGrid", "side_start", "current_side", "side_off", "side_rungs", "stall_lever", "side_decision"]


@dataclass(frozen=True)
class SideGrid:
    """The sides the rule may choose: from ``low`` to ``full`` in steps of ``patch`` (all multiples of it)."""

    low: int
    full: int
    patch: int

    @classmethod
    def of(cls, full: int, patch: int, start: float) -> SideGrid:
        """``start`` of ``full`` (:func:`~lotus.features.resolution.schedule.lowest_side`), at most ``full``."""
        return cls(min(lowest_side(full, patch, start), full), full, patch)

    def above(self, side: int) -> list[int]:
        """The sides above ``side``, up to ``full``, lowest first."""
        return list(range(side + self.patch, self.full + 1, self.patch))

    def tokens(self, side: int) -> int:
        return (side // self.patch) ** 2


def current_side(state: AutoState, grid: SideGrid) -> int:
    """The last decided side (full before any)."""
    return state.sides[-1][1] if state.sides else grid.full


def side_start(grid: SideGrid, saved: float | None) -> Decision:
    """Before epoch 0: ``grid.low`` from epoch 0 (an untrained model has learned nothing a lower resolution
    could take away), unless timed steps at that side save nothing (``saved`` <= 0; None:
    ``patches_must_pay`` off, not checked)."""
    if saved is not None and saved <= 0:
        return Decision(
            "side",
            grid.full,
            "side_seconds_saved_per_epoch",
            saved,
            0.0,
            f"training at {grid.low} px saves {saved:.3g} s per epoch (timed steps): full size for the run",
            from_epoch=0,
        )
    times = "the time saved is not checked" if saved is None else f"saves {saved:.3g} s per epoch (timed steps)"
    return Decision(
        "side",
        grid.low,
        "side_at_start",
        None,
        None,
        f"{grid.low} px ({grid.tokens(grid.low)} of {grid.tokens(grid.full)} tokens) from the start: {times}; the "
        "side rises when the probe says the model needs more",
        from_epoch=0,
    )


def side_off(gap: float | None, a: AutoConfig) -> bool:
    """Whether a side's probe loss is more than ``keep_tolerance`` of the loss learned away from full size's
    (either way; None: not measured)."""
    return gap is not None and abs(gap) > a.keep_tolerance


def side_rungs(state: AutoState, a: AutoConfig, grid: SideGrid, rise: float | None) -> list[int]:
    """The sides to probe, lowest first, when the current one is off (:func:`side_off`; the controller stops at
    the first that is not); full size is never probed (it is the reference)."""
    if not side_off(rise, a):
        return []
    return grid.above(current_side(state, grid))[:-1]


def stall_lever(side_rise: float | None, patch_rise: float | None, patches: bool, side_full: bool) -> str:
    """Which lever a train-loss stall raises: ``side`` or ``patches``. The one whose probe is further from the
    all-token loss (the side's gap counts either way; a lever at full size, or off, cannot take it); without both,
    the side (a lower resolution keeps every part of the image, random patches do not)."""
    if not patches:
        return "side"
    if side_full:
        return "patches"
    if side_rise is None or patch_rise is None:
        return "side"
    return "side" if abs(side_rise) >= patch_rise else "patches"


def side_decision(
    state: AutoState,
    a: AutoConfig,
    epoch: int,
    grid: SideGrid,
    rise: float | None,
    rungs: list[tuple[int, float]],
    loss: float,
    prev_loss: float | None,
    takes_stall: bool = True,
) -> Decision | None:
    """Raise to the first probed ``rungs`` (side, gap) within ``keep_tolerance`` (else full size) when the
    current side is off (:func:`side_off`); else one patch larger when the train loss fell by less than
    ``keep_stall`` (0: off) in an epoch that started on the same tokens and model as the one before, and this
    lever ``takes_stall`` (:func:`stall_lever`)."""
    side = current_side(state, grid)
    if side >= grid.full:
        return None
    if rise is not None and side_off(rise, a):
        to = next((s for s, x in rungs if not side_off(x, a)), grid.full)
        what = (
            f"gives back {rise:.1%} of the loss learned"
            if rise > 0
            else f"is {-rise:.1%} of the loss learned below the loss at {grid.full} px (the model fits the side it "
            "trains at, not the one it is evaluated at)"
        )
        return Decision(
            "side",
            to,
            "side_loss_gap_of_learned",
            rise,
            a.keep_tolerance,
            f"the loss on the probe batches at {side} px {what}: {to} px ({grid.tokens(to)} tokens) from now on",
        )
    if prev_loss is None or not takes_stall or state.lever_changed(epoch):
        return None
    gain = (prev_loss - loss) / prev_loss
    if a.keep_stall > 0 and gain < a.keep_stall:
        to = side + grid.patch
        return Decision(
            "side",
            to,
            "train_loss_improvement_at_side",
            gain,
            a.keep_stall,
            f"the train loss at {side} px fell by {gain:.1%} this epoch: {to} px ({grid.tokens(to)} tokens) "
            "from now on",
        )
    return None
