"""Phi-accrual failure detection (Hayashibara et al. 2004), after Akka's
``PhiAccrualFailureDetector``.

A detector keeps the last ``max_sample_size`` intervals between a peer's heartbeats. Given the
time since the last heartbeat, ``phi`` says how unlikely such a silence is under a normal model
of those intervals::

    mean_eff = mean(intervals) + acceptable_heartbeat_pause_s
    std_eff  = max(std(intervals), min_std_deviation_s)
    y        = (elapsed_s - mean_eff) / std_eff
    P_later  = 1 - F(y),  F(y) ~ 1 / (1 + exp(-y * (1.5976 + 0.070566 * y**2)))
    phi      = -log10(P_later)

(the logistic approximation of the normal CDF, error < 1.4e-4; Bowling et al. 2009). Akka writes
phi in two branches for precision; both equal ``log10(1 + exp(a))`` with
``a = y * (1.5976 + 0.070566 * y**2)``, computed here as ``logaddexp(0, a) / ln 10``, which is
finite and exact for every ``a`` (no overflow at long silences, no ``log10(0)``).

Bootstrap: the first heartbeat starts the history as ``[estimate - estimate/4,
estimate + estimate/4]``. An interval that ends a silence during which the peer was not
available is not added to the history, so one long pause does not teach the detector to tolerate
long pauses (Akka does the same). A peer never heard from has phi 0.

Everything here is pure: times are passed in, nothing reads a clock.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from numpy.typing import ArrayLike, NDArray

from topology.config import MeshConfig

__all__ = ["PhiAccrualDetector", "elapsed_for_phi", "phi_from_stats", "phi_many"]

_LN10 = math.log(10.0)
_A1, _A3 = 1.5976, 0.070566


def phi_from_stats(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """Phi of a silence of ``elapsed_s`` given the effective mean and std of the intervals
    (pause already added to the mean, floor already applied to the std). ``std_s`` > 0."""
    y = (elapsed_s - mean_s) / std_s
    a = y * (_A1 + _A3 * y * y)
    # log10(1 + e^a), stable for any a.
    if a > 0:
        return (a + math.log1p(math.exp(-a))) / _LN10
    return math.log1p(math.exp(a)) / _LN10


def phi_many(elapsed_s: ArrayLike, mean_s: ArrayLike, std_s: ArrayLike) -> NDArray[np.float64]:
    """Vectorized :func:`phi_from_stats` over arrays (broadcast together): phi for many peers
    at once. Entries with NaN elapsed (a peer never heard from) give phi 0."""
    elapsed = np.asarray(elapsed_s, dtype=np.float64)
    never = np.isnan(elapsed)
    mean = np.asarray(mean_s, dtype=np.float64)
    y = (np.where(never, mean, elapsed) - mean) / np.asarray(std_s, dtype=np.float64)
    with np.errstate(over="ignore"):  # a huge silence: a ** 3 overflows to inf, phi inf
        a = y * (_A1 + _A3 * y * y)
        out = np.logaddexp(0.0, a) / _LN10
    return np.where(never, 0.0, out)


def elapsed_for_phi(phi: float, mean_s: float, std_s: float) -> float:
    """The silence after which phi reaches ``phi`` (inverse of :func:`phi_from_stats`), for
    reading presets: ``mean_s + y * std_s`` where ``y`` solves the logistic model."""
    a = phi * _LN10 + math.log(-math.expm1(-phi * _LN10))  # log(10**phi - 1)
    lo, hi = -50.0, 50.0
    for _ in range(200):  # bisection on the monotone cubic y * (A1 + A3 y^2) = a
        mid = (lo + hi) / 2
        if mid * (_A1 + _A3 * mid * mid) < a:
            lo = mid
        else:
            hi = mid
    return mean_s + (lo + hi) / 2 * std_s


class PhiAccrualDetector:
    """Phi-accrual detector for one peer. Feed it heartbeat arrival times; ask it for phi.

    Arguments mirror Akka's: ``threshold`` (phi at or above which the peer is not available),
    ``max_sample_size`` intervals kept, ``min_std_deviation_s`` floor,
    ``acceptable_heartbeat_pause_s`` added to the mean, ``first_heartbeat_estimate_s`` to
    bootstrap. Arrival times must not decrease (they come from one monotonic clock).
    """

    __slots__ = ("threshold", "max_sample_size", "min_std_deviation_s",
                 "acceptable_heartbeat_pause_s", "first_heartbeat_estimate_s",
                 "_intervals", "_sum", "_sq_sum", "_last_s")

    def __init__(self, *, threshold: float = 8.0, max_sample_size: int = 1000,
                 min_std_deviation_s: float = 0.1, acceptable_heartbeat_pause_s: float = 3.0,
                 first_heartbeat_estimate_s: float = 1.0) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold = {threshold!r}: must be > 0")
        if max_sample_size < 2:
            raise ValueError(f"max_sample_size = {max_sample_size!r}: must be >= 2")
        if not min_std_deviation_s > 0:
            raise ValueError(f"min_std_deviation_s = {min_std_deviation_s!r}: must be > 0")
        if not acceptable_heartbeat_pause_s >= 0:
            raise ValueError(
                f"acceptable_heartbeat_pause_s = {acceptable_heartbeat_pause_s!r}: must be >= 0")
        if not first_heartbeat_estimate_s > 0:
            raise ValueError(
                f"first_heartbeat_estimate_s = {first_heartbeat_estimate_s!r}: must be > 0")
        self.threshold = float(threshold)
        self.max_sample_size = int(max_sample_size)
        self.min_std_deviation_s = float(min_std_deviation_s)
        self.acceptable_heartbeat_pause_s = float(acceptable_heartbeat_pause_s)
        self.first_heartbeat_estimate_s = float(first_heartbeat_estimate_s)
        self._intervals: deque[float] = deque()
        self._sum = 0.0
        self._sq_sum = 0.0
        self._last_s: float | None = None

    @classmethod
    def from_config(cls, config: MeshConfig) -> PhiAccrualDetector:
        return cls(threshold=config.phi_threshold, max_sample_size=config.max_sample_size,
                   min_std_deviation_s=config.min_std_deviation_s,
                   acceptable_heartbeat_pause_s=config.acceptable_heartbeat_pause_s,
                   first_heartbeat_estimate_s=config.first_heartbeat_estimate_s)

    # -- feeding -------------------------------------------------------------------------------

    def heartbeat(self, now_s: float) -> None:
        """Record a heartbeat that arrived at ``now_s``."""
        last = self._last_s
        if last is None:
            self._bootstrap()
        else:
            interval = now_s - last
            if interval < 0:
                raise ValueError(f"now_s = {now_s!r}: earlier than the last heartbeat {last!r}")
            # A heartbeat that ends an unavailable stretch is not a sample (Akka): it would
            # teach the detector that long pauses are normal.
            if self.is_available(now_s):
                self._add(interval)
        self._last_s = now_s

    def reset(self) -> None:
        """Forget everything (a peer restarted with a new incarnation): phi is 0 until the next
        heartbeat, which bootstraps the history again."""
        self._intervals.clear()
        self._sum = self._sq_sum = 0.0
        self._last_s = None

    def _bootstrap(self) -> None:
        mean = self.first_heartbeat_estimate_s
        std = mean / 4
        self._intervals.clear()
        self._sum = self._sq_sum = 0.0
        self._add(mean - std)
        self._add(mean + std)

    def _add(self, interval_s: float) -> None:
        if len(self._intervals) >= self.max_sample_size:
            old = self._intervals.popleft()
            self._sum -= old
            self._sq_sum -= old * old
        self._intervals.append(interval_s)
        self._sum += interval_s
        self._sq_sum += interval_s * interval_s

    # -- reading -------------------------------------------------------------------------------

    @property
    def last_heartbeat_s(self) -> float | None:
        """Arrival time of the last heartbeat, ``None`` before the first."""
        return self._last_s

    @property
    def sample_count(self) -> int:
        return len(self._intervals)

    @property
    def interval_mean_s(self) -> float:
        """Mean of the interval history (without the acceptable pause); NaN before any."""
        n = len(self._intervals)
        return self._sum / n if n else math.nan

    @property
    def interval_std_s(self) -> float:
        """Population std of the interval history (without the floor); NaN before any."""
        n = len(self._intervals)
        if not n:
            return math.nan
        mean = self._sum / n
        return math.sqrt(max(0.0, self._sq_sum / n - mean * mean))

    @property
    def mean_s(self) -> float:
        """Effective mean used by phi: interval mean + acceptable pause."""
        return self.interval_mean_s + self.acceptable_heartbeat_pause_s

    @property
    def std_s(self) -> float:
        """Effective std used by phi: max(interval std, min_std_deviation_s)."""
        return max(self.interval_std_s, self.min_std_deviation_s)

    def phi(self, now_s: float) -> float:
        """Suspicion level at ``now_s``; 0 for a peer never heard from."""
        if self._last_s is None:
            return 0.0
        return phi_from_stats(now_s - self._last_s, self.mean_s, self.std_s)

    def is_available(self, now_s: float) -> bool:
        """``phi(now_s) < threshold``."""
        return self.phi(now_s) < self.threshold

    def silence_until_threshold_s(self) -> float:
        """How long after the last heartbeat phi reaches the threshold, with the current
        history (``elapsed_for_phi(threshold, mean_s, std_s)``); NaN before the first."""
        if self._last_s is None:
            return math.nan
        return elapsed_for_phi(self.threshold, self.mean_s, self.std_s)

    def __repr__(self) -> str:
        return (f"PhiAccrualDetector(last_s={self._last_s!r}, samples={self.sample_count}, "
                f"mean_s={self.mean_s:.4f}, std_s={self.std_s:.4f})")
