"""European option prices, Greeks and implied volatility: Black-Scholes (spot) and Black-76
(forward), vectorized over numpy arrays. Pure functions: no Ray, no I/O, no clock.

Every argument broadcasts against the others. ``is_call`` is a boolean array (``True`` = call) or
a ``+1`` / ``-1`` array; below ``w`` is that sign. Times are in years (``t_years``), volatilities
and rates are annualised decimals (0.65 = 65 %), ``rate`` is the continuously compounded
risk-free rate ``r`` and ``dividend_yield`` the continuous yield ``q`` (dividend, foreign rate or
convenience yield; the cost of carry is ``b = r - q``).

Black-Scholes on a spot ``S``::

    d1 = (ln(S/K) + (r - q + vol**2/2) T) / (vol sqrt(T)),   d2 = d1 - vol sqrt(T)
    V  = w [S e^(-qT) N(w d1) - K e^(-rT) N(w d2)]

Black-76 on a forward ``F`` (Deribit prices its options on the forward of the expiry)::

    d1 = (ln(F/K) + vol**2 T / 2) / (vol sqrt(T)),   d2 = d1 - vol sqrt(T)
    V  = e^(-rT) w [F N(w d1) - K N(w d2)]

Black-Scholes is Black-76 on ``F = S e^((r-q)T)``. Deribit's coin-margined ("inverse") options
quote the price in coin: ``V_coin = V_usd / F``; pass ``inverse=True`` to the Black-76 functions.

Bad rows never raise: prices and Greeks are NaN where an input is invalid (non-finite, ``F``,
``S`` or ``K`` <= 0, ``T`` or ``vol`` < 0, ``is_call`` not a sign); implied volatility returns
NaN plus a status code per row and a count per reason (:class:`ImpliedVol`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.floating]

DAYS_PER_YEAR = 365.0
"""Calendar days per year for ``theta_per_day`` (crypto trades every day; Deribit uses 365)."""
VOL_POINT = 0.01
"""One volatility point (1 % vol) in decimal vol, for ``vega_per_vol_point``."""

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)

# --------------------------------------------------------------------------------------------
# Normal distribution
# --------------------------------------------------------------------------------------------

# W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23 (1969),
# coefficients of his CALERF routine. Max relative error of erfc ~1e-16 on each range.
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)
_ERFC_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
           2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
           2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_ERFC_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
           1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
           3.43936767414372164e03, 1.23033935480374942e03)
_ERFC_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
           1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_ERFC_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
           6.05183413124413191e-2, 2.33520497626869185e-3)
_ERF_SMALL_MAX = 0.46875
_ERFC_MID_MAX = 4.0


def _exp_half_square(a: FloatArray) -> FloatArray:
    """``exp(-a^2/2)`` with ``a^2/2 = u^2/2 + (a-u)(a+u)/2``, ``u`` = a rounded down to 1/16:
    ``u^2`` is exact, so the rounding of ``a^2`` is not amplified in the far tail (Cody's trick)."""
    u = np.trunc(a * 16.0) / 16.0
    return np.exp(-0.5 * u * u) * np.exp(-0.5 * (a - u) * (a + u))


def _half_erfc_small(a: FloatArray) -> FloatArray:
    """``erfc(y)/2 = (1 - y P(y^2)/Q(y^2))/2``, ``y = a/sqrt(2)`` in [0, 0.46875]."""
    y = a * _INV_SQRT2
    ysq = y * y
    num = _ERF_A[4] * ysq
    den = ysq.copy()
    for i in range(3):
        num = (num + _ERF_A[i]) * ysq
        den = (den + _ERF_B[i]) * ysq
    return 0.5 - 0.5 * y * (num + _ERF_A[3]) / (den + _ERF_B[3])


def _erfc_mid_ratio(y: FloatArray) -> FloatArray:
    """``erfc(y) exp(y^2) ~ P8(y)/Q8(y)``, Cody's fit on 0.46875 < y <= 4."""
    num = _ERFC_C[8] * y
    den = y.copy()
    for i in range(7):
        num = (num + _ERFC_C[i]) * y
        den = (den + _ERFC_D[i]) * y
    return (num + _ERFC_C[7]) / (den + _ERFC_D[7])


def _half_erfc_mid(a: FloatArray) -> FloatArray:
    """``erfc(y)/2 = exp(-y^2) P8(y)/Q8(y) / 2`` for y in (0.46875, 4]."""
    return 0.5 * _exp_half_square(a) * _erfc_mid_ratio(a * _INV_SQRT2)


def _half_erfc_large(a: FloatArray) -> FloatArray:
    """``erfc(y)/2 = exp(-y^2)/y (1/sqrt(pi) - y^-2 P(y^-2)/Q(y^-2)) / 2`` for y > 4."""
    y = a * _INV_SQRT2
    inv_ysq = 1.0 / (y * y)
    num = _ERFC_P[5] * inv_ysq
    den = inv_ysq.copy()
    for i in range(4):
        num = (num + _ERFC_P[i]) * inv_ysq
        den = (den + _ERFC_Q[i]) * inv_ysq
    r = (_INV_SQRT_PI - inv_ysq * (num + _ERFC_P[4]) / (den + _ERFC_Q[4])) / y
    with np.errstate(invalid="ignore"):  # a = inf: inf - inf in the split; the result is 0
        tail = 0.5 * _exp_half_square(a) * r
    return np.where(np.isinf(a), 0.0, tail).astype(a.dtype, copy=False)


def _float_array(x: ArrayLike) -> FloatArray:
    arr = np.asarray(x)
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)


