"""VaR and expected shortfall (actors.var): hand-computed order statistics, the normal closed
form, ES >= VaR as a property, rolling windows, portfolios, and option full revaluation checked
against repricing one scenario at a time."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from actors.options import black76_greeks, black76_price, portfolio_greeks
from actors.var import (
    dgv_scenario_pnl,
    historical_var_es,
    net_by_instrument,
    option_scenario_pnl,
    option_var_es,
    parametric_var_es,
    portfolio_pnl,
    portfolio_var_es,
    rolling_portfolio_var_es,
    rolling_var_es,
    var_es,
)

# 20 daily P&L values. As losses (-P&L) sorted from the worst:
#   12, 8, 6, 5, 4, 3, 2, 1, 0.5, 0, -0.5, -1, -1.5, -2, -2.5, -3, -3.5, -4, -5, -6
PNL_20 = np.array([-5.0, 3.0, -1.0, 2.0, -8.0, 4.0, 0.5, -2.0, 1.0, -3.0,
                   6.0, -0.5, 2.5, -12.0, 1.5, -4.0, 3.5, -6.0, 0.0, 5.0])
Z_99 = 2.3263478740408408  # N^-1(0.99)
ES_FACTOR_99 = 2.665214220345808  # phi(Z_99) / 0.01
Z_95 = 1.6448536269514722
ES_FACTOR_95 = 2.0627128075074275


@pytest.mark.parametrize(("confidence", "var", "es"), [
    # n alpha = 19: VaR = L(19) = 2nd worst; ES = the worst
    (0.95, 8.0, 12.0),
    # n alpha = 18: VaR = L(18) = 3rd worst; ES = mean of the two worst
    (0.90, 6.0, 10.0),
    # n alpha = 17.5: VaR = L(18); ES = (12 + 8 + 0.5 * 6) / 2.5
    (0.875, 6.0, 9.2),
    # n alpha = 16: VaR = L(16) = 5th worst = 4; ES = (12 + 8 + 6 + 5) / 4
    (0.80, 4.0, 7.75),
    # n alpha = 19.8: VaR = L(20) = 12; ES = 0.2 * 12 / 0.2
    (0.99, 12.0, 12.0),
])
def test_historical_var_es_when_20_known_returns_then_hand_computed_order_statistics(
        confidence: float, var: float, es: float) -> None:
    result = historical_var_es(PNL_20, confidence)
    assert result.var == pytest.approx(var, abs=1e-12)
    assert result.es == pytest.approx(es, abs=1e-12)
    assert (result.confidence, result.method) == (confidence, "historical")
    shuffled = np.random.default_rng(0).permutation(PNL_20)
    assert historical_var_es(shuffled, confidence).var == result.var


def test_parametric_var_es_when_20_known_returns_then_closed_form_on_hand_moments() -> None:
    # sum of P&L = -12.5, sum of squares = 411.25: mean -0.625, ddof=1 variance 403.4375 / 19
    mean, std = -0.625, math.sqrt(403.4375 / 19)
    result = var_es(PNL_20, 0.99, "parametric")
    assert result.var == pytest.approx(-mean + std * Z_99, rel=1e-13)
    assert result.es == pytest.approx(-mean + std * ES_FACTOR_99, rel=1e-13)
    assert result.es >= result.var


def test_parametric_var_es_when_mean_and_std_given_then_closed_form() -> None:
    result = parametric_var_es(1.0, 2.0, 0.99)
    assert result.var == pytest.approx(-1.0 + 2.0 * Z_99, rel=1e-14)
    assert result.es == pytest.approx(-1.0 + 2.0 * ES_FACTOR_99, rel=1e-14)
    grid = parametric_var_es(np.zeros(3), np.array([1.0, 2.0, 3.0]), 0.95)
    np.testing.assert_allclose(grid.var, Z_95 * np.array([1.0, 2.0, 3.0]), rtol=1e-14)
    np.testing.assert_allclose(grid.es, ES_FACTOR_95 * np.array([1.0, 2.0, 3.0]), rtol=1e-14)


def test_historical_var_es_when_large_normal_sample_then_close_to_parametric() -> None:
    pnl = np.random.default_rng(1).normal(0.5, 3.0, 400_000)
    hist = historical_var_es(pnl, 0.99)
    para = parametric_var_es(0.5, 3.0, 0.99)
    assert hist.var == pytest.approx(para.var, rel=0.02)
    assert hist.es == pytest.approx(para.es, rel=0.02)


def test_var_es_when_random_samples_then_es_never_below_var() -> None:
    rng = np.random.default_rng(2)
    samples = np.concatenate([rng.standard_t(3, size=(200, 50)),
                              rng.normal(size=(200, 50)),
                              rng.exponential(size=(200, 50)) - 1.0])
    for confidence in (0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.999):
        hist = historical_var_es(samples, confidence, axis=1)
        assert hist.var.shape == (600,)
        assert np.all(hist.es >= hist.var)
        para = parametric_var_es(samples.mean(axis=1), samples.std(axis=1, ddof=1), confidence)
        assert np.all(para.es >= para.var)


def test_historical_var_es_when_axis_given_then_each_slice_matches_1d() -> None:
    samples = np.random.default_rng(3).normal(size=(30, 7))
    vectorized = historical_var_es(samples, 0.9, axis=0)
    for j in range(7):
        one = historical_var_es(samples[:, j], 0.9)
        assert vectorized.var[j] == one.var and vectorized.es[j] == one.es


def test_historical_var_es_when_nan_in_sample_then_nan_not_raised() -> None:
    result = historical_var_es(np.array([[1.0, np.nan, -2.0], [1.0, 3.0, -2.0]]), 0.5)
    assert np.isnan(result.var[0]) and np.isnan(result.es[0])
    assert np.isfinite(result.var[1])


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_var_es_when_confidence_outside_unit_interval_then_value_error_names_it(
        confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        historical_var_es(PNL_20, confidence)
    with pytest.raises(ValueError, match="confidence"):
        parametric_var_es(0.0, 1.0, confidence)


def test_var_es_when_bad_method_or_window_then_value_error_names_it() -> None:
    series = pd.Series(PNL_20)
    with pytest.raises(ValueError, match="method"):
        var_es(PNL_20, 0.99, "montecarlo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        rolling_var_es(series, 1, 0.99, "parametric")
    with pytest.raises(ValueError, match="window"):
        rolling_var_es(series, 0)


# ------------------------------------------------------------------------------ rolling


def _series(n: int = 250, seed: int = 4) -> pd.Series:
    index = pd.date_range("2024-01-01", periods=n, freq="D")
    return pd.Series(np.random.default_rng(seed).standard_t(4, n) * 1_000.0, index=index)


@pytest.mark.parametrize("method", ["historical", "parametric"])
def test_rolling_var_es_when_window_rolls_then_each_row_equals_its_window(method: str) -> None:
    series, window = _series(), 40
    frame = rolling_var_es(series, window, 0.95, method)  # type: ignore[arg-type]
    assert list(frame.columns) == ["var", "es"] and frame.index.equals(series.index)
    assert frame.iloc[: window - 1].isna().all().all()
    for end in (window, 100, len(series)):
        one = var_es(series.iloc[end - window: end].to_numpy(), 0.95, method)  # type: ignore[arg-type]
        assert frame["var"].iloc[end - 1] == pytest.approx(one.var, rel=1e-9)
        assert frame["es"].iloc[end - 1] == pytest.approx(one.es, rel=1e-9)
    assert (frame["es"].dropna() >= frame["var"].dropna()).all()


def test_rolling_var_es_when_window_holds_nan_then_those_rows_nan() -> None:
    series = _series(60)
    series.iloc[30] = np.nan
    frame = rolling_var_es(series, 10, 0.9)
    assert frame["var"].iloc[30:40].isna().all()
    assert frame["var"].iloc[40:].notna().all() and frame["var"].iloc[9:30].notna().all()


def test_rolling_var_es_when_series_shorter_than_window_then_all_nan() -> None:
    frame = rolling_var_es(_series(5), 10, 0.9)
    assert frame.isna().all().all() and len(frame) == 5


# ---------------------------------------------------------------------------- portfolios


def _returns(scenarios: int = 500, positions: int = 4, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, positions)) * 0.01
    return rng.normal(size=(scenarios, positions)) @ mixing + 0.0005


def test_portfolio_var_es_when_historical_then_order_statistics_of_scenario_pnl() -> None:
    exposures = np.array([1e6, -5e5, 2e5, 3e5])
    returns = _returns()
    pnl = portfolio_pnl(exposures, returns)
    np.testing.assert_allclose(pnl, [row @ exposures for row in returns], rtol=1e-12)
    result = portfolio_var_es(exposures, returns, 0.99)
    by_hand = historical_var_es(pnl, 0.99)
    assert (result.var, result.es) == (by_hand.var, by_hand.es)


def test_portfolio_var_es_when_parametric_then_sqrt_of_covariance_quadratic_form() -> None:
    exposures = np.array([1e6, -5e5, 2e5, 3e5])
    returns = _returns()
    cov = np.cov(returns, rowvar=False)
    sigma = math.sqrt(exposures @ cov @ exposures)
    mu = returns.mean(axis=0) @ exposures
    result = portfolio_var_es(exposures, returns, 0.99, "parametric")
    assert result.var == pytest.approx(-mu + sigma * Z_99, rel=1e-12)
    assert result.es == pytest.approx(-mu + sigma * ES_FACTOR_99, rel=1e-12)
    same = var_es(returns @ exposures, 0.99, "parametric")  # the P&L series carries it all
    assert result.var == pytest.approx(same.var, rel=1e-10)


def test_portfolio_var_es_when_shapes_mismatch_then_value_error_names_both() -> None:
    with pytest.raises(ValueError, match=r"exposures .*\(3,\).*scenario_returns .*\(10, 4\)"):
        portfolio_var_es(np.ones(3), np.ones((10, 4)))


@pytest.mark.parametrize("method", ["historical", "parametric"])
def test_rolling_portfolio_var_es_when_window_rolls_then_matches_window_portfolio(
        method: str) -> None:
    exposures = np.array([1e6, -5e5, 2e5, 3e5])
    returns = pd.DataFrame(_returns(120), columns=list("abcd"),
                           index=pd.date_range("2024-01-01", periods=120, freq="h"))
    frame = rolling_portfolio_var_es(exposures, returns, 60, 0.95, method)  # type: ignore[arg-type]
    window = returns.iloc[30:90].to_numpy()
    one = portfolio_var_es(exposures, window, 0.95, method)  # type: ignore[arg-type]
    assert frame["var"].iloc[89] == pytest.approx(one.var, rel=1e-9)
    assert frame["es"].iloc[89] == pytest.approx(one.es, rel=1e-9)
    assert frame.index.equals(returns.index)


# ----------------------------------------------------------------- option full revaluation


def _book(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    forward = 60_000.0 * np.exp(rng.normal(0.0, 0.02, n))
    return {
        "quantity": rng.normal(0.0, 5.0, n),
        "is_call": rng.random(n) < 0.5,
        "forward": forward,
        "strike": forward * np.exp(rng.normal(0.0, 0.3, n)),
        "t_years": rng.uniform(2.0 / 365.0, 1.0, n),
        "vol": rng.uniform(0.3, 1.2, n),
    }


def _scenarios(s: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.06, s), rng.normal(0.0, 0.08, s)


def _reprice_one_by_one(book: dict[str, np.ndarray], u: np.ndarray, dv: np.ndarray, *,
                        horizon_years: float = 0.0, inverse: bool = False,
                        rate: float = 0.0) -> np.ndarray:
    """Reference: reprice the whole book with black76_price, one scenario at a time."""
    c, f, k, t, v = (book[n] for n in ("is_call", "forward", "strike", "t_years", "vol"))
    today = book["quantity"] @ black76_price(c, f, k, t, v, rate, inverse=inverse)
    return np.array([book["quantity"] @ black76_price(
        c, f * (1.0 + us), k, t - horizon_years, np.maximum(v + dvs, 1e-4), rate,
        inverse=inverse) - today for us, dvs in zip(u, dv, strict=True)])


@pytest.mark.parametrize("inverse", [False, True])
def test_option_scenario_pnl_when_book_revalued_then_equals_repricing_each_scenario(
        inverse: bool) -> None:
    book, (u, dv) = _book(400, seed=6), _scenarios(60, seed=7)
    result = option_scenario_pnl(*book.values(), u, dv, rate=0.02, horizon_years=1 / 365,
                                 inverse=inverse)
    reference = _reprice_one_by_one(book, u, dv, horizon_years=1 / 365, inverse=inverse,
                                    rate=0.02)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(result.pnl, reference, rtol=0, atol=1e-9 * scale)
    assert (result.invalid_positions, result.invalid_scenarios) == (0, 0)


def test_option_scenario_pnl_when_zero_shock_then_exactly_zero_and_block_size_irrelevant() -> None:
    book = _book(300, seed=8)
    u, dv = _scenarios(40, seed=9)
    u[0] = dv[0] = 0.0
    small = option_scenario_pnl(*book.values(), u, dv, block_bytes=8 * 7)
    large = option_scenario_pnl(*book.values(), u, dv, block_bytes=1 << 22)
    assert small.pnl[0] == 0.0
    np.testing.assert_allclose(small.pnl, large.pnl, rtol=0, atol=1e-9 * np.abs(large.pnl).max())


def test_option_scenario_pnl_when_float32_then_close_to_float64() -> None:
    book, (u, dv) = _book(2_000, seed=10), _scenarios(200, seed=11)
    exact = option_scenario_pnl(*book.values(), u, dv).pnl
    single = option_scenario_pnl(*book.values(), u, dv, dtype=np.float32).pnl
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, exact, rtol=0, atol=1e-4 * np.abs(exact).max())


def test_option_scenario_pnl_when_expiring_within_horizon_then_worth_intrinsic() -> None:
    result = option_scenario_pnl([1.0, -2.0], [True, False], 100.0, [90.0, 105.0],
                                 [0.5 / 365, 0.5 / 365], 0.6, [0.10, -0.10], [0.0, 0.0],
                                 horizon_years=1 / 365)
    today = black76_price([True, False], 100.0, [90.0, 105.0], 0.5 / 365, 0.6) @ [1.0, -2.0]
    expected = [1.0 * 20.0 - 2.0 * 0.0, 1.0 * 0.0 - 2.0 * 15.0]
    np.testing.assert_allclose(result.pnl, np.array(expected) - today, atol=1e-9)


def test_option_scenario_pnl_when_bad_positions_and_scenarios_then_masked_and_counted() -> None:
    book = _book(50, seed=12)
    bad = {name: values.copy() for name, values in book.items()}
    bad["forward"][3] = np.nan
    bad["strike"][7] = -1.0
    bad["t_years"][9] = 0.0
    u, dv = _scenarios(20, seed=13)
    u[4] = -1.5
    dv[6] = np.inf
    result = option_scenario_pnl(*bad.values(), u, dv)
    assert (result.invalid_positions, result.invalid_scenarios) == (3, 2)
    assert np.isnan(result.pnl[[4, 6]]).all()
    keep = np.ones(50, dtype=bool)
    keep[[3, 7, 9]] = False
    clean = option_scenario_pnl(*(v[keep] for v in book.values()), u, dv)
    good = np.isfinite(result.pnl)
    np.testing.assert_array_equal(result.pnl[good], clean.pnl[good])
    risk = option_var_es(*bad.values(), u, dv, 0.9)
    expected = historical_var_es(result.pnl[good], 0.9)
    assert (risk.var, risk.es) == (expected.var, expected.es)
    assert (risk.invalid_positions, risk.invalid_scenarios) == (3, 2)
    assert risk.es >= risk.var


def test_net_by_instrument_when_positions_share_instruments_then_same_pnl() -> None:
    instruments = _book(30, seed=14)
    rng = np.random.default_rng(15)
    which = rng.integers(0, 30, 1_000)
    quantity = rng.normal(0.0, 1.0, 1_000)
    u, dv = _scenarios(50, seed=16)
    per_position = option_scenario_pnl(
        quantity, *(instruments[n][which] for n in ("is_call", "forward", "strike", "t_years",
                                                    "vol")), u, dv)
    netted = option_scenario_pnl(
        net_by_instrument(which, quantity, 30),
        *(instruments[n] for n in ("is_call", "forward", "strike", "t_years", "vol")), u, dv)
    np.testing.assert_allclose(netted.pnl, per_position.pnl, rtol=1e-9,
                               atol=1e-9 * np.abs(per_position.pnl).max())


def test_dgv_scenario_pnl_when_shocks_small_then_close_to_full_revaluation() -> None:
    book = _book(500, seed=17)
    rng = np.random.default_rng(18)
    u, dv = rng.normal(0.0, 0.002, 100), rng.normal(0.0, 0.002, 100)
    greeks = black76_greeks(book["is_call"], book["forward"], book["strike"], book["t_years"],
                            book["vol"])
    approx = dgv_scenario_pnl(book["quantity"], greeks, book["forward"], u, dv)
    full = option_scenario_pnl(*book.values(), u, dv).pnl
    np.testing.assert_allclose(approx, full, rtol=0, atol=2e-3 * np.abs(full).max())
    # first order alone (delta and vega) is further off: the gamma term is doing work
    q, f = book["quantity"], book["forward"]
    linear = u * float(q @ (greeks.delta * f)) + dv * float(q @ greeks.vega_per_vol)
    assert np.abs(linear - full).max() > 2.0 * np.abs(approx - full).max()


# ------------------------------------- netted revaluation (contracts, put-call parity) is exact

BOOK_KINDS = ("calls_and_puts", "puts_only", "near_expiry", "deep_itm_otm")


def _listing_book(kind: str, seed: int, positions: int = 3_000
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Positions drawn from a small listing (expiries x strikes, a call and a put at every
    strike, one vol and one rate per strike and expiry), so that many positions share a
    contract and calls share contracts with puts. Returns the book, its rates and a horizon.

    ``near_expiry``: expiries of 0.5 to 3 days and a 1-day horizon (the 0.5-day ones expire in
    it); ``deep_itm_otm``: strikes 1 to 3 log-units from the forward with low vols."""
    rng = np.random.default_rng(seed)
    days = {"near_expiry": [0.5, 1.0, 1.5, 3.0],
            "deep_itm_otm": [1.0, 2.0, 7.0]}.get(kind, [2.0, 9.0, 30.0, 90.0, 365.0])
    t = np.repeat(np.array(days) / 365.0, 12)
    forward = 60_000.0 * np.exp(0.05 * t)
    if kind == "deep_itm_otm":
        log_moneyness = rng.choice([-1.0, 1.0], t.size) * rng.uniform(1.0, 3.0, t.size)
        vol = rng.uniform(0.2, 0.4, t.size)
    else:
        log_moneyness = rng.uniform(-0.5, 0.5, t.size)
        vol = rng.uniform(0.3, 1.2, t.size)
    strike = forward * np.exp(log_moneyness)
    rate = rng.uniform(0.0, 0.05, t.size)
    listing = {n: np.tile(a, 2) for n, a in (("forward", forward), ("strike", strike),
                                             ("t_years", t), ("vol", vol), ("rate", rate))}
    listing["is_call"] = np.repeat([True, False], t.size)
    if kind == "puts_only":
        listing["is_call"][:] = False
    which = rng.integers(0, listing["strike"].size, positions)
    book = {"quantity": np.round(rng.normal(0.0, 3.0, positions), 1),
            **{n: listing[n][which] for n in ("is_call", "forward", "strike", "t_years", "vol")}}
    horizon = 1.0 / 365.0 if kind == "near_expiry" else 0.0
    return book, listing["rate"][which], horizon


