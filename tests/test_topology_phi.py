"""Tests for topology.phi: the phi-accrual failure detector (Akka's as the reference)."""

import math
import random

import numpy as np
import pytest

from topology.config import LAN, LOCAL
from topology.phi import PhiAccrualDetector, elapsed_for_phi, phi_from_stats, phi_many


def _akka_phi(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """Akka's two-branch formula, written out independently of the module's stable form."""
    y = (elapsed_s - mean_s) / std_s
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if elapsed_s > mean_s:
        return -math.log10(e / (1.0 + e))
    return -math.log10(1.0 - 1.0 / (1.0 + e))


def _detector(**kw) -> PhiAccrualDetector:
    args = dict(threshold=8.0, max_sample_size=1000, min_std_deviation_s=0.1,
                acceptable_heartbeat_pause_s=0.0, first_heartbeat_estimate_s=1.0)
    args.update(kw)
    return PhiAccrualDetector(**args)


def _regular(det: PhiAccrualDetector, interval_s: float, count: int, start_s: float = 0.0,
             ) -> float:
    t = start_s
    for _ in range(count):
        det.heartbeat(t)
        t += interval_s
    return t - interval_s


def test_phi_when_never_heard_then_zero_and_available():
    det = _detector()
    assert det.phi(1e6) == 0.0
    assert det.is_available(1e6)
    assert det.last_heartbeat_s is None


def test_phi_when_first_heartbeat_then_bootstrap_matches_hand_computed_values():
    # Bootstrap history [0.75, 1.25]: mean 1.0, std 0.25 (estimate / 4).
    det = _detector()
    det.heartbeat(10.0)
    assert det.interval_mean_s == pytest.approx(1.0)
    assert det.interval_std_s == pytest.approx(0.25)
    assert det.phi(11.0) == pytest.approx(math.log10(2.0))     # y = 0
    assert det.phi(11.25) == pytest.approx(0.7995083, abs=1e-6)  # y = 1
    assert det.phi(11.75) == pytest.approx(2.9094753, abs=1e-6)  # y = 3
    assert det.phi(10.5) == pytest.approx(0.0099988, abs=1e-6)   # y = -2


def test_phi_when_compared_to_akka_formula_then_equal_over_a_grid():
    # y in [-6, 9]: beyond ~9 Akka's form hits log10(0) in float64 (the module's does not).
    for y in np.linspace(-6.0, 9.0, 151):
        for mean, std in [(1.0, 0.25), (0.13, 0.02), (0.5, 0.1)]:
            elapsed = mean + float(y) * std
            assert phi_from_stats(elapsed, mean, std) == pytest.approx(
                _akka_phi(elapsed, mean, std), rel=1e-9, abs=1e-12)


def test_phi_when_y_is_three_then_close_to_the_exact_normal_tail():
    exact = -math.log10(math.erfc(3 / math.sqrt(2)) / 2)  # 2.8697
    assert phi_from_stats(3.0, 0.0, 1.0) == pytest.approx(exact, abs=0.05)


def test_phi_when_silence_grows_then_phi_never_decreases_property():
    rng = random.Random(7)
    for _ in range(50):
        det = _detector(acceptable_heartbeat_pause_s=rng.uniform(0, 1),
                        min_std_deviation_s=rng.uniform(0.01, 0.2))
        t = 0.0
        for _ in range(rng.randint(1, 40)):
            det.heartbeat(t)
            t += rng.uniform(0.05, 2.0)
        last = det.last_heartbeat_s
        phis = [det.phi(last + dt) for dt in np.linspace(0, 50, 400)]
        assert all(b >= a for a, b in zip(phis, phis[1:], strict=False))
        assert all(math.isfinite(p) for p in phis)


def test_phi_when_silence_is_enormous_then_finite_or_inf_never_an_error():
    det = _detector()
    det.heartbeat(0.0)
    assert det.phi(1e9) > 1e20
    assert not det.is_available(1e9)
    assert phi_from_stats(-1e9, 0.0, 1.0) == 0.0


def test_is_available_when_threshold_crossed_then_at_the_predicted_elapsed():
    det = _detector(acceptable_heartbeat_pause_s=0.5)
    last = _regular(det, 1.0, 20)
    cross = det.silence_until_threshold_s()
    assert cross == pytest.approx(elapsed_for_phi(8.0, det.mean_s, det.std_s))
    assert det.is_available(last + cross - 1e-6)
    assert not det.is_available(last + cross + 1e-6)


def test_heartbeat_when_intervals_are_regular_then_std_floored_at_min_std_deviation():
    det = _detector(max_sample_size=10, min_std_deviation_s=0.1)
    _regular(det, 1.0, 30)  # the bootstrap samples have left the 10-sample window
    assert det.sample_count == 10
    assert det.interval_std_s == pytest.approx(0.0, abs=1e-6)
    assert det.std_s == 0.1
    assert det.mean_s == pytest.approx(1.0)


def test_heartbeat_when_window_full_then_oldest_samples_leave():
    # A large acceptable pause keeps every heartbeat "available", so every interval counts.
    det = _detector(max_sample_size=5, acceptable_heartbeat_pause_s=100.0)
    last = _regular(det, 1.0, 4)       # bootstrap [0.75, 1.25] + three 1.0 s samples
    assert det.sample_count == 5
    assert det.interval_mean_s == pytest.approx(1.0)
    _regular(det, 2.0, 6, start_s=last + 2.0)  # five 2.0 s intervals push everything else out
    assert det.sample_count == 5
    assert det.interval_mean_s == pytest.approx(2.0)
    assert det.interval_std_s == pytest.approx(0.0, abs=1e-6)


def test_heartbeat_when_it_ends_an_unavailable_pause_then_interval_not_sampled():
    det = _detector()
    last = _regular(det, 1.0, 10)
    before = det.sample_count, det.interval_mean_s
    det.heartbeat(last + 30.0)  # phi ~ huge at 30 s: not a sample
    assert (det.sample_count, det.interval_mean_s) == before
    det.heartbeat(last + 31.0)  # back to normal: sampled
    assert det.sample_count == before[0] + 1


def test_phi_when_jittery_heartbeats_then_never_crosses_threshold_property():
    # Intervals 50 ms +- 20 ms uniform; LOCAL settings tolerate that with a large margin.
    rng = random.Random(11)
    det = PhiAccrualDetector.from_config(LOCAL)
    t = 0.0
    worst = 0.0
    for _ in range(5000):
        gap = 0.05 + rng.uniform(-0.02, 0.02)
        worst = max(worst, det.phi(t + gap))
        t += gap
        det.heartbeat(t)
    assert worst < LOCAL.phi_threshold / 4
    assert det.interval_mean_s == pytest.approx(0.05, abs=0.002)


def test_phi_when_local_preset_and_node_stops_then_threshold_crossed_within_budget():
    det = PhiAccrualDetector.from_config(LOCAL)
    last = _regular(det, 0.05, 200)
    cross = det.silence_until_threshold_s()
    # 0.05 + 0.08 + 5.23 * 0.02 ~ 0.235 s (config docstring)
    assert 0.2 < cross < 0.25
    assert det.is_available(last + 0.2)
    assert not det.is_available(last + 0.25)


def test_reset_when_new_incarnation_then_history_restarts_from_bootstrap():
    det = PhiAccrualDetector.from_config(LAN)
    last = _regular(det, 0.5, 50)      # a slow peer: mean 0.5 s
    assert det.interval_mean_s == pytest.approx(0.5, abs=0.05)
    det.reset()
    assert det.phi(last + 100.0) == 0.0
    det.heartbeat(last + 100.0)
    assert det.sample_count == 2
    assert det.interval_mean_s == pytest.approx(LAN.first_heartbeat_estimate_s)


def test_heartbeat_when_time_goes_back_then_value_error():
    det = _detector()
    det.heartbeat(5.0)
    with pytest.raises(ValueError, match="earlier than the last heartbeat"):
        det.heartbeat(4.0)


@pytest.mark.parametrize("kw,field", [
    (dict(threshold=0.0), "threshold"), (dict(max_sample_size=1), "max_sample_size"),
    (dict(min_std_deviation_s=0.0), "min_std_deviation_s"),
    (dict(acceptable_heartbeat_pause_s=-1.0), "acceptable_heartbeat_pause_s"),
    (dict(first_heartbeat_estimate_s=0.0), "first_heartbeat_estimate_s")])
def test_construct_when_parameter_out_of_range_then_value_error_names_it(kw, field):
    with pytest.raises(ValueError, match=field):
        _detector(**kw)


def test_phi_many_when_given_arrays_then_matches_scalar_and_nan_is_zero_property():
    rng = np.random.default_rng(3)
    elapsed = rng.uniform(0, 3, 500)
    mean = rng.uniform(0.05, 1.5, 500)
    std = rng.uniform(0.01, 0.5, 500)
    got = phi_many(elapsed, mean, std)
    want = [phi_from_stats(e, m, s) for e, m, s in zip(elapsed, mean, std, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert phi_many([math.nan, 0.0], 1.0, 0.1)[0] == 0.0
    assert np.isinf(phi_many([1e200], 0.0, 1.0)[0])


def test_elapsed_for_phi_when_round_tripped_then_gives_back_phi():
    for phi in (0.5, 1.0, 3.0, 8.0, 12.0):
        assert phi_from_stats(elapsed_for_phi(phi, 0.3, 0.07), 0.3, 0.07) == pytest.approx(phi)