def norm_cdf(x: ArrayLike) -> FloatArray:
    """Standard normal CDF ``N(x) = erfc(-x / sqrt(2)) / 2``, vectorized.

    Cody's rational approximations of ``erfc`` on three ranges of ``|x|/sqrt(2)`` (selected by
    mask; no scipy, no per-element ``math.erf``). The lower tail keeps *relative* precision:
    against ``math.erfc`` the relative difference is below 2e-14 for x > -10 and below 3e-13 down
    to x = -37 (N = 1e-300), where the reference's own rounding of ``x/sqrt(2)`` dominates; the
    upper tail is ``1 - N(-x)`` (absolute error below 4e-16). float32 input is computed in
    float32.
    """
    x_arr = _float_array(x)
    a = np.abs(x_arr)
    half = np.full_like(a, np.nan)
    small = a <= _ERF_SMALL_MAX * math.sqrt(2.0)
    large = a > _ERFC_MID_MAX * math.sqrt(2.0)
    mid = ~(small | large | np.isnan(a))
    for mask, fn in ((small, _half_erfc_small), (mid, _half_erfc_mid),
                     (large, _half_erfc_large)):
        if mask.any():
            half[mask] = fn(a[mask])
    return np.where(x_arr < 0, half, 1.0 - half)


_FAST_MAX_Y = 40.0


def norm_cdf_fast(x: ArrayLike) -> FloatArray:
    """Standard normal CDF from one formula, numpy only: Cody's middle-range
    ``erfc(y) ~ exp(-y^2) P8(y)/Q8(y)`` applied for every ``y = |x|/sqrt(2)`` (no masks). The
    option revaluation in ``actors.var`` uses ``scipy.special.ndtr`` instead: faster, and exact
    to rounding.

    Max *absolute* error 2.4e-12 (near x = 0; below 2e-15 for |x| > 0.7), relative error in the
    lower tail below 1e-9 for x > -14 (where N(x) > 1e-44): ample for P&L, whose error is then
    below 3e-12 (F + K) per option. Prefer :func:`norm_cdf` for implied vol and anything needing
    tail precision. About half the cost of :func:`norm_cdf`. float32 input stays float32.
    """
    x_arr = _float_array(x)
    a = np.minimum(np.abs(x_arr), _FAST_MAX_Y * math.sqrt(2.0))
    half = (0.5 * np.exp(-0.5 * a * a)) * _erfc_mid_ratio(a * _INV_SQRT2)
    return np.where(x_arr < 0, half, 1.0 - half)


def norm_pdf(x: ArrayLike) -> FloatArray:
    """Standard normal density ``phi(x) = exp(-x^2/2) / sqrt(2 pi)``."""
    x_arr = np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32))
    return np.exp(-0.5 * x_arr * x_arr) / _SQRT_2PI