def _wide_scenarios(s: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Large moves and vol shifts (some hit the vol floor)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.0, 0.1, s), -0.9), rng.normal(0.0, 0.15, s)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("kind", BOOK_KINDS)
@pytest.mark.parametrize("seed", [21, 22])
def test_option_scenario_pnl_when_netted_by_contract_then_equals_per_position_revaluation(
        kind: str, inverse: bool, seed: int) -> None:
    book, rate, horizon = _listing_book(kind, seed)
    u, dv = _wide_scenarios(80, seed + 100)
    options = {"rate": rate, "horizon_years": horizon, "inverse": inverse}
    netted = option_scenario_pnl(*book.values(), u, dv, **options)
    per_position = option_scenario_pnl(*book.values(), u, dv, net_contracts=False, **options)
    scale = np.abs(per_position.pnl).max()
    assert scale > 0
    np.testing.assert_allclose(netted.pnl, per_position.pnl, rtol=0, atol=1e-12 * scale)
    assert (netted.invalid_positions, netted.invalid_scenarios) == (0, 0)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("kind", ["calls_and_puts", "puts_only", "deep_itm_otm"])
def test_option_scenario_pnl_when_netted_then_equals_black76_repricing_to_1e_12(
        kind: str, inverse: bool) -> None:
    book, _, _ = _listing_book(kind, seed=23, positions=1_000)
    u, dv = _wide_scenarios(40, seed=24)
    result = option_scenario_pnl(*book.values(), u, dv, rate=0.02, inverse=inverse)
    reference = _reprice_one_by_one(book, u, dv, inverse=inverse, rate=0.02)
    np.testing.assert_allclose(result.pnl, reference, rtol=0,
                               atol=1e-12 * np.abs(reference).max())


