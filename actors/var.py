"""Value at risk and expected shortfall: historical and parametric (normal), for one P&L series,
a portfolio of linear positions and a book of options by full Black-76 revaluation.
Pure, vectorized numpy/pandas: no Ray, no I/O, no clock.

Conventions: P&L is positive for a gain; the loss is ``L = -P&L``; VaR and ES are reported as
positive losses at a confidence ``alpha`` in (0, 1) (0.99 = 99 %).

Historical, from ``n`` P&L values with losses sorted ``L(1) <= ... <= L(n)``::

    VaR = L(m),  m = ceil(n alpha)               (the alpha-quantile of the empirical loss law)
    ES  = [sum_{j > m} L(j) + (m - n alpha) L(m)] / (n (1 - alpha))     (Acerbi & Tasche 2002)

so with n = 20 and alpha = 0.9, VaR is the 3rd-worst loss and ES the mean of the two worst.
ES is the mean of the worst ``n (1 - alpha)`` outcomes (a fraction of ``L(m)`` included), hence
``ES >= VaR`` always.

Parametric (variance-covariance), for P&L ~ Normal(mu, sigma)::

    VaR = -mu + sigma z,   ES = -mu + sigma phi(z) / (1 - alpha),   z = N^-1(alpha)

A portfolio of exposures ``e`` (currency per position) against returns ``R`` has P&L ``R @ e``
and ``sigma^2 = e' Cov(R) e``. A configuration error (confidence outside (0, 1), a window below
the minimum, mismatched shapes) raises ``ValueError`` naming the argument and its value; bad data
rows do not raise: they are NaN or masked and counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtr

from actors.options import Greeks, call_put_sign, norm_pdf, norm_ppf

FloatArray = NDArray[np.floating]
Method = Literal["historical", "parametric"]
METHODS: tuple[str, ...] = ("historical", "parametric")

DEFAULT_VOL_FLOOR = 1e-4
"""Smallest shocked volatility used in revaluation: ``max(vol + shift, floor)``."""
DEFAULT_BLOCK_BYTES = 128 * 1024
"""Bytes per work array in a revaluation block (scenarios x rows): the three work arrays
(384 KiB) stay in a 512 KiB-1 MiB L2 cache."""


@dataclass(frozen=True, slots=True)
class VarEs:
    """VaR and ES as positive losses (arrays when computed over leading axes)."""

    var: FloatArray | float
    es: FloatArray | float
    confidence: float
    method: str


def _check_confidence(confidence: float) -> float:
    value = float(confidence)
    if not 0.0 < value < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.99; got {confidence!r}")
    return value


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return method


def _scalar_if_0d(a: FloatArray) -> FloatArray | float:
    return float(a) if np.ndim(a) == 0 else a


def _var_es_sorted(losses_sorted: FloatArray, confidence: float) -> tuple[FloatArray, FloatArray]:
    """VaR and ES from losses sorted ascending along the last axis (module formulas)."""
    n = losses_sorted.shape[-1]
    n_alpha = n * confidence
    m = min(max(math.ceil(n_alpha - 1e-9), 1), n)  # guard: 20 * 0.9 is 18.000000000000004
    fraction = max(m - n_alpha, 0.0)  # weight of L(m) in the tail, in [0, 1)
    var = losses_sorted[..., m - 1]
    tail_sum = losses_sorted[..., m:].sum(axis=-1) + fraction * var
    # (n - m) + fraction is n (1 - alpha); written as the weights' sum, ES is their weighted mean
    # of values >= VaR, and the max only removes a last-ulp rounding below it
    return var, np.maximum(tail_sum / ((n - m) + fraction), var)


def historical_var_es(pnl: ArrayLike, confidence: float = 0.99, *, axis: int = -1) -> VarEs:
    """Historical VaR and ES of P&L samples along ``axis`` (see the module formulas).

    Vectorized over the other axes. A slice containing NaN gives NaN (drop NaN first to ignore
    them).
    """
    alpha = _check_confidence(confidence)
    losses = -np.moveaxis(np.asarray(pnl, dtype=np.float64), axis, -1)
    if losses.shape[-1] == 0:
        raise ValueError("pnl must hold at least one sample along axis; got an empty axis")
    var, es = _var_es_sorted(np.sort(losses, axis=-1), alpha)
    has_nan = np.isnan(losses).any(axis=-1)
    var = np.where(has_nan, np.nan, var)
    es = np.where(has_nan, np.nan, es)
    return VarEs(_scalar_if_0d(var), _scalar_if_0d(es), alpha, "historical")


def parametric_var_es(mean: ArrayLike, std: ArrayLike, confidence: float = 0.99) -> VarEs:
    """Normal VaR ``-mu + sigma z`` and ES ``-mu + sigma phi(z) / (1 - alpha)`` of a P&L with
    mean ``mu`` and standard deviation ``sigma`` (broadcast); ``z = N^-1(alpha)``."""
    alpha = _check_confidence(confidence)
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.asarray(std, dtype=np.float64)
    z = float(norm_ppf(alpha))
    var = -mu + sigma * z
    es = -mu + sigma * (float(norm_pdf(z)) / (1.0 - alpha))
    return VarEs(_scalar_if_0d(var), _scalar_if_0d(es), alpha, "parametric")


def var_es(pnl: ArrayLike, confidence: float = 0.99, method: Method = "historical") -> VarEs:
    """VaR and ES of one P&L sample: historical, or normal with the sample mean and the
    ``ddof=1`` standard deviation."""
    _check_method(method)
    if method == "historical":
        return historical_var_es(pnl, confidence)
    values = np.asarray(pnl, dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"parametric VaR needs at least 2 P&L values; got {values.size}")
    return parametric_var_es(values.mean(), values.std(ddof=1), confidence)


def rolling_var_es(pnl: pd.Series, window: int, confidence: float = 0.99,
                   method: Method = "historical") -> pd.DataFrame:
    """VaR and ES over a rolling window of ``window`` observations, aligned on the window's last
    row (the first ``window - 1`` rows are NaN, as is any window holding a NaN).

    Returns a frame with columns ``var`` and ``es`` on the series' index. Historical windows are
    sorted all at once (``sliding_window_view``); parametric ones use rolling mean and ``ddof=1``
    standard deviation.
    """
    alpha = _check_confidence(confidence)
    _check_method(method)
    min_window = 1 if method == "historical" else 2
    if int(window) != window or window < min_window:
        raise ValueError(f"window must be an integer >= {min_window} for {method}; "
                         f"got {window!r}")
    window = int(window)
    values = pnl.to_numpy(dtype=np.float64)
    var = np.full(values.shape, np.nan)
    es = np.full(values.shape, np.nan)
    if values.size >= window:
        if method == "historical":
            windows = sliding_window_view(values, window)
            result = historical_var_es(windows, alpha, axis=-1)
            var[window - 1:] = result.var
            es[window - 1:] = result.es
        else:
            rolling = pd.Series(values).rolling(window, min_periods=window)
            result = parametric_var_es(rolling.mean().to_numpy(), rolling.std(ddof=1).to_numpy(),
                                       alpha)
            var, es = np.asarray(result.var), np.asarray(result.es)
    return pd.DataFrame({"var": var, "es": es}, index=pnl.index)


# --------------------------------------------------------------------------------------------
# Portfolios of linear positions
# --------------------------------------------------------------------------------------------


def _check_portfolio(exposures: ArrayLike, scenario_returns: ArrayLike
                     ) -> tuple[FloatArray, FloatArray]:
    e = np.asarray(exposures, dtype=np.float64)
    r = np.asarray(scenario_returns, dtype=np.float64)
    if e.ndim != 1 or r.ndim != 2 or r.shape[1] != e.shape[0]:
        raise ValueError("exposures must be (positions,) and scenario_returns (scenarios, "
                         f"positions); got exposures {e.shape} and scenario_returns {r.shape}")
    return e, r


def portfolio_pnl(exposures: ArrayLike, scenario_returns: ArrayLike) -> FloatArray:
    """Scenario P&L ``R @ e`` of exposures ``e`` (positions,) under returns ``R``
    (scenarios, positions)."""
    e, r = _check_portfolio(exposures, scenario_returns)
    return r @ e


def portfolio_var_es(exposures: ArrayLike, scenario_returns: ArrayLike,
                     confidence: float = 0.99, method: Method = "historical") -> VarEs:
    """Portfolio VaR and ES: historical on the scenario P&L ``R @ e``, or variance-covariance
    with ``mu = mean(R) @ e`` and ``sigma = sqrt(e' Cov(R) e)`` (``ddof=1``)."""
    _check_method(method)
    e, r = _check_portfolio(exposures, scenario_returns)
    if method == "historical":
        return historical_var_es(r @ e, confidence)
    if r.shape[0] < 2:
        raise ValueError(f"parametric VaR needs at least 2 scenarios; got {r.shape[0]}")
    cov = np.atleast_2d(np.cov(r, rowvar=False, ddof=1))
    sigma = math.sqrt(max(float(e @ cov @ e), 0.0))
    return parametric_var_es(float(r.mean(axis=0) @ e), sigma, confidence)


def rolling_portfolio_var_es(exposures: ArrayLike, returns: pd.DataFrame, window: int,
                             confidence: float = 0.99,
                             method: Method = "historical") -> pd.DataFrame:
    """Rolling portfolio VaR and ES for fixed exposures (one column of ``returns`` per position).

    The P&L series ``returns @ e`` carries everything needed: its rolling ``ddof=1`` variance
    equals ``e' Cov_t(R) e`` for the same window exactly, so parametric windows need no
    covariance matrices.
    """
    e, r = _check_portfolio(exposures, returns.to_numpy(dtype=np.float64))
    return rolling_var_es(pd.Series(r @ e, index=returns.index), window, confidence, method)


# --------------------------------------------------------------------------------------------
# Options: full revaluation under (underlying return, vol shift) scenarios
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionScenarioPnl:
    """Scenario P&L of an option book (NaN for an invalid scenario) and what was left out."""

    pnl: FloatArray
    invalid_positions: int
    invalid_scenarios: int


@dataclass(frozen=True, slots=True)
class OptionRisk:
    """Historical VaR and ES of an option book over its valid scenarios, with the P&L."""

    var: float
    es: float
    confidence: float
    pnl: FloatArray
    invalid_positions: int
    invalid_scenarios: int


def net_by_instrument(instrument_index: ArrayLike, quantity: ArrayLike,
                      n_instruments: int) -> FloatArray:
    """Net quantity per instrument: positions in the same instrument revalue identically, so a
    book of many positions is revalued exactly on its few instruments (``np.bincount``)."""
    idx = np.asarray(instrument_index, dtype=np.intp)
    return np.bincount(idx, weights=np.asarray(quantity, dtype=np.float64),
                       minlength=n_instruments)


def option_scenario_pnl(quantity: ArrayLike, is_call: ArrayLike, forward: ArrayLike,
                        strike: ArrayLike, t_years: ArrayLike, vol: ArrayLike,
                        underlying_return: ArrayLike, vol_shift: ArrayLike, *,
                        rate: ArrayLike = 0.0, horizon_years: float = 0.0,
                        inverse: bool = False, vol_floor: float = DEFAULT_VOL_FLOOR,
                        dtype: type[np.floating] = np.float64,
                        block_bytes: int = DEFAULT_BLOCK_BYTES,
                        net_contracts: bool = True) -> OptionScenarioPnl:
    """P&L of an option book under each scenario by full Black-76 revaluation.

    Positions (broadcast to one shape ``(P,)``): ``quantity`` ``q``, ``is_call``, ``forward``
    ``F``, ``strike`` ``K``, ``t_years`` ``T``, ``vol``, ``rate`` ``r``. Scenarios ``(S,)``: a
    relative move ``u`` of every forward and an additive vol shift ``dv``; after
    ``horizon_years`` ``h``::

        F_s = F (1 + u_s),  vol_s = max(vol + dv_s, vol_floor),  T_s = T - h
        pnl_s = sum_i q_i [V(F_s, K, T_s, vol_s) - V(F, K, T, vol)]

    with ``V`` the Black-76 price (coin price ``V / F_s`` if ``inverse``; P&L then in coin) and
    today's value taken with ``max(vol, vol_floor)`` too. A position expiring within the horizon
    is worth its intrinsic ``max(w (F_s - K), 0)``.

    ``net_contracts=True`` (the default, exact) prices each *contract* once per scenario:
    positions with equal ``(F, K, T, vol, r)`` are netted into ``q_c`` calls and ``q_p`` puts,
    and put-call parity ``C - P = D (F_s - K)`` (``D = e^(-r T_s)``) values both sides from the
    out-of-the-money one, e.g. ``q_c C + q_p P = (q_c + q_p) C - q_p D (F_s - K)``; a contract
    with ``q_c + q_p = 0`` needs no option price at all. ``net_contracts=False`` revalues every
    position on its own: the reference the netted path is tested and benchmarked against.

    Either way the prices are built in blocks of scenarios x rows of about ``block_bytes`` per
    array and reduced with matrix-vector products, ``sum_i q_i V_si = g_s (N1 @ (q D w F)) -
    N2 @ (q D w K)`` with ``g_s = 1 + u_s``, ``N1 = N(w d1)``, ``N2 = N(w d2)`` and ``N`` from
    ``scipy.special.ndtr`` (accurate to rounding). ``dtype=np.float32`` halves the memory
    traffic (relative error of each price ~1e-7 of ``F + K``; the parity term stays float64).

    Invalid positions (non-finite, ``F``/``K``/``T`` <= 0, ``vol`` < 0, bad ``is_call``) are left
    out and counted; scenarios with ``u <= -1`` or non-finite values get NaN and are counted.
    """
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1; got {block_bytes!r}")
    if not (math.isfinite(horizon_years) and horizon_years >= 0.0):
        raise ValueError(f"horizon_years must be finite and >= 0; got {horizon_years!r}")
    w, q, f, k, t, v, r = (np.asarray(a, dtype=np.float64).ravel() for a in np.broadcast_arrays(
        call_put_sign(is_call), quantity, forward, strike, t_years, vol, rate))
    with np.errstate(invalid="ignore"):
        valid = (np.isfinite(w) & np.isfinite(q) & np.isfinite(f) & np.isfinite(k)
                 & np.isfinite(t) & np.isfinite(v) & np.isfinite(r) & (f > 0) & (k > 0)
                 & (t > 0) & (v >= 0))
    w, q, f, k, t, v, r = (a[valid] for a in (w, q, f, k, t, v, r))
    u, dv = (np.asarray(a, dtype=np.float64).ravel()
             for a in np.broadcast_arrays(underlying_return, vol_shift))
    good_scenario = np.isfinite(u) & np.isfinite(dv) & (u > -1.0)
    pnl = np.full(u.shape, np.nan)
    if good_scenario.any():
        options = {"inverse": inverse, "vol_floor": vol_floor, "dtype": dtype,
                   "block_bytes": block_bytes}
        if net_contracts:
            book = _net_contracts(w, q, f, k, t, v, r)
            revalue = functools.partial(_revalue_contracts, book, **options)
        else:
            revalue = functools.partial(_revalue_positions, _Positions(w, q, f, k, t, v, r),
                                        **options)
        # today's value through the same kernel and dtype, so a zero shock gives 0 (to rounding)
        base = revalue(0.0, np.zeros(1), np.zeros(1))[0]
        pnl[good_scenario] = revalue(horizon_years, u[good_scenario], dv[good_scenario]) - base
    return OptionScenarioPnl(pnl, int(valid.size - np.count_nonzero(valid)),
                             int(u.size - np.count_nonzero(good_scenario)))


@dataclass(frozen=True, slots=True)
class _Positions:
    """Valid positions, one row each: sign ``w``, quantity and the Black-76 inputs."""

    w: FloatArray
    q: FloatArray
    forward: FloatArray
    strike: FloatArray
    t_years: FloatArray
    vol: FloatArray
    rate: FloatArray


@dataclass(frozen=True, slots=True)
class _Contracts:
    """Distinct ``(F, K, T, vol, r)`` with the net call and put quantity of each."""

    forward: FloatArray
    strike: FloatArray
    t_years: FloatArray
    vol: FloatArray
    rate: FloatArray
    q_call: FloatArray
    q_put: FloatArray


def _net_contracts(w: FloatArray, q: FloatArray, f: FloatArray, k: FloatArray, t: FloatArray,
                   v: FloatArray, r: FloatArray) -> _Contracts:
    """Group positions by equal ``(F, K, T, vol, r)`` (a stable sort, so the grouping and the
    order of each sum depend only on the rows) and sum calls and puts apart."""
    order = np.lexsort((r, v, t, k, f))
    keys = np.stack([f, k, t, v, r])[:, order]
    first = np.ones(order.size, dtype=bool)
    np.any(keys[:, 1:] != keys[:, :-1], axis=0, out=first[1:])
    group = np.cumsum(first) - 1
    groups = int(np.count_nonzero(first))
    q_sorted, w_sorted = q[order], w[order]
    q_call = np.bincount(group, np.where(w_sorted > 0, q_sorted, 0.0), minlength=groups)
    q_put = np.bincount(group, np.where(w_sorted < 0, q_sorted, 0.0), minlength=groups)
    f, k, t, v, r = keys[:, first]
    return _Contracts(f, k, t, v, r, q_call, q_put)


def _intrinsic_total(q_call: FloatArray, q_put: FloatArray, f: FloatArray, k: FloatArray,
                     growth: FloatArray, inverse: bool) -> FloatArray:
    """``sum_i q_c max(F_s - K, 0) + q_p max(K - F_s, 0)`` (over ``F_s`` if ``inverse``)."""
    fs = f[None, :] * growth[:, None]
    calls, puts = np.maximum(fs - k, 0.0), np.maximum(k - fs, 0.0)
    if inverse:
        calls, puts = calls / fs, puts / fs
    return calls @ q_call + puts @ q_put


def _revalue_contracts(book: _Contracts, horizon_years: float, u: FloatArray, dv: FloatArray, *,
                       inverse: bool, vol_floor: float, dtype: type[np.floating],
                       block_bytes: int) -> FloatArray:
    """``sum_i q_i V_si`` for every scenario from netted contracts (see option_scenario_pnl)."""
    growth = 1.0 + u
    t_left = book.t_years - horizon_years
    expired = t_left <= 0
    total = _intrinsic_total(book.q_call[expired], book.q_put[expired], book.forward[expired],
                             book.strike[expired], growth, inverse)
    live = ~expired
    f, k, t_left, v, r = (a[live] for a in (book.forward, book.strike, t_left, book.vol,
                                            book.rate))
    q_call, q_put = book.q_call[live], book.q_put[live]
    # price the out-of-the-money side w; the other side is it plus or minus a forward (parity)
    w = np.where(k >= f, 1.0, -1.0)
    forward_leg = np.where(w > 0, -q_put, q_call) * np.exp(-r * t_left)  # times (F_s - K)
    if inverse:  # (F_s - K) / F_s = 1 - (K / F) / g_s
        total += forward_leg.sum() - (forward_leg * k / f).sum() / growth
    else:
        total += growth * (forward_leg @ f) - forward_leg @ k
    priced = (q_call + q_put) != 0.0
    return total + _option_sums(
        *(a[priced] for a in (w, q_call + q_put, f, k, t_left, v, r)), u, dv, inverse=inverse,
        vol_floor=vol_floor, dtype=dtype, block_bytes=block_bytes)


def _revalue_positions(book: _Positions, horizon_years: float, u: FloatArray, dv: FloatArray, *,
                       inverse: bool, vol_floor: float, dtype: type[np.floating],
                       block_bytes: int) -> FloatArray:
    """``sum_i q_i V_si`` for every scenario, one row per position (see option_scenario_pnl)."""
    w, q = book.w, book.q
    t_left = book.t_years - horizon_years
    expired = t_left <= 0
    qe, we = q[expired], w[expired]
    total = _intrinsic_total(np.where(we > 0, qe, 0.0), np.where(we < 0, qe, 0.0),
                             book.forward[expired], book.strike[expired], 1.0 + u, inverse)
    live = ~expired
    return total + _option_sums(
        *(a[live] for a in (w, q, book.forward, book.strike, t_left, book.vol, book.rate)),
        u, dv, inverse=inverse, vol_floor=vol_floor, dtype=dtype, block_bytes=block_bytes)


def _option_sums(w: FloatArray, q: FloatArray, f: FloatArray, k: FloatArray,
                 t_left: FloatArray, v: FloatArray, r: FloatArray, u: FloatArray,
                 dv: FloatArray, *, inverse: bool, vol_floor: float, dtype: type[np.floating],
                 block_bytes: int) -> FloatArray:
    """``sum_i q_i V_si`` over rows of sign ``w`` with ``T_s > 0``, per scenario, in blocks of
    about ``block_bytes`` per work array (three of them, every step in place).

    ``sum_i q D w (F_s N1 - K N2) = g_s (N1 @ (qDw F)) - N2 @ (qDw K)``; if ``inverse``,
    ``sum_i q D w (N1 - K/F_s N2) = N1 @ (qDw) - (N2 @ (qDw K/F)) / g_s``. With ``H = w s / 2``
    (``s = vol_s sqrt(T_s)``; the sign folded into a row vector) and ``X = (ln(F_s/K) / 2) / H
    = w ln(F_s/K) / s``: ``w d1 = X + H`` and ``w d2 = X - H``.
    """
    total = np.zeros(u.shape)
    if f.size == 0:
        return total
    weight = q * w * np.exp(-r * t_left)  # q D w
    leg1 = (weight if inverse else weight * f).astype(dtype)
    leg2 = (weight * k / f if inverse else weight * k).astype(dtype)
    growth = 1.0 + u
    signed_half_sqrt_t = (0.5 * w * np.sqrt(t_left)).astype(dtype)
    half_log_fk = (0.5 * np.log(f / k)).astype(dtype)
    half_log_growth = (0.5 * np.log1p(u)).astype(dtype)
    vol = v.astype(dtype)
    shift = dv.astype(dtype)
    floor = dtype(vol_floor)
    clip = bool(vol.min() + shift.min() < floor)  # rounding is monotone: no row below, no clip
    elements = max(1, block_bytes // np.dtype(dtype).itemsize)
    col_block = min(vol.size, elements)
    row_block = max(1, min(u.size, elements // col_block))
    buffers = np.empty((3, row_block, col_block), dtype=dtype)
    for c0 in range(0, vol.size, col_block):
        cs = slice(c0, c0 + col_block)
        for s0 in range(0, u.size, row_block):
            ss = slice(s0, s0 + row_block)
            h, x, d1 = buffers[:, :min(row_block, u.size - s0), :min(col_block, vol.size - c0)]
            np.add(vol[cs], shift[ss, None], out=h)
            if clip:
                np.maximum(h, floor, out=h)
            h *= signed_half_sqrt_t[cs]
            np.add(half_log_fk[cs], half_log_growth[ss, None], out=x)
            x /= h
            np.add(x, h, out=d1)
            x -= h
            sum1 = (ndtr(d1, out=d1) @ leg1[cs]).astype(np.float64)
            sum2 = (ndtr(x, out=x) @ leg2[cs]).astype(np.float64)
            total[ss] += sum1 - sum2 / growth[ss] if inverse else growth[ss] * sum1 - sum2
    return total


def option_var_es(quantity: ArrayLike, is_call: ArrayLike, forward: ArrayLike,
                  strike: ArrayLike, t_years: ArrayLike, vol: ArrayLike,
                  underlying_return: ArrayLike, vol_shift: ArrayLike,
                  confidence: float = 0.99, **revaluation: object) -> OptionRisk:
    """Historical VaR and ES of an option book by full revaluation (:func:`option_scenario_pnl`,
    whose keyword options pass through), over the valid scenarios."""
    alpha = _check_confidence(confidence)
    result = option_scenario_pnl(quantity, is_call, forward, strike, t_years, vol,
                                 underlying_return, vol_shift, **revaluation)  # type: ignore[arg-type]
    finite = result.pnl[np.isfinite(result.pnl)]
    if finite.size == 0:
        var = es = math.nan
    else:
        risk = historical_var_es(finite, alpha)
        var, es = float(risk.var), float(risk.es)
    return OptionRisk(var, es, alpha, result.pnl, result.invalid_positions,
                      result.invalid_scenarios)


def dgv_scenario_pnl(quantity: ArrayLike, greeks: Greeks, forward: ArrayLike,
                     underlying_return: ArrayLike, vol_shift: ArrayLike, *,
                     horizon_years: float = 0.0) -> FloatArray:
    """Delta-gamma-vega(-theta) approximation of the option book's scenario P&L::

        pnl_s ~ sum_i q_i [delta_i dF_is + gamma_i dF_is^2 / 2 + vega_i dv_s + theta_i h],
        dF_is = F_i u_s

    which, as the shocks are common to all positions, is ``u_s A + u_s^2 B / 2 + dv_s C + h D``
    with book totals ``A = sum q delta F``, ``B = sum q gamma F^2``, ``C = sum q vega``,
    ``D = sum q theta``: O(P + S) instead of O(P S). A second-order Taylor expansion, so it is
    blind to the curvature of large moves and to vol-of-vol (vanna, volga) effects; compare it
    with :func:`option_scenario_pnl`. Positions with NaN Greeks are left out.
    """
    q, f, delta, gamma, vega, theta = np.broadcast_arrays(
        np.asarray(quantity, dtype=np.float64), np.asarray(forward, dtype=np.float64),
        greeks.delta, greeks.gamma, greeks.vega_per_vol, greeks.theta_per_year)
    ok = np.isfinite(np.stack([q, f, delta, gamma, vega, theta])).all(axis=0)
    qo, fo = q[ok], f[ok]
    cash_delta = float(qo @ (delta[ok] * fo))
    cash_gamma = float(qo @ (gamma[ok] * fo * fo))
    book_vega = float(qo @ vega[ok])
    book_theta = float(qo @ theta[ok])
    u = np.asarray(underlying_return, dtype=np.float64)
    dv = np.asarray(vol_shift, dtype=np.float64)
    return (u * cash_delta + 0.5 * u * u * cash_gamma + dv * book_vega
            + horizon_years * book_theta)