# P. J. Acklam's rational approximation of the normal quantile (relative error < 1.15e-9),
# refined below by one Halley step on norm_cdf to full double precision.
_PPF_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
          1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_PPF_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
          6.680131188771972e01, -1.328068155288572e01)
_PPF_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
          -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_PPF_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
          3.754408661907416e00)
_PPF_TAIL = 0.02425


def _horner(coeffs: tuple[float, ...], x: FloatArray) -> FloatArray:
    acc = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + c
    return acc


def norm_ppf(p: ArrayLike) -> FloatArray:
    """Standard normal quantile ``N^-1(p)``: Acklam's approximation plus one Halley step.

    ``p`` in (0, 1); ``p = 0`` gives -inf, ``p = 1`` gives +inf, outside [0, 1] or NaN gives NaN.
    Computed on ``min(p, 1-p)`` (the lower tail, where ``norm_cdf`` is relatively accurate) and
    reflected, so the quantile is accurate to ~1e-15 relative across the range.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    lower = np.minimum(p_arr, 1.0 - p_arr)  # in (0, 0.5]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_central = lower - 0.5
        r = q_central * q_central
        x_central = (_horner(_PPF_A, r) * q_central) / (_horner((*_PPF_B, 1.0), r))
        t = np.sqrt(-2.0 * np.log(lower))
        x_tail = _horner(_PPF_C, t) / _horner((*_PPF_D, 1.0), t)
        x = np.where(lower < _PPF_TAIL, x_tail, x_central)
        # Halley: e = N(x) - p, u = e / phi(x), x <- x - u / (1 + x u / 2)
        e = norm_cdf(x) - lower
        u = e * _SQRT_2PI * np.exp(0.5 * x * x)
        refined = x - u / (1.0 + 0.5 * x * u)
        x = np.where(np.isfinite(refined), refined, x)
    z = np.where(p_arr > 0.5, -x, x)
    z = np.where(p_arr == 0.0, -np.inf, np.where(p_arr == 1.0, np.inf, z))
    return np.where((p_arr >= 0.0) & (p_arr <= 1.0), z, np.nan)


# --------------------------------------------------------------------------------------------
# Prices and Greeks
# --------------------------------------------------------------------------------------------


def call_put_sign(is_call: ArrayLike) -> FloatArray:
    """``is_call`` (bool, or +1 call / -1 put) as a float sign ``w``; NaN where it is neither."""
    arr = np.asarray(is_call)
    if arr.dtype == np.bool_:
        return np.where(arr, 1.0, -1.0)
    values = arr.astype(np.float64)
    return np.where((values == 1.0) | (values == -1.0), values, np.nan)


@dataclass(frozen=True, slots=True)
class Greeks:
    """Price and sensitivities of each option, per unit of the option.

    ``delta`` = dV/dS (or dV/dF), ``gamma`` = d2V/dS2, ``vega_per_vol`` = dV/dvol for a change of
    1.00 in vol, ``theta_per_year`` = dV/dt as calendar time passes (= -dV/dT), ``rho`` = dV/dr for
    a change of 1.00 in the rate. For ``inverse=True`` every field is the derivative of the coin
    price ``V/F``.
    """

    price: FloatArray
    delta: FloatArray
    gamma: FloatArray
    vega_per_vol: FloatArray
    theta_per_year: FloatArray
    rho: FloatArray

    @property
    def vega_per_vol_point(self) -> FloatArray:
        """dV for a one-point (0.01) rise in vol: ``vega_per_vol * 0.01``."""
        return self.vega_per_vol * VOL_POINT

    @property
    def theta_per_day(self) -> FloatArray:
        """dV for one calendar day passing: ``theta_per_year / 365``."""
        return self.theta_per_year / DAYS_PER_YEAR


def _broadcast_float(*args: ArrayLike) -> list[FloatArray]:
    return [np.asarray(a, dtype=np.float64) for a in np.broadcast_arrays(*args)]


def _black_undiscounted(w: FloatArray, forward: FloatArray, strike: FloatArray,
                        total_vol: FloatArray) -> FloatArray:
    """``w [F N(w d1) - K N(w d2)]`` with ``total_vol = vol sqrt(T) > 0``."""
    d1 = np.log(forward / strike) / total_vol + 0.5 * total_vol
    d2 = d1 - total_vol
    return w * (forward * norm_cdf(w * d1) - strike * norm_cdf(w * d2))


def _price_from_forward(w: FloatArray, forward: FloatArray, strike: FloatArray,
                        t_years: FloatArray, vol: FloatArray, discount: FloatArray) -> FloatArray:
    """Discounted Black price; the ``vol sqrt(T) = 0`` limit is the discounted intrinsic value."""
    valid = (np.isfinite(w) & np.isfinite(forward) & np.isfinite(strike) & np.isfinite(t_years)
             & np.isfinite(vol) & np.isfinite(discount) & (forward > 0) & (strike > 0)
             & (t_years >= 0) & (vol >= 0))
    with np.errstate(all="ignore"):
        total_vol = vol * np.sqrt(t_years)
        positive = valid & (total_vol > 0)
        safe_s = np.where(positive, total_vol, 1.0)
        safe_f = np.where(valid, forward, 1.0)
        safe_k = np.where(valid, strike, 1.0)
        safe_w = np.where(valid, w, 1.0)
        # clipped at 0: far out of the money F N(w d1) - K N(w d2) can round to -1e-300
        undiscounted = np.where(
            positive, np.maximum(_black_undiscounted(safe_w, safe_f, safe_k, safe_s), 0.0),
            np.maximum(safe_w * (safe_f - safe_k), 0.0))
        return np.where(valid, discount * undiscounted, np.nan)


def black76_price(is_call: ArrayLike, forward: ArrayLike, strike: ArrayLike, t_years: ArrayLike,
                  vol: ArrayLike, rate: ArrayLike = 0.0, *, inverse: bool = False) -> FloatArray:
    """Black-76 price ``e^(-rT) w [F N(w d1) - K N(w d2)]``; coin price ``V / F`` if ``inverse``.

    ``T = 0`` or ``vol = 0`` give the discounted intrinsic value ``e^(-rT) max(w (F - K), 0)``.
    """
    w, f, k, t, v, r = _broadcast_float(call_put_sign(is_call), forward, strike, t_years, vol,
                                        rate)
    with np.errstate(all="ignore"):
        price = _price_from_forward(w, f, k, t, v, np.exp(-r * t))
        return price / f if inverse else price


def bs_price(is_call: ArrayLike, spot: ArrayLike, strike: ArrayLike, t_years: ArrayLike,
             vol: ArrayLike, rate: ArrayLike = 0.0, dividend_yield: ArrayLike = 0.0) -> FloatArray:
    """Black-Scholes price ``w [S e^(-qT) N(w d1) - K e^(-rT) N(w d2)]`` (Black-76 on
    ``F = S e^((r-q)T)``). ``T = 0`` or ``vol = 0`` give the discounted intrinsic on the forward."""
    w, s, k, t, v, r, q = _broadcast_float(call_put_sign(is_call), spot, strike, t_years, vol,
                                           rate, dividend_yield)
    with np.errstate(all="ignore"):
        forward = s * np.exp((r - q) * t)
        return _price_from_forward(w, forward, k, t, v, np.exp(-r * t))


@dataclass(frozen=True, slots=True)
class _Core:
    valid: NDArray[np.bool_]
    w: FloatArray
    t: FloatArray
    sqrt_t: FloatArray
    d1: FloatArray
    d2: FloatArray
    n1: FloatArray  # N(w d1)
    n2: FloatArray  # N(w d2)
    pdf1: FloatArray  # phi(d1)


def _core(w: FloatArray, forward: FloatArray, strike: FloatArray, t_years: FloatArray,
          vol: FloatArray, extra_valid: NDArray[np.bool_]) -> _Core:
    """d1, d2 and the normal terms, with invalid rows replaced by harmless values (masked later)."""
    valid = (extra_valid & np.isfinite(w) & np.isfinite(forward) & np.isfinite(strike)
             & np.isfinite(t_years) & np.isfinite(vol) & (forward > 0) & (strike > 0)
             & (t_years > 0) & (vol > 0))
    f = np.where(valid, forward, 1.0)
    k = np.where(valid, strike, 1.0)
    t = np.where(valid, t_years, 1.0)
    sqrt_t = np.sqrt(t)
    total_vol = np.where(valid, vol, 1.0) * sqrt_t
    d1 = np.log(f / k) / total_vol + 0.5 * total_vol
    d2 = d1 - total_vol
    ww = np.where(valid, w, 1.0)
    return _Core(valid, ww, t, sqrt_t, d1, d2, norm_cdf(ww * d1), norm_cdf(ww * d2), norm_pdf(d1))


def _nan_where_invalid(valid: NDArray[np.bool_], *arrays: FloatArray) -> list[FloatArray]:
    return [np.where(valid, a, np.nan) for a in arrays]


def black76_greeks(is_call: ArrayLike, forward: ArrayLike, strike: ArrayLike, t_years: ArrayLike,
                   vol: ArrayLike, rate: ArrayLike = 0.0, *, inverse: bool = False) -> Greeks:
    """Black-76 price and Greeks with respect to the forward ``F`` (``D = e^(-rT)``)::

        delta = w D N(w d1)                 gamma = D phi(d1) / (F vol sqrt(T))
        vega  = D F phi(d1) sqrt(T)         theta = r V - D F phi(d1) vol / (2 sqrt(T))
        rho   = -T V                        (F held fixed as r moves)

    With ``inverse=True`` (coin price ``U = V / F``)::

        delta_U = (delta - U) / F           gamma_U = (gamma - 2 delta_U) / F
        vega_U, theta_U, rho_U = vega / F, theta / F, rho / F

    so ``F * delta_U = delta - V/F`` is the premium-adjusted (coin) delta. Rows with ``T <= 0`` or
    ``vol <= 0`` (or any invalid input) are NaN.
    """
    w, f, k, t, v, r = _broadcast_float(call_put_sign(is_call), forward, strike, t_years, vol,
                                        rate)
    with np.errstate(all="ignore"):
        c = _core(w, f, k, t, v, np.isfinite(r))
        ff = np.where(c.valid, f, 1.0)
        kk = np.where(c.valid, k, 1.0)
        tt = c.t
        disc = np.exp(-np.where(c.valid, r, 0.0) * tt)
        vv = np.where(c.valid, v, 1.0)
        price = disc * c.w * (ff * c.n1 - kk * c.n2)
        delta = c.w * disc * c.n1
        gamma = disc * c.pdf1 / (ff * vv * c.sqrt_t)
        vega = disc * ff * c.pdf1 * c.sqrt_t
        theta = np.where(c.valid, r, 0.0) * price - disc * ff * c.pdf1 * vv / (2.0 * c.sqrt_t)
        rho = -tt * price
        if inverse:
            price = price / ff
            delta = (delta - price) / ff
            gamma = (gamma - 2.0 * delta) / ff
            vega, theta, rho = vega / ff, theta / ff, rho / ff
        return Greeks(*_nan_where_invalid(c.valid, price, delta, gamma, vega, theta, rho))


def bs_greeks(is_call: ArrayLike, spot: ArrayLike, strike: ArrayLike, t_years: ArrayLike,
              vol: ArrayLike, rate: ArrayLike = 0.0, dividend_yield: ArrayLike = 0.0) -> Greeks:
    """Black-Scholes price and Greeks with respect to the spot ``S`` (``Dr = e^(-rT)``,
    ``Dq = e^(-qT)``)::

        delta = w Dq N(w d1)                gamma = Dq phi(d1) / (S vol sqrt(T))
        vega  = S Dq phi(d1) sqrt(T)        rho   = w K T Dr N(w d2)
        theta = -S Dq phi(d1) vol / (2 sqrt(T)) - w r K Dr N(w d2) + w q S Dq N(w d1)

    Rows with ``T <= 0`` or ``vol <= 0`` (or any invalid input) are NaN.
    """
    w, s, k, t, v, r, q = _broadcast_float(call_put_sign(is_call), spot, strike, t_years, vol,
                                           rate, dividend_yield)
    with np.errstate(all="ignore"):
        forward = s * np.exp((r - q) * t)
        c = _core(w, forward, k, t, v, np.isfinite(r) & np.isfinite(q) & (s > 0))
        ss = np.where(c.valid, s, 1.0)
        kk = np.where(c.valid, k, 1.0)
        vv = np.where(c.valid, v, 1.0)
        rr = np.where(c.valid, r, 0.0)
        qq = np.where(c.valid, q, 0.0)
        tt = c.t
        disc_r = np.exp(-rr * tt)
        disc_q = np.exp(-qq * tt)
        spot_leg = ss * disc_q * c.n1
        strike_leg = kk * disc_r * c.n2
        price = c.w * (spot_leg - strike_leg)
        delta = c.w * disc_q * c.n1
        gamma = disc_q * c.pdf1 / (ss * vv * c.sqrt_t)
        vega = ss * disc_q * c.pdf1 * c.sqrt_t
        theta = (-ss * disc_q * c.pdf1 * vv / (2.0 * c.sqrt_t) - c.w * rr * strike_leg
                 + c.w * qq * spot_leg)
        rho = c.w * tt * strike_leg
        return Greeks(*_nan_where_invalid(c.valid, price, delta, gamma, vega, theta, rho))


def portfolio_greeks(quantities: ArrayLike, greeks: Greeks) -> dict[str, float]:
    """Position-weighted totals ``sum_i q_i g_i`` of each Greek (and of the market value).

    Rows whose Greeks are NaN (invalid inputs) or whose quantity is not finite are left out of
    the sums and counted in ``invalid_positions`` (a float, like every value here), so a bad row
    is visible rather than turning every total into NaN.
    """
    q = np.asarray(quantities, dtype=np.float64)
    fields = {
        "value": greeks.price, "delta": greeks.delta, "gamma": greeks.gamma,
        "vega_per_vol": greeks.vega_per_vol, "theta_per_year": greeks.theta_per_year,
        "rho": greeks.rho,
    }
    stacked = np.stack(np.broadcast_arrays(q, *fields.values()))
    ok = np.isfinite(stacked).all(axis=0)
    weights = np.where(ok, stacked[0], 0.0)
    totals = {name: float(np.where(ok, row, 0.0) @ weights)
              for name, row in zip(fields, stacked[1:], strict=True)}
    totals["vega_per_vol_point"] = totals["vega_per_vol"] * VOL_POINT
    totals["theta_per_day"] = totals["theta_per_year"] / DAYS_PER_YEAR
    totals["positions"] = float(ok.size)
    totals["invalid_positions"] = float(ok.size - np.count_nonzero(ok))
    return totals


# --------------------------------------------------------------------------------------------
# Implied volatility
# --------------------------------------------------------------------------------------------


class IVStatus(IntEnum):
    """Why a row of :func:`black76_implied_vol` has (or lacks) a volatility."""

    OK = 0
    INVALID_INPUT = 1  # non-finite input, price <= 0, F or K <= 0, T <= 0, bad is_call
    BELOW_INTRINSIC = 2  # price < discounted intrinsic: violates the lower no-arbitrage bound
    AT_INTRINSIC = 3  # in the money, time value within rounding of 0: vol not identifiable
    ABOVE_UPPER_BOUND = 4  # price >= D F (call) or D K (put): violates the upper bound
    VOL_ABOVE_MAX = 5  # the price needs vol sqrt(T) above max_total_vol
    NOT_CONVERGED = 6  # the iteration budget ran out (should not happen; counted if it does)


_TIME_VALUE_ULPS = 16.0
"""An in-the-money time value within ``16 eps (F + K)`` of zero is rounding noise
(:attr:`IVStatus.AT_INTRINSIC`); out of the money the time value is the price itself, exact."""

MAX_TOTAL_VOL = 40.0
"""Default largest ``vol sqrt(T)`` the implied-vol search considers (the price is then
``min(F, K)`` to within 1e-80, so in practice every price below the upper bound is reached)."""


@dataclass(frozen=True, slots=True)
class ImpliedVol:
    """Implied volatilities (NaN where none) with a status code per row (:class:`IVStatus`)."""

    vol: FloatArray
    status: NDArray[np.int8]
    iterations: int

    @property
    def counts(self) -> dict[str, int]:
        """Rows per status name, every status present (zero counts included)."""
        found = np.bincount(self.status.ravel().astype(np.intp), minlength=len(IVStatus))
        return {s.name.lower(): int(found[s.value]) for s in IVStatus}

    @property
    def failed(self) -> int:
        """Rows without a volatility."""
        return int(np.count_nonzero(self.status != IVStatus.OK))


def _otm_price_and_vega(w: FloatArray, forward: FloatArray, strike: FloatArray,
                        sqrt_t: FloatArray, vol: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Undiscounted price and vega ``F phi(d1) sqrt(T)``; ``vol`` > 0."""
    total_vol = vol * sqrt_t
    d1 = np.log(forward / strike) / total_vol + 0.5 * total_vol
    price = w * (forward * norm_cdf(w * d1) - strike * norm_cdf(w * (d1 - total_vol)))
    return price, forward * norm_pdf(d1) * sqrt_t