def test_option_scenario_pnl_when_long_call_short_put_same_strike_then_pnl_is_the_forward() -> None:
    # q C - q P = q D (F_s - K): no option price is left once the contract is netted
    u, dv = _wide_scenarios(50, seed=25)
    t, rate = 30 / 365, 0.03
    result = option_scenario_pnl([2.0, -2.0], [True, False], 60_000.0, 55_000.0, t, 0.6,
                                 u, dv, rate=rate)
    expected = 2.0 * math.exp(-rate * t) * 60_000.0 * u
    np.testing.assert_allclose(result.pnl, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_option_scenario_pnl_when_positions_split_and_shuffled_then_same_pnl() -> None:
    book, rate, horizon = _listing_book("calls_and_puts", seed=26, positions=500)
    u, dv = _wide_scenarios(30, seed=27)
    rng = np.random.default_rng(28)
    pieces = rng.dirichlet(np.ones(3), book["quantity"].size)  # each position in 3 parts
    split = {n: np.repeat(v, 3) for n, v in book.items()}
    split["quantity"] = (book["quantity"][:, None] * pieces).ravel()
    order = rng.permutation(split["quantity"].size)
    shuffled = {n: v[order] for n, v in split.items()}
    whole = option_scenario_pnl(*book.values(), u, dv, rate=rate, horizon_years=horizon)
    parts = option_scenario_pnl(*shuffled.values(), u, dv, rate=np.repeat(rate, 3)[order],
                                horizon_years=horizon)
    np.testing.assert_allclose(parts.pnl, whole.pnl, rtol=0,
                               atol=1e-12 * np.abs(whole.pnl).max())


def test_option_scenario_pnl_when_netted_blocks_tiny_or_huge_then_same_pnl() -> None:
    book, rate, _ = _listing_book("calls_and_puts", seed=29, positions=800)
    u, dv = _wide_scenarios(25, seed=30)
    u[0] = dv[0] = 0.0
    tiny = option_scenario_pnl(*book.values(), u, dv, rate=rate, block_bytes=8 * 5)
    huge = option_scenario_pnl(*book.values(), u, dv, rate=rate, block_bytes=1 << 22)
    scale = np.abs(huge.pnl).max()
    np.testing.assert_allclose(tiny.pnl, huge.pnl, rtol=0, atol=1e-12 * scale)
    assert abs(huge.pnl[0]) <= 1e-13 * scale  # a zero shock: 0 to rounding


def test_option_scenario_pnl_when_netted_float32_then_close_to_float64() -> None:
    book, rate, horizon = _listing_book("near_expiry", seed=31)
    u, dv = _wide_scenarios(60, seed=32)
    exact = option_scenario_pnl(*book.values(), u, dv, rate=rate, horizon_years=horizon).pnl
    single = option_scenario_pnl(*book.values(), u, dv, rate=rate, horizon_years=horizon,
                                 dtype=np.float32).pnl
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, exact, rtol=0, atol=1e-4 * np.abs(exact).max())


