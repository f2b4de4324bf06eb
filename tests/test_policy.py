"""OTP policy as pure functions: restart decisions, plans, intensity window, backoff."""

from __future__ import annotations

import random

import pytest

from supervisors._policy import (
    ABNORMAL,
    NORMAL,
    BackoffState,
    RestartIntensity,
    restart_plan,
    should_restart,
    status_after_exit,
)
from supervisors.spec import Backoff


@pytest.mark.parametrize(
    ("restart", "kind", "expected"),
    [
        ("permanent", NORMAL, True), ("permanent", ABNORMAL, True),
        ("transient", NORMAL, False), ("transient", ABNORMAL, True),
        ("temporary", NORMAL, False), ("temporary", ABNORMAL, False),
    ],
)
def test_should_restart_when_exit_kind_then_otp_table(restart: str, kind: str,
                                                      expected: bool) -> None:
    assert should_restart(restart, kind) is expected


def test_status_after_exit_when_normal_then_stopped_else_failed() -> None:
    assert status_after_exit(NORMAL) == "stopped"
    assert status_after_exit(ABNORMAL) == "failed"


ORDER = ["a", "b", "c", "d"]
TYPES = {"a": "permanent", "b": "temporary", "c": "transient", "d": "permanent"}


def test_restart_plan_when_one_for_one_then_only_failed() -> None:
    plan = restart_plan("one_for_one", ORDER, "b", {"a", "c", "d"}, TYPES)
    assert (plan.stop, plan.start, plan.drop) == ((), ("b",), ())


def test_restart_plan_when_one_for_all_then_others_stop_reversed_and_temporary_dropped() -> None:
    plan = restart_plan("one_for_all", ORDER, "c", {"a", "b", "d"}, TYPES)
    assert plan.stop == ("d", "b", "a")
    assert plan.drop == ("b",)
    assert plan.start == ("a", "c", "d")


def test_restart_plan_when_rest_for_one_then_later_siblings_only() -> None:
    plan = restart_plan("rest_for_one", ORDER, "b", {"a", "c", "d"}, TYPES)
    assert plan.stop == ("d", "c")
    assert plan.start == ("b", "c", "d")
    assert plan.drop == ()


def test_restart_plan_when_sibling_not_running_then_it_stays_down() -> None:
    plan = restart_plan("one_for_all", ORDER, "a", {"d"}, TYPES)
    assert plan.stop == ("d",)
    assert plan.start == ("a", "d")


def test_intensity_when_more_than_limit_in_window_then_exceeded() -> None:
    window = RestartIntensity(intensity=2, period_s=5.0)
    assert not window.record(0.0)
    assert not window.record(1.0)
    assert window.record(2.0)


def test_intensity_when_restarts_spread_beyond_period_then_never_exceeded() -> None:
    window = RestartIntensity(intensity=1, period_s=5.0)
    for t in range(0, 60, 6):
        assert not window.record(float(t))


def test_intensity_when_zero_then_first_restart_exceeds() -> None:
    assert RestartIntensity(intensity=0, period_s=1.0).record(0.0)


def test_intensity_when_history_restored_then_window_continues() -> None:
    window = RestartIntensity(intensity=2, period_s=10.0, history=[1.0, 2.0])
    assert window.record(3.0)


def test_backoff_when_first_restart_then_immediate_then_grows_capped() -> None:
    state = BackoffState(Backoff(initial_s=0.1, multiplier=2.0, max_s=0.5, jitter=0.0,
                                 reset_after_s=10.0), random.Random(1))
    delays = [state.next_delay_s(now=float(i), last_started_at=float(i)) for i in range(6)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.5, 0.5]


def test_backoff_when_child_stayed_up_then_resets() -> None:
    state = BackoffState(Backoff(initial_s=0.1, jitter=0.0, reset_after_s=10.0))
    state.next_delay_s(0.0, 0.0)
    assert state.next_delay_s(1.0, 0.5) == pytest.approx(0.1)
    assert state.next_delay_s(100.0, 50.0) == 0.0


def test_backoff_when_jitter_then_within_bounds() -> None:
    state = BackoffState(Backoff(initial_s=1.0, multiplier=1.0, max_s=1.0, jitter=0.2),
                         random.Random(7))
    state.next_delay_s(0.0, 0.0)
    for i in range(200):
        assert 0.8 <= state.next_delay_s(float(i), float(i)) <= 1.2