def black76_implied_vol(price: ArrayLike, is_call: ArrayLike, forward: ArrayLike,
                        strike: ArrayLike, t_years: ArrayLike, rate: ArrayLike = 0.0, *,
                        inverse: bool = False, max_iter: int = 100, rtol: float = 1e-13,
                        max_total_vol: float = MAX_TOTAL_VOL) -> ImpliedVol:
    """Black-76 implied volatility, vectorized; never raises on a bad row.

    The undiscounted price ``C = price / e^(-rT)`` (times ``F`` first if ``inverse``) is split
    into intrinsic ``max(w (F - K), 0)`` and time value; the time value equals the price of the
    out-of-the-money option of the same strike (put-call parity), which is solved instead, so
    deep in-the-money rows do not lose their time value to cancellation. Bounds:
    ``0 < C - intrinsic < min(F, K)``; in the money, a time value within ``16 eps (F + K)`` of
    zero is indistinguishable from rounding and reported as ``AT_INTRINSIC``.

    Iteration, per row: Newton on ``ln B(vol) = ln target`` (step ``-ln(B/target) B / vega``),
    started at Manaster-Koehler's ``sqrt(2 |ln(F/K)| / T)`` (or Brenner-Subrahmanyam's
    ``sqrt(2 pi / T) target / F`` near the money), inside a bracket ``[lo, hi]`` kept from every
    evaluation; a step that leaves the bracket, or a vega that underflows, is replaced by
    bisection. Stops when ``|B/target - 1| <= rtol`` or the bracket is below 1e-15 relative,
    after at most ``max_iter`` rounds; a row stopped by the bracket must still reprice to 1e-10.
    The bracket starts at ``[0, max_total_vol / sqrt(T)]``. Invalid rows are masked, NaN and
    counted, never raised.
    """
    w, p, f, k, t, r = _broadcast_float(call_put_sign(is_call), price, forward, strike, t_years,
                                        rate)
    shape = p.shape
    status = np.full(shape, IVStatus.OK, dtype=np.int8)
    with np.errstate(all="ignore"):
        valid = (np.isfinite(w) & np.isfinite(p) & np.isfinite(f) & np.isfinite(k)
                 & np.isfinite(t) & np.isfinite(r) & (p > 0) & (f > 0) & (k > 0) & (t > 0))
        status[~valid] = IVStatus.INVALID_INPUT
        undiscounted = p * np.exp(r * t) * (f if inverse else 1.0)
        intrinsic = np.maximum(w * (f - k), 0.0)
        time_value = undiscounted - intrinsic
        # in the money, the time value is a difference of rounded numbers: below this it is noise
        resolution = np.where(intrinsic > 0, _TIME_VALUE_ULPS * np.finfo(np.float64).eps
                              * (f + k), 0.0)
        status[valid & (time_value < -resolution)] = IVStatus.BELOW_INTRINSIC
        status[valid & (np.abs(time_value) <= resolution)] = IVStatus.AT_INTRINSIC
        status[valid & (time_value >= np.minimum(f, k))] = IVStatus.ABOVE_UPPER_BOUND
    vol = np.full(shape, np.nan)
    todo = np.flatnonzero(status.ravel() == IVStatus.OK)
    if todo.size == 0:
        return ImpliedVol(vol, status, 0)
    solved, solve_status, iterations = _solve_otm_vol(
        f.ravel()[todo], k.ravel()[todo], t.ravel()[todo], time_value.ravel()[todo],
        max_iter, rtol, max_total_vol)
    vol.ravel()[todo] = solved
    status.ravel()[todo] = solve_status
    return ImpliedVol(vol, status, iterations)


