"""Tests for topology.clock."""

import pytest

from topology.clock import Clock, ManualClock, MonotonicClock, SkewedClock


def test_advance_when_positive_then_now_moves_by_exactly_dt():
    clock = ManualClock(start_s=10.0)
    assert clock.advance(0.25) == 10.25
    assert clock.now_s() == 10.25


def test_advance_when_negative_then_value_error_names_dt():
    clock = ManualClock()
    with pytest.raises(ValueError, match="dt_s = -1.0"):
        clock.advance(-1.0)
    assert clock.now_s() == 0.0


def test_set_when_earlier_than_now_then_value_error():
    clock = ManualClock(start_s=5.0)
    clock.set(7.0)
    assert clock.now_s() == 7.0
    with pytest.raises(ValueError, match="t_s = 6.0"):
        clock.set(6.0)


def test_construct_when_start_is_nan_then_value_error():
    with pytest.raises(ValueError, match="start_s"):
        ManualClock(start_s=float("nan"))


def test_now_when_skewed_then_offset_from_base_and_follows_base():
    base = ManualClock(start_s=100.0)
    skewed = SkewedClock(base, offset_s=-2.5)
    assert skewed.now_s() == 97.5
    base.advance(1.0)
    assert skewed.now_s() == 98.5
    skewed.offset_s = 3.0
    assert skewed.now_s() == 104.0


def test_now_when_monotonic_then_never_decreases_and_is_a_clock():
    clock = MonotonicClock()
    samples = [clock.now_s() for _ in range(1000)]
    assert samples == sorted(samples)
    assert isinstance(clock, Clock) and isinstance(ManualClock(), Clock)
