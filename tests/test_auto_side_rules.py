"""The resolution rules of ``schedule.mode: auto`` (:mod:`lotus.features.schedule.auto_side_rules`) as pure
functions: sides in whole patches, the start, raises on a probe rise or a stall, and which lever takes a stall."""

from __future__ import annotations

import pytest

from lotus.features.schedule import auto_side_rules as sr
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.config import AutoConfig

GRID = sr.SideGrid.of(28, 4, 0.5)  # Fashion-MNIST at patch 4: 12 px (9 tokens) up to 28 px (49 tokens)
A = AutoConfig(keep_tolerance=0.2, keep_stall=0.05)


def _state(*sides: tuple[int, int], epochs: int = 10) -> AutoState:
    st = AutoState(epochs=epochs, anneal_share=0.2, max_warmup=0.5)
    st.record({"what": "reduce", "from_epoch": 2, "value": 2})
    for e, s in sides:
        st.record({"what": "side", "from_epoch": e, "value": s})
    return st


def test_grid_is_whole_patches_with_two_a_side_at_least():
    assert (GRID.low, GRID.full, GRID.patch) == (12, 28, 4) and GRID.tokens(12) == 9
    assert GRID.above(12) == [16, 20, 24, 28] and GRID.above(28) == []
    assert sr.SideGrid.of(32, 4, 0.1).low == 8 and sr.SideGrid.of(32, 4, 0.75).low == 24
    assert sr.SideGrid.of(8, 4, 0.5).low == 8  # two patches a side is the floor: nothing to lower


def test_start_is_the_lowest_side_unless_it_saves_nothing():
    d = sr.side_start(GRID, 2.5)
    assert (d.what, d.value, d.from_epoch, d.signal) == ("side", 12, 0, "side_at_start")
    assert "12 px (9 of 49 tokens)" in d.reason and "saves 2.5 s per epoch" in d.reason
    assert sr.side_start(GRID, None).value == 12 and "not checked" in sr.side_start(GRID, None).reason
    off = sr.side_start(GRID, 0.0)
    assert (off.value, off.signal, off.from_epoch) == (28, "side_seconds_saved_per_epoch", 0)


def test_side_state_follows_decisions_full_in_the_anneal_and_replays():
    st = _state((0, 12), (4, 20))
    assert [st.side(e) for e in range(10)] == [12] * 4 + [20] * 4 + [None] * 2  # anneal from 8: full size
    assert sr.current_side(st, GRID) == 20 and sr.current_side(_state(), GRID) == 28
    again = AutoState(epochs=10, anneal_share=0.2, max_warmup=0.5)
    again.load(st.decisions)
    assert [again.side(e) for e in range(10)] == [st.side(e) for e in range(10)]
    assert st.lever_changed(4) and not st.lever_changed(3) and not st.lever_changed(5)


def test_rungs_are_probed_only_when_the_side_gives_back_too_much():
    st = _state((0, 12))
    assert sr.side_rungs(st, A, GRID, None) == [] and sr.side_rungs(st, A, GRID, 0.2) == []  # exactly met: hold
    assert sr.side_rungs(st, A, GRID, 0.21) == [16, 20, 24]  # full size is never probed


def test_a_rise_raises_to_the_first_rung_within_tolerance_else_full():
    st = _state((0, 12))
    d = sr.side_decision(st, A, 3, GRID, 0.5, [(16, 0.4), (20, 0.15)], 1.0, 1.0)
    assert (d.what, d.value, d.signal, d.measured, d.threshold) == ("side", 20, "side_loss_gap_of_learned", 0.5, 0.2)
    assert "at 12 px gives back 50.0%" in d.reason and "20 px (25 tokens)" in d.reason
    assert sr.side_decision(st, A, 3, GRID, 0.5, [(16, 0.4), (20, 0.3), (24, 0.25)], 1.0, 1.0).value == 28


def test_a_model_fitting_its_small_side_better_than_full_size_raises_it_too():
    # the gap counts either way: lower loss at 12 px than at 28 px means the model fits the side it trains at
    st = _state((0, 12))
    assert sr.side_rungs(st, A, GRID, -0.3) == [16, 20, 24] and sr.side_rungs(st, A, GRID, -0.2) == []
    d = sr.side_decision(st, A, 3, GRID, -0.3, [(16, -0.25), (20, 0.1)], 1.0, 1.0)
    assert (d.value, d.signal, d.measured) == (20, "side_loss_gap_of_learned", -0.3)
    assert "30.0% of the loss learned below the loss at 28 px" in d.reason
    assert sr.side_off(-0.21, A) and not sr.side_off(0.2, A) and not sr.side_off(None, A)


def test_a_stall_raises_one_patch_when_this_lever_takes_it():
    st = _state((0, 12))
    d = sr.side_decision(st, A, 3, GRID, 0.1, [], loss=0.97, prev_loss=1.0)  # fell 3 % < 5 %
    assert (d.value, d.signal, d.threshold) == (16, "train_loss_improvement_at_side", 0.05)
    assert sr.side_decision(st, A, 3, GRID, 0.1, [], loss=0.9, prev_loss=1.0) is None  # fell 10 %: no stall
    assert sr.side_decision(st, A, 3, GRID, 0.1, [], 0.97, 1.0, takes_stall=False) is None  # patches take it
    assert sr.side_decision(st, A, 3, GRID, 0.1, [], 0.97, None) is None  # no epoch before
    assert sr.side_decision(st, AutoConfig(keep_stall=0.0), 3, GRID, 0.1, [], 0.97, 1.0) is None  # stall off
    raised = _state((0, 12), (3, 16))
    assert sr.side_decision(raised, A, 3, GRID, 0.1, [], 0.97, 1.0) is None  # epoch 3 started at another side
    assert sr.side_decision(_state((0, 28)), A, 3, GRID, 0.9, [], 0.97, 1.0) is None  # full size: nothing to raise


@pytest.mark.parametrize(
    "side_rise, patch_rise, patches, side_full, lever",
    [
        (0.1, 0.3, True, False, "patches"),  # random patches give back more: they take the stall
        (0.3, 0.1, True, False, "side"),
        (0.2, 0.2, True, False, "side"),  # a tie: the side (every part of the image stays)
        (-0.3, 0.1, True, False, "side"),  # the side's gap counts either way
        (None, 0.3, True, False, "side"),  # nothing measured yet
        (0.1, 0.3, False, False, "side"),  # patches off or at all
        (0.3, 0.1, True, True, "patches"),  # the side is full size already
    ],
)
def test_stall_goes_to_the_lever_that_gives_back_more(side_rise, patch_rise, patches, side_full, lever):
    assert sr.stall_lever(side_rise, patch_rise, patches, side_full) == lever