def _solve_otm_vol(f: FloatArray, k: FloatArray, t: FloatArray, target: FloatArray,
                   max_iter: int, rtol: float,
                   max_total_vol: float) -> tuple[FloatArray, NDArray[np.int8], int]:
    """Vol with ``OTM price(vol) = target`` for 0 < target < min(F, K); see black76_implied_vol."""
    w = np.where(k >= f, 1.0, -1.0)  # the out-of-the-money side: call if K >= F, else put
    sqrt_t = np.sqrt(t)
    log_target = np.log(target)
    status = np.full(f.shape, IVStatus.OK, dtype=np.int8)
    with np.errstate(all="ignore"):
        abs_moneyness = np.abs(np.log(f / k))
        guess = np.maximum(np.sqrt(2.0 * abs_moneyness / t),
                           np.sqrt(2.0 * np.pi / t) * target / np.sqrt(f * k))
        hi = np.full(f.shape, max_total_vol) / sqrt_t
        price_hi, _ = _otm_price_and_vega(w, f, k, sqrt_t, hi)
        status[~(price_hi > target)] = IVStatus.VOL_ABOVE_MAX
        lo = np.zeros(f.shape)
        sigma = np.clip(guess, 1e-8 / sqrt_t, 0.5 * hi)
    vol = np.full(f.shape, np.nan)
    active = np.flatnonzero(status == IVStatus.OK)
    iterations = 0
    while active.size and iterations < max_iter:
        iterations += 1
        a = active
        evaluated = sigma[a]
        with np.errstate(all="ignore"):
            b, vega = _otm_price_and_vega(w[a], f[a], k[a], sqrt_t[a], evaluated)
            too_low = ~(b > target[a])  # B underflowing to 0 counts as too low
            lo[a] = np.where(too_low, sigma[a], lo[a])
            hi[a] = np.where(too_low, hi[a], sigma[a])
            log_err = np.log(b) - log_target[a]
            done = (np.abs(log_err) <= rtol) | (hi[a] - lo[a] <= 1e-15 * hi[a])
            newton = evaluated - log_err * b / vega
            step_ok = np.isfinite(newton) & (newton > lo[a]) & (newton < hi[a])
            sigma[a] = np.where(step_ok, newton, 0.5 * (lo[a] + hi[a]))
        vol[a[done]] = evaluated[done]
        active = a[~done]
    status[active] = IVStatus.NOT_CONVERGED
    # A row may also stop on a collapsed bracket: accept it only if it reprices to 1e-10.
    ok = status == IVStatus.OK
    with np.errstate(all="ignore"):
        b, _ = _otm_price_and_vega(w[ok], f[ok], k[ok], sqrt_t[ok], vol[ok])
        close = np.abs(b / target[ok] - 1.0) <= 1e-10
    idx = np.flatnonzero(ok)
    status[idx[~close]] = IVStatus.NOT_CONVERGED
    vol[status != IVStatus.OK] = np.nan
    return vol, status, iterations


def bs_implied_vol(price: ArrayLike, is_call: ArrayLike, spot: ArrayLike, strike: ArrayLike,
                   t_years: ArrayLike, rate: ArrayLike = 0.0, dividend_yield: ArrayLike = 0.0,
                   *, max_iter: int = 100, rtol: float = 1e-13,
                   max_total_vol: float = MAX_TOTAL_VOL) -> ImpliedVol:
    """Black-Scholes implied volatility: :func:`black76_implied_vol` on the forward
    ``F = S e^((r-q)T)`` with discount ``e^(-rT)``; same statuses and guarantees."""
    s, q, r, t = _broadcast_float(spot, dividend_yield, rate, t_years)
    with np.errstate(all="ignore"):
        forward = np.where((s > 0) & np.isfinite(q), s * np.exp((r - q) * t), np.nan)
    return black76_implied_vol(price, is_call, forward, strike, t_years, rate,
                               max_iter=max_iter, rtol=rtol, max_total_vol=max_total_vol)
