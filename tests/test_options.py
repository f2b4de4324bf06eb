"""Black-Scholes / Black-76 prices, Greeks and implied vol (actors.options): textbook values,
property tests over seeded random inputs, finite differences, and bad rows masked not raised."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest

from actors.options import (
    DAYS_PER_YEAR,
    IVStatus,
    black76_greeks,
    black76_implied_vol,
    black76_price,
    bs_greeks,
    bs_implied_vol,
    bs_price,
    call_put_sign,
    norm_cdf,
    norm_cdf_fast,
    norm_pdf,
    norm_ppf,
    portfolio_greeks,
)

N_POINTS = 2_000


def _random_bs_inputs(seed: int, n: int = N_POINTS) -> dict[str, np.ndarray]:
    """Moderate inputs (where finite differences are well conditioned)."""
    rng = np.random.default_rng(seed)
    spot = rng.uniform(50.0, 150.0, n)
    return {
        "is_call": rng.random(n) < 0.5,
        "spot": spot,
        "strike": spot * np.exp(rng.uniform(-0.4, 0.4, n)),
        "t_years": rng.uniform(0.05, 2.0, n),
        "vol": rng.uniform(0.1, 1.2, n),
        "rate": rng.uniform(-0.01, 0.1, n),
        "dividend_yield": rng.uniform(0.0, 0.05, n),
    }


def _bs_price_scalar(is_call: bool, s: float, k: float, t: float, v: float, r: float,
                     q: float) -> float:
    """Independent reference: the textbook formula with math.erf, one option at a time."""
    def n(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    d1 = (math.log(s / k) + (r - q + 0.5 * v * v) * t) / (v * math.sqrt(t))
    d2 = d1 - v * math.sqrt(t)
    if is_call:
        return s * math.exp(-q * t) * n(d1) - k * math.exp(-r * t) * n(d2)
    return k * math.exp(-r * t) * n(-d2) - s * math.exp(-q * t) * n(-d1)


# ----------------------------------------------------------------------------------- normal


def test_norm_cdf_when_compared_with_math_erfc_then_relative_error_tiny_in_lower_tail() -> None:
    x = np.linspace(-37.0, 8.5, 100_001)
    reference = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    got = norm_cdf(x)
    assert np.max(np.abs(got - reference)) < 4e-16
    near = x > -10.0
    assert np.max(np.abs(got[near] - reference[near]) / reference[near]) < 2e-14
    # further out math.erfc's own rounding of x/sqrt(2) (2 y^2 eps) dominates the difference
    assert np.max(np.abs(got - reference) / reference) < 3e-13


def test_norm_cdf_fast_when_compared_with_math_erfc_then_absolute_error_below_3e_12() -> None:
    x = np.linspace(-40.0, 40.0, 100_001)
    reference = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    assert np.max(np.abs(norm_cdf_fast(x) - reference)) < 3e-12


@pytest.mark.parametrize("cdf", [norm_cdf, norm_cdf_fast])
def test_norm_cdf_when_special_values_then_limits_nan_and_dtype_kept(
        cdf: Callable[[np.ndarray], np.ndarray]) -> None:
    out = cdf(np.array([np.nan, np.inf, -np.inf, 0.0]))
    assert np.isnan(out[0])
    assert out[1:3].tolist() == [1.0, 0.0]
    assert out[3] == pytest.approx(0.5, abs=3e-12)  # exact for norm_cdf; norm_cdf_fast 2.3e-12
    x32 = np.linspace(-6, 6, 1001, dtype=np.float32)
    got32 = cdf(x32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, norm_cdf(x32.astype(np.float64)), rtol=2e-6, atol=1e-7)
    assert float(cdf(1)) == pytest.approx(0.8413447460685429, abs=1e-15)


def test_norm_cdf_when_symmetric_arguments_then_they_sum_to_one() -> None:
    x = np.random.default_rng(0).normal(0.0, 3.0, 10_000)
    np.testing.assert_allclose(norm_cdf(x) + norm_cdf(-x), 1.0, atol=3e-16)


def test_norm_ppf_when_standard_levels_then_known_quantiles() -> None:
    got = norm_ppf([0.5, 0.95, 0.975, 0.99, 0.01])
    np.testing.assert_allclose(
        got, [0.0, 1.6448536269514722, 1.959963984540054, 2.3263478740408408,
              -2.3263478740408408], rtol=1e-14, atol=1e-15)


def test_norm_ppf_when_inverted_then_round_trips_and_edges_are_infinite_or_nan() -> None:
    p = np.concatenate([np.logspace(-300, -1, 500), np.linspace(0.1, 0.9, 500)])
    # near p = 1e-300 (x = -37) the CDF's slope turns ulp(x) into ~1.4e-13 relative
    np.testing.assert_allclose(norm_cdf(norm_ppf(p)), p, rtol=2e-13)
    np.testing.assert_allclose(norm_cdf(norm_ppf(p[p > 1e-20])), p[p > 1e-20], rtol=2e-14)
    assert norm_ppf([0.0, 1.0]).tolist() == [-np.inf, np.inf]
    assert np.isnan(norm_ppf([-0.1, 1.1, np.nan])).all()


# ------------------------------------------------------------------------- textbook values


def test_bs_price_when_hull_example_then_call_4_76_and_put_0_81() -> None:
    # Hull, Options, Futures and Other Derivatives: S=42, K=40, r=10 %, vol=20 %, T=0.5
    call, put = bs_price([True, False], 42.0, 40.0, 0.5, 0.20, 0.10)
    assert round(float(call), 2) == 4.76
    assert round(float(put), 2) == 0.81
    assert float(call) == pytest.approx(_bs_price_scalar(True, 42, 40, 0.5, 0.2, 0.1, 0.0),
                                        abs=1e-12)
    assert float(put) == pytest.approx(_bs_price_scalar(False, 42, 40, 0.5, 0.2, 0.1, 0.0),
                                       abs=1e-12)


def test_black76_price_when_hull_futures_put_example_then_1_12() -> None:
    # Hull (Black's model): put on a futures, F = K = 20, r = 9 %, vol = 25 %, T = 4 months
    put = float(black76_price(False, 20.0, 20.0, 4.0 / 12.0, 0.25, 0.09))
    assert round(put, 2) == 1.12
    d1 = 0.5 * 0.25 * math.sqrt(4.0 / 12.0)
    by_hand = math.exp(-0.09 / 3.0) * 20.0 * math.erf(d1 / math.sqrt(2.0))  # 20 (N(d1) - N(-d1))
    assert put == pytest.approx(by_hand, abs=1e-13)


def test_bs_price_when_random_inputs_then_matches_scalar_math_erf_reference() -> None:
    a = _random_bs_inputs(seed=1, n=300)
    got = bs_price(a["is_call"], a["spot"], a["strike"], a["t_years"], a["vol"], a["rate"],
                   a["dividend_yield"])
    reference = [_bs_price_scalar(*row) for row in zip(
        a["is_call"], a["spot"], a["strike"], a["t_years"], a["vol"], a["rate"],
        a["dividend_yield"], strict=True)]
    np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-12)


def test_bs_price_when_forward_given_then_equals_black76_on_that_forward() -> None:
    a = _random_bs_inputs(seed=2)
    forward = a["spot"] * np.exp((a["rate"] - a["dividend_yield"]) * a["t_years"])
    np.testing.assert_allclose(
        bs_price(a["is_call"], a["spot"], a["strike"], a["t_years"], a["vol"], a["rate"],
                 a["dividend_yield"]),
        black76_price(a["is_call"], forward, a["strike"], a["t_years"], a["vol"], a["rate"]),
        rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- put-call parity


def _assert_abs_within(actual: np.ndarray, desired: np.ndarray, tolerance: np.ndarray) -> None:
    """Elementwise ``|actual - desired| <= tolerance``, reporting the worst row."""
    excess = np.abs(actual - desired) - tolerance
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, (f"row {worst}: {actual[worst]!r} vs {desired[worst]!r}, "
                                f"tolerance {tolerance[worst]!r}")


def _wide_random_inputs(seed: int, n: int = 20_000) -> dict[str, np.ndarray]:
    """Wide ranges, deep in and out of the money, short and long expiries."""
    rng = np.random.default_rng(seed)
    underlying = np.exp(rng.uniform(np.log(1.0), np.log(1e5), n))
    return {
        "underlying": underlying,
        "strike": underlying * np.exp(rng.uniform(-3.0, 3.0, n)),
        "t_years": np.exp(rng.uniform(np.log(1e-3), np.log(10.0), n)),
        "vol": np.exp(rng.uniform(np.log(0.01), np.log(5.0), n)),
        "rate": rng.uniform(-0.02, 0.15, n),
        "dividend_yield": rng.uniform(-0.02, 0.1, n),
    }


def test_bs_price_when_random_inputs_then_put_call_parity_holds() -> None:
    a = _wide_random_inputs(seed=3)
    s, k, t, v, r, q = (a[n] for n in ("underlying", "strike", "t_years", "vol", "rate",
                                       "dividend_yield"))
    call = bs_price(True, s, k, t, v, r, q)
    put = bs_price(False, s, k, t, v, r, q)
    _assert_abs_within(call - put, s * np.exp(-q * t) - k * np.exp(-r * t), 4e-15 * (s + k))


def test_black76_price_when_random_inputs_then_put_call_parity_holds() -> None:
    a = _wide_random_inputs(seed=4)
    f, k, t, v, r = (a[n] for n in ("underlying", "strike", "t_years", "vol", "rate"))
    call = black76_price(True, f, k, t, v, r)
    put = black76_price(False, f, k, t, v, r)
    _assert_abs_within(call - put, np.exp(-r * t) * (f - k), 4e-15 * (f + k))
    inv_call = black76_price(1, f, k, t, v, r, inverse=True)
    inv_put = black76_price(-1, f, k, t, v, r, inverse=True)
    _assert_abs_within(inv_call - inv_put, np.exp(-r * t) * (1.0 - k / f), 4e-15 * (1.0 + k / f))


def test_black76_price_when_random_inputs_then_within_no_arbitrage_bounds() -> None:
    a = _wide_random_inputs(seed=5)
    f, k, t, v, r = (a[n] for n in ("underlying", "strike", "t_years", "vol", "rate"))
    disc = np.exp(-r * t)
    call = black76_price(True, f, k, t, v, r)
    put = black76_price(False, f, k, t, v, r)
    slack = 4e-15 * (f + k)
    assert np.all(call >= disc * np.maximum(f - k, 0.0) - slack)
    assert np.all(put >= disc * np.maximum(k - f, 0.0) - slack)
    assert np.all(call <= disc * f + slack)
    assert np.all(put <= disc * k + slack)


def test_black76_price_when_inverse_then_usd_price_over_forward() -> None:
    a = _wide_random_inputs(seed=6, n=2_000)
    f, k, t, v = (a[n] for n in ("underlying", "strike", "t_years", "vol"))
    np.testing.assert_allclose(black76_price(True, f, k, t, v, inverse=True),
                               black76_price(True, f, k, t, v) / f, rtol=1e-15, atol=0)


def test_black76_price_when_no_time_or_no_vol_then_discounted_intrinsic() -> None:
    price = black76_price([True, False, True, False], 100.0, [90.0, 90.0, 110.0, 110.0],
                          [0.0, 0.5, 0.5, 0.0], [0.5, 0.0, 0.0, 0.5], 0.05)
    disc = math.exp(-0.05 * 0.5)
    np.testing.assert_allclose(price, [10.0, 0.0, 0.0, 10.0], atol=1e-12)
    assert float(black76_price(False, 100.0, 110.0, 0.5, 0.0, 0.05)) == pytest.approx(10 * disc)


# -------------------------------------------------------------------------- Greeks


def _central(fn: Callable[[float], np.ndarray], h: np.ndarray) -> np.ndarray:
    return (fn(h) - fn(-h)) / (2.0 * h)


def test_bs_greeks_when_compared_with_finite_differences_then_agree() -> None:
    a = _random_bs_inputs(seed=7)
    c, s, k, t, v, r, q = (a[n] for n in ("is_call", "spot", "strike", "t_years", "vol", "rate",
                                          "dividend_yield"))
    g = bs_greeks(c, s, k, t, v, r, q)
    np.testing.assert_allclose(g.price, bs_price(c, s, k, t, v, r, q), rtol=1e-13, atol=1e-13)
    hs = 1e-5 * s
    delta = _central(lambda h: bs_price(c, s + h, k, t, v, r, q), hs)
    hg = 2e-4 * s
    gamma = (bs_price(c, s + hg, k, t, v, r, q) - 2 * bs_price(c, s, k, t, v, r, q)
             + bs_price(c, s - hg, k, t, v, r, q)) / hg**2
    vega = _central(lambda h: bs_price(c, s, k, t, v + h, r, q), np.full_like(v, 1e-5))
    theta = -_central(lambda h: bs_price(c, s, k, t + h, v, r, q), np.full_like(t, 1e-6))
    rho = _central(lambda h: bs_price(c, s, k, t, v, r + h, q), np.full_like(r, 1e-6))
    np.testing.assert_allclose(g.delta, delta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g.gamma, gamma, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g.vega_per_vol, vega, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g.theta_per_year, theta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.rho, rho, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_black76_greeks_when_compared_with_finite_differences_then_agree(inverse: bool) -> None:
    a = _random_bs_inputs(seed=8)
    c, f, k, t, v, r = (a[n] for n in ("is_call", "spot", "strike", "t_years", "vol", "rate"))
    g = black76_greeks(c, f, k, t, v, r, inverse=inverse)

    def price(f=f, t=t, v=v, r=r) -> np.ndarray:
        return black76_price(c, f, k, t, v, r, inverse=inverse)

    scale = 1.0 / 150.0 if inverse else 1.0  # coin prices are USD prices / F, F in [50, 150]
    np.testing.assert_allclose(g.price, price(), rtol=1e-13, atol=1e-13)
    hf = 1e-5 * f
    delta = _central(lambda h: price(f=f + h), hf)
    hg = 2e-4 * f
    gamma = (price(f=f + hg) - 2 * price() + price(f=f - hg)) / hg**2
    vega = _central(lambda h: price(v=v + h), np.full_like(v, 1e-5))
    theta = -_central(lambda h: price(t=t + h), np.full_like(t, 1e-6))
    rho = _central(lambda h: price(r=r + h), np.full_like(r, 1e-6))
    np.testing.assert_allclose(g.delta, delta, rtol=1e-6, atol=1e-8 * scale)
    np.testing.assert_allclose(g.gamma, gamma, rtol=1e-4, atol=1e-7 * scale)
    np.testing.assert_allclose(g.vega_per_vol, vega, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(g.theta_per_year, theta, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(g.rho, rho, rtol=1e-6, atol=1e-6 * scale)
    if inverse:  # premium-adjusted delta: F * d(V/F)/dF = delta_usd - V/F
        usd = black76_greeks(c, f, k, t, v, r)
        np.testing.assert_allclose(f * g.delta, usd.delta - usd.price / f, rtol=1e-12,
                                   atol=1e-15)


def test_greeks_when_random_inputs_then_delta_bounded_gamma_and_vega_nonnegative() -> None:
    a = _wide_random_inputs(seed=9)
    s, k, t, v, r, q = (a[n] for n in ("underlying", "strike", "t_years", "vol", "rate",
                                       "dividend_yield"))
    call = bs_greeks(True, s, k, t, v, r, q)
    put = bs_greeks(False, s, k, t, v, r, q)
    disc_q = np.exp(-q * t)
    assert np.all((call.delta >= 0.0) & (call.delta <= disc_q))
    assert np.all((put.delta <= 0.0) & (put.delta >= -disc_q))
    np.testing.assert_allclose(call.delta - put.delta, disc_q, rtol=0, atol=1e-15)
    for g in (call, put):
        assert np.all(g.gamma >= 0.0)
        assert np.all(g.vega_per_vol >= 0.0)
    np.testing.assert_array_equal(call.gamma, put.gamma)
    f76 = black76_greeks([True, False], 100.0, 120.0, 0.5, 0.6)
    assert 0.0 <= f76.delta[0] <= 1.0 and -1.0 <= f76.delta[1] <= 0.0


def test_greeks_when_unit_variants_then_per_point_and_per_day_scaled() -> None:
    g = black76_greeks(True, 60_000.0, 65_000.0, 30 / 365, 0.55)
    assert g.vega_per_vol_point == pytest.approx(g.vega_per_vol / 100.0)
    assert g.theta_per_day == pytest.approx(g.theta_per_year / DAYS_PER_YEAR)
    # one day passing costs about theta_per_day
    one_day = (black76_price(True, 60_000.0, 65_000.0, 29 / 365, 0.55)
               - black76_price(True, 60_000.0, 65_000.0, 30 / 365, 0.55))
    assert float(one_day) == pytest.approx(float(g.theta_per_day), rel=2e-2)


def test_is_call_when_bool_or_sign_then_same_prices_and_bad_sign_is_nan() -> None:
    as_bool = black76_price([True, False], 100.0, 95.0, 0.5, 0.4)
    as_sign = black76_price([1, -1], 100.0, 95.0, 0.5, 0.4)
    np.testing.assert_array_equal(as_bool, as_sign)
    assert np.isnan(call_put_sign([0, 2, np.nan])).all()
    assert np.isnan(black76_price(0, 100.0, 95.0, 0.5, 0.4))


def test_prices_and_greeks_when_bad_rows_then_nan_without_raising_or_warning() -> None:
    bad = {  # one bad field per row; the last row is good
        "f": [np.nan, -1.0, 100.0, 100.0, 100.0, 100.0, np.inf, 100.0],
        "k": [95.0, 95.0, 0.0, 95.0, 95.0, 95.0, 95.0, 95.0],
        "t": [0.5, 0.5, 0.5, -0.1, 0.5, 0.5, 0.5, 0.5],
        "v": [0.4, 0.4, 0.4, 0.4, -0.2, np.nan, 0.4, 0.4],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        price = black76_price(True, bad["f"], bad["k"], bad["t"], bad["v"])
        greeks = black76_greeks(True, bad["f"], bad["k"], bad["t"], bad["v"])
        bsg = bs_greeks(True, bad["f"], bad["k"], bad["t"], bad["v"])
        zero_t = black76_greeks(True, 100.0, 95.0, [0.0, 0.5], [0.4, 0.0])
    assert np.isnan(price[:-1]).all() and np.isfinite(price[-1])
    for g in (greeks, bsg):
        for field in (g.price, g.delta, g.gamma, g.vega_per_vol, g.theta_per_year, g.rho):
            assert np.isnan(field[:-1]).all() and np.isfinite(field[-1])
    assert np.isnan(zero_t.delta).all()  # Greeks need T > 0 and vol > 0


def test_portfolio_greeks_when_quantities_given_then_weighted_totals_and_bad_rows_counted() -> None:
    g = black76_greeks([True, False, True], [100.0, 100.0, np.nan], [90.0, 110.0, 100.0], 0.25,
                       0.5)
    q = np.array([2.0, -3.0, 5.0])
    totals = portfolio_greeks(q, g)
    assert totals["delta"] == pytest.approx(2 * g.delta[0] - 3 * g.delta[1])
    assert totals["gamma"] == pytest.approx(2 * g.gamma[0] - 3 * g.gamma[1])
    assert totals["vega_per_vol"] == pytest.approx(2 * g.vega_per_vol[0] - 3 * g.vega_per_vol[1])
    assert totals["vega_per_vol_point"] == pytest.approx(totals["vega_per_vol"] / 100)
    assert totals["theta_per_year"] == pytest.approx(2 * g.theta_per_year[0]
                                                     - 3 * g.theta_per_year[1])
    assert totals["theta_per_day"] == pytest.approx(totals["theta_per_year"] / DAYS_PER_YEAR)
    assert totals["value"] == pytest.approx(2 * g.price[0] - 3 * g.price[1])
    assert (totals["positions"], totals["invalid_positions"]) == (3.0, 1.0)


def test_norm_pdf_when_evaluated_then_matches_formula() -> None:
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(norm_pdf(x), np.exp(-x * x / 2) / math.sqrt(2 * math.pi))


# -------------------------------------------------------------------------- implied vol


def _iv_grid() -> dict[str, np.ndarray]:
    moneyness = np.array([0.2, 0.5, 0.8, 0.95, 1.0, 1.05, 1.25, 2.0, 5.0])
    t_years = np.array([0.002, 0.02, 0.25, 1.0, 5.0])
    vols = np.array([0.02, 0.1, 0.4, 1.0, 3.0])
    k, t, v, c = np.meshgrid(100.0 * moneyness, t_years, vols, [True, False], indexing="ij")
    return {"k": k.ravel(), "t": t.ravel(), "v": v.ravel(), "c": c.ravel()}


@pytest.mark.parametrize("inverse", [False, True])
def test_black76_implied_vol_when_grid_priced_then_price_round_trips_to_1e_8(
        inverse: bool) -> None:
    g = _iv_grid()
    f, r = 100.0, 0.03
    price = black76_price(g["c"], f, g["k"], g["t"], g["v"], r, inverse=inverse)
    iv = black76_implied_vol(price, g["c"], f, g["k"], g["t"], r, inverse=inverse)
    ok = iv.status == IVStatus.OK
    repriced = black76_price(g["c"], f, g["k"], g["t"], iv.vol, r, inverse=inverse)
    np.testing.assert_allclose(repriced[ok], price[ok], rtol=1e-8, atol=0)
    # the vol itself is recovered wherever the time value is resolvable in the price
    time_value = price * np.exp(r * g["t"]) * (f if inverse else 1.0) - np.maximum(
        np.where(g["c"], 1.0, -1.0) * (f - g["k"]), 0.0)
    resolvable = time_value > 1e-8 * (f + g["k"])
    assert ok[resolvable].all()
    np.testing.assert_allclose(iv.vol[resolvable], g["v"][resolvable], rtol=1e-8)
    # the only failures: price underflowed to 0 (far OTM) or no time value left (far ITM)
    failed = set(IVStatus(s) for s in iv.status[~ok])
    assert failed <= {IVStatus.INVALID_INPUT, IVStatus.AT_INTRINSIC}
    assert np.all(price[iv.status == IVStatus.INVALID_INPUT] == 0.0)
    assert ok.sum() >= 0.75 * ok.size
    assert iv.counts["ok"] == ok.sum() and sum(iv.counts.values()) == ok.size


def test_black76_implied_vol_when_far_out_of_the_money_then_tiny_prices_still_invert() -> None:
    vols = np.array([0.1, 0.2, 0.5])
    price = black76_price(True, 100.0, 300.0, 0.25, vols)  # 1e-100 .. 1e-4
    assert price.min() < 1e-90
    iv = black76_implied_vol(price, True, 100.0, 300.0, 0.25)
    np.testing.assert_allclose(iv.vol, vols, rtol=1e-10)


def test_bs_implied_vol_when_random_inputs_then_vol_recovered() -> None:
    a = _random_bs_inputs(seed=10)
    c, s, k, t, v, r, q = (a[n] for n in ("is_call", "spot", "strike", "t_years", "vol", "rate",
                                          "dividend_yield"))
    price = bs_price(c, s, k, t, v, r, q)
    iv = bs_implied_vol(price, c, s, k, t, r, q)
    forward = s * np.exp((r - q) * t)
    time_value = price * np.exp(r * t) - np.maximum(np.where(c, 1.0, -1.0) * (forward - k), 0)
    resolvable = time_value > 1e-8 * (forward + k)
    assert resolvable.mean() > 0.95
    np.testing.assert_allclose(iv.vol[resolvable], v[resolvable], rtol=1e-9)
    # a deep in-the-money short-dated row can carry no time value the price can resolve
    assert set(iv.status[~resolvable].tolist()) <= {IVStatus.OK, IVStatus.AT_INTRINSIC}
    assert iv.iterations <= 100


def test_implied_vol_when_bad_rows_then_nan_with_reason_counts_and_no_raise() -> None:
    f, k, t, r = 100.0, 90.0, 0.5, 0.02
    disc = math.exp(-r * t)
    good = float(black76_price(True, f, k, t, 0.5, r))
    prices = [good, np.nan, -1.0, 0.0, good, good, 0.9 * disc * (f - k), disc * f * 1.01,
              disc * (f - k)]
    times = [t, t, t, t, 0.0, -1.0, t, t, t]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv = black76_implied_vol(prices, True, f, k, times, r)
    assert iv.status.tolist() == [
        IVStatus.OK, IVStatus.INVALID_INPUT, IVStatus.INVALID_INPUT, IVStatus.INVALID_INPUT,
        IVStatus.INVALID_INPUT, IVStatus.INVALID_INPUT, IVStatus.BELOW_INTRINSIC,
        IVStatus.ABOVE_UPPER_BOUND, IVStatus.AT_INTRINSIC]
    assert iv.vol[0] == pytest.approx(0.5, rel=1e-12)
    assert np.isnan(iv.vol[1:]).all()
    assert iv.counts == {"ok": 1, "invalid_input": 5, "below_intrinsic": 1, "at_intrinsic": 1,
                         "above_upper_bound": 1, "vol_above_max": 0, "not_converged": 0}
    assert iv.failed == 8
    put_above = black76_implied_vol(disc * k * 1.001, False, f, k, t, r)
    assert int(put_above.status) == IVStatus.ABOVE_UPPER_BOUND


def test_implied_vol_when_price_needs_vol_beyond_search_then_vol_above_max() -> None:
    price = black76_price(True, 100.0, 120.0, 1.0, [0.5, 3.0])
    iv = black76_implied_vol(price, True, 100.0, 120.0, 1.0, max_total_vol=1.0)
    assert iv.status.tolist() == [IVStatus.OK, IVStatus.VOL_ABOVE_MAX]
    assert iv.vol[0] == pytest.approx(0.5, rel=1e-12) and np.isnan(iv.vol[1])
    # the default search reaches vol sqrt(T) = 40, where the price is min(F, K) to 1e-80
    assert black76_implied_vol(price, True, 100.0, 120.0, 1.0).failed == 0
