"""Pure supervision policy: restart decisions, restart plans, intensity window, backoff.

Nothing here touches Ray or reads the wall clock: every function takes the time it needs, so
the OTP semantics can be tested with a fake clock (see tests/test_policy.py).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .spec import Backoff

NORMAL = "normal"
ABNORMAL = "abnormal"


def should_restart(restart: str, exit_kind: str) -> bool:
    """OTP: permanent always; transient only after an abnormal exit; temporary never."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return exit_kind == ABNORMAL
    return False


def status_after_exit(exit_kind: str) -> str:
    """The status of a child that exited and will not be restarted."""
    return "stopped" if exit_kind == NORMAL else "failed"


@dataclass(frozen=True)
class RestartPlan:
    """What a supervisor does about one child's exit: stop ``stop`` (already in reverse start
    order), then start ``start`` (in spec order). ``drop`` are temporary children that were
    taken down with the failed one and are not started again."""

    stop: tuple[str, ...]
    start: tuple[str, ...]
    drop: tuple[str, ...]


def restart_plan(
    strategy: str,
    order: Sequence[str],
    failed: str,
    running: set[str],
    restart_types: dict[str, str],
) -> RestartPlan:
    """Which siblings a strategy takes down with ``failed`` and which come back.

    ``order`` is the start order; ``running`` the children alive now (``failed`` excluded).
    The failed child is always in ``start`` (its own restart type was checked by the caller).
    """
    if strategy == "one_for_one":
        return RestartPlan(stop=(), start=(failed,), drop=())
    if strategy == "one_for_all":
        affected = list(order)
    elif strategy == "rest_for_one":
        affected = list(order[order.index(failed):])
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    stop = tuple(cid for cid in reversed(affected) if cid != failed and cid in running)
    drop = tuple(cid for cid in affected
                 if cid != failed and restart_types.get(cid) == "temporary")
    start = tuple(cid for cid in affected
                  if cid == failed or (cid in running and cid not in drop))
    return RestartPlan(stop=stop, start=start, drop=drop)


class RestartIntensity:
    """OTP's restart limit: more than ``intensity`` restarts within ``period_s`` (sliding) is
    too many. Restarts are recorded by time; ``record`` says whether the limit is now exceeded."""

    def __init__(self, intensity: int, period_s: float, history: Sequence[float] = ()) -> None:
        self.intensity = intensity
        self.period_s = period_s
        self._times: deque[float] = deque(sorted(history))

    def record(self, now: float) -> bool:
        """Count one restart at ``now``; True when that makes it more than ``intensity``."""
        self._times.append(now)
        self._expire(now)
        return len(self._times) > self.intensity

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._times)

    def history(self) -> list[float]:
        return list(self._times)

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.period_s:
            self._times.popleft()


class BackoffState:
    """Per-child restart delay with capped exponential growth and jitter (see ``Backoff``)."""

    def __init__(self, policy: Backoff, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay_s(self, now: float, last_started_at: float | None) -> float:
        """Delay before the next restart of a child that exited at ``now``."""
        p = self.policy
        if last_started_at is not None and now - last_started_at >= p.reset_after_s:
            self.attempt = 0
        self.attempt += 1
        if self.attempt <= 1 or p.initial_s <= 0:
            return 0.0
        base = min(p.max_s, p.initial_s * p.multiplier ** (self.attempt - 2))
        return max(0.0, base * self._rng.uniform(1 - p.jitter, 1 + p.jitter))