def test_option_var_es_when_netted_then_var_and_es_of_per_position_revaluation() -> None:
    book, rate, horizon = _listing_book("calls_and_puts", seed=33)
    u, dv = _wide_scenarios(200, seed=34)
    risk = option_var_es(*book.values(), u, dv, 0.95, rate=rate, horizon_years=horizon)
    reference = historical_var_es(option_scenario_pnl(
        *book.values(), u, dv, rate=rate, horizon_years=horizon, net_contracts=False).pnl, 0.95)
    assert risk.var == pytest.approx(reference.var, rel=1e-12)
    assert risk.es == pytest.approx(reference.es, rel=1e-12)


def test_portfolio_greeks_when_netted_per_instrument_then_equal_per_position_totals() -> None:
    instruments = _book(40, seed=35)
    rng = np.random.default_rng(36)
    which = rng.integers(0, 40, 2_000)
    quantity = rng.normal(0.0, 2.0, 2_000)
    columns = ("is_call", "forward", "strike", "t_years", "vol")
    per_position = portfolio_greeks(quantity, black76_greeks(
        *(instruments[n][which] for n in columns)))
    netted = portfolio_greeks(net_by_instrument(which, quantity, 40), black76_greeks(
        *(instruments[n] for n in columns)))
    for name in ("value", "delta", "gamma", "vega_per_vol", "theta_per_year", "rho"):
        assert netted[name] == pytest.approx(per_position[name], rel=1e-12, abs=1e-9)
