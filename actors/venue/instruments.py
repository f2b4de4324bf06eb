"""Instrument definitions for the Deribit-like venue: perpetuals, spot pairs and a BTC option chain.

Everything here is frozen data checked at construction: a bad value raises ``InstrumentError``
naming the field and the value. Names follow Deribit: ``BTC-PERPETUAL``, ``BTC_USDC``,
``BTC-27DEC26-60000-C`` (day without a leading zero, 08:00 UTC expiry).

Units (as on Deribit): ``amount`` is USD for inverse ("reversed") perpetuals and base coin for
spot and options; perpetual and spot prices are in the quote currency (USD/USDC), option prices
in the base coin (inverse options). The matching engine works on integer ticks and lots; the
``*_ticks`` / ``*_lots`` helpers here are the only conversions.

Option quotes come from ``VolSurface``: a parametric smile quadratic in standardised
log-moneyness ``z = ln(K/F) / sqrt(T)`` with an exponential ATM term structure, priced with
Black-76 (zero rates) and divided by the forward to quote in coin.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import numpy as np

Kind = Literal["future", "spot", "option"]
InstrumentType = Literal["reversed", "linear"]
OptionType = Literal["call", "put"]

PERPETUAL_EXPIRATION_S = 32_503_708_800.0  # 3000-01-01, what Deribit reports for perpetuals
SECONDS_PER_YEAR = 365.0 * 86_400.0
_EPS = 1e-9
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_NAME_RES: dict[str, re.Pattern[str]] = {
    "future": re.compile(r"^[A-Z]{2,10}-PERPETUAL$"),
    "spot": re.compile(r"^[A-Z]{2,10}_[A-Z]{2,10}$"),
    "option": re.compile(r"^[A-Z]{2,10}-\d{1,2}[A-Z]{3}\d{2}-\d+-[CP]$"),
}


class InstrumentError(ValueError):
    """An instrument or surface definition is invalid; names the field and the value."""

    def __init__(self, where: str, field_name: str, value: object, why: str) -> None:
        self.where = where
        self.field = field_name
        self.value = value
        super().__init__(f"{where}: invalid {field_name}={value!r}: {why}")


def _decimals(step: float) -> int:
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def _is_positive_finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Instrument:
    """One tradable instrument. Field names are Deribit's where Deribit has one.

    ``tick_size``: price increment. ``min_trade_amount``: smallest amount and the amount step
    (on Deribit futures it equals ``contract_size``). ``funding_rate_per_interval``: fraction of
    position value paid by longs to shorts every ``funding_interval_s`` (perpetuals only).
    """

    instrument_name: str
    kind: Kind
    base_currency: str
    quote_currency: str
    settlement_currency: str
    tick_size: float
    contract_size: float
    min_trade_amount: float
    instrument_type: InstrumentType = "linear"
    settlement_period: str = "perpetual"
    expiration_timestamp_s: float = PERPETUAL_EXPIRATION_S
    option_type: OptionType | None = None
    strike: float | None = None
    funding_rate_per_interval: float = 0.0
    funding_interval_s: float = 0.0
    maker_commission: float = 0.0
    taker_commission: float = 0.0
    creation_timestamp_s: float = 0.0

    def __post_init__(self) -> None:
        where = f"instrument {self.instrument_name!r}"
        if self.kind not in _NAME_RES:
            raise InstrumentError(where, "kind", self.kind, "must be future, spot or option")
        if not isinstance(self.instrument_name, str) or not _NAME_RES[self.kind].match(
                self.instrument_name):
            raise InstrumentError(where, "instrument_name", self.instrument_name,
                                  f"does not match the Deribit {self.kind} naming scheme")
        for name in ("tick_size", "contract_size", "min_trade_amount"):
            if not _is_positive_finite(getattr(self, name)):
                raise InstrumentError(where, name, getattr(self, name), "must be finite and > 0")
        if self.instrument_type not in ("reversed", "linear"):
            raise InstrumentError(where, "instrument_type", self.instrument_type,
                                  "must be reversed or linear")
        for name in ("maker_commission", "taker_commission"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > 0.01:
                raise InstrumentError(where, name, value, "must be finite with |rate| <= 0.01")
        if not self.instrument_name.startswith(self.base_currency):
            raise InstrumentError(where, "base_currency", self.base_currency,
                                  "must prefix instrument_name")
        if self.kind == "future":
            if not _is_positive_finite(self.funding_interval_s):
                raise InstrumentError(where, "funding_interval_s", self.funding_interval_s,
                                      "a perpetual needs a funding interval > 0 s")
            rate = self.funding_rate_per_interval
            if not isinstance(rate, int | float) or not math.isfinite(rate) or abs(rate) > 0.05:
                raise InstrumentError(where, "funding_rate_per_interval", rate,
                                      "must be a finite fraction with |rate| <= 0.05")
        if self.kind == "option":
            self._check_option(where)

    def _check_option(self, where: str) -> None:
        if self.option_type not in ("call", "put"):
            raise InstrumentError(where, "option_type", self.option_type, "must be call or put")
        if not _is_positive_finite(self.strike):
            raise InstrumentError(where, "strike", self.strike, "must be finite and > 0")
        if not _is_positive_finite(self.expiration_timestamp_s):
            raise InstrumentError(where, "expiration_timestamp_s", self.expiration_timestamp_s,
                                  "must be finite and > 0")
        expected = option_name(self.base_currency, self.expiration_timestamp_s,
                               float(self.strike or 0.0), self.option_type or "call")
        if expected != self.instrument_name:
            raise InstrumentError(where, "instrument_name", self.instrument_name,
                                  f"does not match strike/expiry/type (expected {expected!r})")

    # --- conversions between wire floats and the engine's integers -------------------------
    @property
    def is_inverse(self) -> bool:
        return self.instrument_type == "reversed"

    @property
    def has_inverse_pnl(self) -> bool:
        """USD-sized, coin-settled (inverse perpetuals): P&L is ``size * (1/entry - 1/exit)``."""
        return self.is_inverse and self.kind == "future"

    @property
    def currency(self) -> str:
        return self.base_currency

    @functools.cached_property
    def price_decimals(self) -> int:
        return _decimals(self.tick_size)

    @functools.cached_property
    def amount_decimals(self) -> int:
        return _decimals(self.min_trade_amount)

    def price_to_ticks(self, price: float) -> int | None:
        """Exact tick count of ``price``, or ``None`` when it is not a multiple of tick_size."""
        n = round(price / self.tick_size)
        if abs(n * self.tick_size - price) > _EPS * max(1.0, abs(price)):
            return None
        return int(n)

    def amount_to_lots(self, amount: float) -> int | None:
        """Exact lot count of ``amount``, or ``None`` when not a multiple of min_trade_amount."""
        n = round(amount / self.min_trade_amount)
        if abs(n * self.min_trade_amount - amount) > _EPS * max(1.0, abs(amount)):
            return None
        return int(n)

    def floor_ticks(self, price: float) -> int:
        return int(math.floor(price / self.tick_size + _EPS))

    def ceil_ticks(self, price: float) -> int:
        return int(math.ceil(price / self.tick_size - _EPS))

    def ticks_to_price(self, ticks: int) -> float:
        return round(ticks * self.tick_size, self.price_decimals)

    def lots_to_amount(self, lots: int) -> float:
        return round(lots * self.min_trade_amount, self.amount_decimals)

    def lots_for_notional_usd(self, notional_usd: float, price_usd: float) -> int:
        """Whole lots worth about ``notional_usd`` at ``price_usd`` (for synthetic depth)."""
        amount = notional_usd if self.has_inverse_pnl else notional_usd / price_usd
        return max(1, int(math.floor(amount / self.min_trade_amount + _EPS)))

    def to_deribit(self) -> dict[str, object]:
        """The ``public/get_instruments`` record for this instrument."""
        out: dict[str, object] = {
            "instrument_name": self.instrument_name, "kind": self.kind,
            "base_currency": self.base_currency, "quote_currency": self.quote_currency,
            "counter_currency": self.quote_currency,
            "settlement_currency": self.settlement_currency, "tick_size": self.tick_size,
            "contract_size": self.contract_size, "min_trade_amount": self.min_trade_amount,
            "instrument_type": self.instrument_type, "settlement_period": self.settlement_period,
            "expiration_timestamp": int(round(self.expiration_timestamp_s * 1000)),
            "creation_timestamp": int(round(self.creation_timestamp_s * 1000)),
            "maker_commission": self.maker_commission, "taker_commission": self.taker_commission,
            "price_index": f"{self.base_currency.lower()}_usd", "is_active": True,
        }
        if self.kind == "option":
            out["option_type"] = self.option_type
            out["strike"] = self.strike
        return out


# --- constructors for the Deribit-like listings ----------------------------------------------
def perpetual(currency: str, *, tick_size: float, contract_size: float,
              funding_rate_per_interval: float = 0.0001,
              funding_interval_s: float = 8 * 3600.0) -> Instrument:
    """An inverse perpetual (amount in USD, settled in the coin), e.g. ``BTC-PERPETUAL``."""
    return Instrument(
        instrument_name=f"{currency}-PERPETUAL", kind="future", base_currency=currency,
        quote_currency="USD", settlement_currency=currency, tick_size=tick_size,
        contract_size=contract_size, min_trade_amount=contract_size,
        instrument_type="reversed", funding_rate_per_interval=funding_rate_per_interval,
        funding_interval_s=funding_interval_s, maker_commission=0.0, taker_commission=0.0005)


def spot(currency: str, quote: str = "USDC", *, tick_size: float,
         min_trade_amount: float) -> Instrument:
    """A spot pair, e.g. ``BTC_USDC`` (amount in the base coin, price in the quote)."""
    return Instrument(
        instrument_name=f"{currency}_{quote}", kind="spot", base_currency=currency,
        quote_currency=quote, settlement_currency=quote, tick_size=tick_size,
        contract_size=min_trade_amount, min_trade_amount=min_trade_amount,
        instrument_type="linear", settlement_period="perpetual",
        maker_commission=0.0, taker_commission=0.0)


def option_name(currency: str, expiration_s: float, strike: float, option_type: str) -> str:
    """Deribit option name: ``BTC-27DEC26-60000-C`` (day not zero-padded)."""
    d = dt.datetime.fromtimestamp(expiration_s, tz=dt.UTC)
    strike_txt = f"{strike:.0f}" if float(strike).is_integer() else f"{strike:g}"
    return (f"{currency}-{d.day}{_MONTHS[d.month - 1]}{d.year % 100:02d}-{strike_txt}-"
            f"{'C' if option_type == 'call' else 'P'}")


def option(currency: str, expiration_s: float, strike: float, option_type: OptionType,
           *, settlement_period: str = "week") -> Instrument:
    """An inverse European option on ``currency`` (price in coin, 1 coin per contract)."""
    return Instrument(
        instrument_name=option_name(currency, expiration_s, strike, option_type),
        kind="option", base_currency=currency, quote_currency=currency,
        settlement_currency=currency, tick_size=0.0001, contract_size=1.0,
        min_trade_amount=0.1, instrument_type="reversed", settlement_period=settlement_period,
        expiration_timestamp_s=expiration_s, option_type=option_type, strike=float(strike),
        maker_commission=0.0003, taker_commission=0.0003)


def option_expiries(now_s: float, n_weekly: int = 2, n_monthly: int = 3,
                    n_quarterly: int = 2) -> tuple[tuple[float, str], ...]:
    """Deribit-style expiries after ``now_s`` (Fridays 08:00 UTC), as ``(ts_s, period)``.

    Weeklies are the next ``n_weekly`` Fridays; monthlies the last Friday of the following
    months; quarterlies the last Friday of the next Mar/Jun/Sep/Dec. Duplicates are merged
    (the longer period wins)."""
    now = dt.datetime.fromtimestamp(now_s, tz=dt.UTC)
    out: dict[float, str] = {}
    friday = (now + dt.timedelta(days=(4 - now.weekday()) % 7)).replace(
        hour=8, minute=0, second=0, microsecond=0)
    if friday <= now:
        friday += dt.timedelta(days=7)
    for i in range(n_weekly):
        out[(friday + dt.timedelta(days=7 * i)).timestamp()] = "week"

    def last_friday(year: int, month: int) -> dt.datetime:
        day = calendar.monthrange(year, month)[1]
        d = dt.datetime(year, month, day, 8, tzinfo=dt.UTC)
        return d - dt.timedelta(days=(d.weekday() - 4) % 7)

    year, month, found = now.year, now.month, 0
    while found < n_monthly:
        d = last_friday(year, month)
        if d > now:
            out[d.timestamp()] = "month"
            found += 1
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    year, month, found = now.year, now.month, 0
    while found < n_quarterly:
        if month in (3, 6, 9, 12):
            d = last_friday(year, month)
            if d > now:
                out[d.timestamp()] = "quarter"
                found += 1
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return tuple(sorted(out.items()))


# --- implied-volatility surface and Black-76 ------------------------------------------------
@dataclass(frozen=True)
class VolSurface:
    """Implied vol ``iv(K, F, T) = atm(T) + skew * z + curvature * z**2`` clipped to
    ``[min_vol, max_vol]``, with ``z = ln(K/F) / sqrt(max(T, min_t_years))`` and
    ``atm(T) = atm_vol_long + (atm_vol_short - atm_vol_long) * exp(-T / term_decay_years)``.
    Vols are decimals (0.6 = 60 %); T in years."""

    atm_vol_short: float = 0.65
    atm_vol_long: float = 0.55
    term_decay_years: float = 0.25
    skew: float = -0.04
    curvature: float = 0.05
    min_vol: float = 0.05
    max_vol: float = 5.0
    min_t_years: float = 1.0 / 365.0

    def __post_init__(self) -> None:
        for name in ("atm_vol_short", "atm_vol_long", "term_decay_years", "min_vol",
                     "max_vol", "min_t_years"):
            if not _is_positive_finite(getattr(self, name)):
                raise InstrumentError("VolSurface", name, getattr(self, name),
                                      "must be finite and > 0")
        for name in ("skew", "curvature"):
            if not math.isfinite(getattr(self, name)):
                raise InstrumentError("VolSurface", name, getattr(self, name), "must be finite")
        if self.curvature < 0:
            raise InstrumentError("VolSurface", "curvature", self.curvature,
                                  "must be >= 0 (a smile, not a frown)")
        if self.min_vol >= self.max_vol:
            raise InstrumentError("VolSurface", "min_vol", self.min_vol, "must be < max_vol")

    def atm_vol(self, t_years: float | np.ndarray) -> float | np.ndarray:
        return self.atm_vol_long + (self.atm_vol_short - self.atm_vol_long) * np.exp(
            -np.asarray(t_years, dtype=float) / self.term_decay_years)

    def implied_vol(self, strike: float | np.ndarray, forward: float | np.ndarray,
                    t_years: float | np.ndarray) -> np.ndarray:
        """Vectorised implied vol for strikes/forwards/maturities (broadcast)."""
        t = np.maximum(np.asarray(t_years, dtype=float), self.min_t_years)
        z = np.log(np.asarray(strike, dtype=float) / np.asarray(forward, dtype=float)) / np.sqrt(t)
        iv = self.atm_vol(t) + self.skew * z + self.curvature * z * z
        return np.clip(iv, self.min_vol, self.max_vol)


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black76_usd(forward: float, strike: float, t_years: float, vol: float,
                option_type: OptionType) -> float:
    """Undiscounted Black-76 price in USD; at ``t_years <= 0`` the intrinsic value."""
    if t_years <= 0 or vol <= 0:
        return max(0.0, forward - strike) if option_type == "call" else max(0.0, strike - forward)
    s = vol * math.sqrt(t_years)
    d1 = (math.log(forward / strike) + 0.5 * s * s) / s
    d2 = d1 - s
    if option_type == "call":
        return forward * _norm_cdf(d1) - strike * _norm_cdf(d2)
    return strike * _norm_cdf(-d2) - forward * _norm_cdf(-d1)


@dataclass(frozen=True)
class OptionQuote:
    """Quoted prices in coin and the surface vol behind them. ``bid_price`` 0 means no bid."""

    bid_price: float
    ask_price: float
    mark_price: float
    mark_iv: float


def quote_option(inst: Instrument, forward: float, now_s: float, surface: VolSurface,
                 *, spread_vol: float = 0.02, vol_multiplier: float = 1.0) -> OptionQuote | None:
    """Bid/ask in coin from the surface: bid priced at ``iv - spread_vol``, ask at
    ``iv + spread_vol``, rounded outward to the tick. ``None`` once the option expired."""
    t = (inst.expiration_timestamp_s - now_s) / SECONDS_PER_YEAR
    if t <= 0 or inst.strike is None or inst.option_type is None:
        return None
    iv = float(surface.implied_vol(inst.strike, forward, t)) * vol_multiplier
    mark = black76_usd(forward, inst.strike, t, iv, inst.option_type) / forward
    bid = black76_usd(forward, inst.strike, t, max(iv - spread_vol, 0.01), inst.option_type)
    ask = black76_usd(forward, inst.strike, t, iv + spread_vol, inst.option_type)
    bid_ticks = inst.floor_ticks(bid / forward)
    ask_ticks = max(inst.ceil_ticks(ask / forward), bid_ticks + 1, 1)
    return OptionQuote(inst.ticks_to_price(max(bid_ticks, 0)), inst.ticks_to_price(ask_ticks),
                       round(mark, 8), round(iv, 6))


def _nice_step(x: float) -> float:
    """Round a strike spacing to 1, 2, 2.5 or 5 times a power of ten."""
    power = 10.0 ** math.floor(math.log10(x))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if x <= m * power * 1.0001:
            return m * power
    return 10.0 * power


def build_option_chain(currency: str, atm_price: float, now_s: float, *,
                       n_strikes_each_side: int = 4, strike_step_frac: float = 0.025,
                       n_weekly: int = 2, n_monthly: int = 3,
                       n_quarterly: int = 2) -> tuple[Instrument, ...]:
    """Calls and puts for every expiry from ``option_expiries`` on a strike grid around
    ``atm_price``; the spacing widens with sqrt(T/30 days) as on Deribit's longer tenors."""
    if not _is_positive_finite(atm_price):
        raise InstrumentError("option chain", "atm_price", atm_price, "must be finite and > 0")
    if n_strikes_each_side < 0:
        raise InstrumentError("option chain", "n_strikes_each_side", n_strikes_each_side,
                              "must be >= 0")
    out: list[Instrument] = []
    for expiry_s, period in option_expiries(now_s, n_weekly, n_monthly, n_quarterly):
        t_days = (expiry_s - now_s) / 86_400.0
        step = _nice_step(atm_price * strike_step_frac * max(1.0, math.sqrt(t_days / 30.0)))
        centre = round(atm_price / step) * step
        for i in range(-n_strikes_each_side, n_strikes_each_side + 1):
            strike = centre + i * step
            if strike <= 0:
                continue
            for kind in ("call", "put"):
                out.append(option(currency, expiry_s, strike, kind, settlement_period=period))
    return tuple(out)


def default_instruments(now_s: float, btc_price: float = 40_000.0,
                        with_options: bool = True) -> tuple[Instrument, ...]:
    """The simulator's listing: BTC/ETH inverse perpetuals (8 h funding), BTC_USDC and ETH_USDC
    spot, and (optionally) a BTC option chain around ``btc_price``. Contract specs follow
    Deribit's published ones (BTC-PERPETUAL: tick 0.5 USD, 10 USD contracts; ETH-PERPETUAL:
    tick 0.05, 1 USD); spot ticks are simulator choices."""
    listing = [
        perpetual("BTC", tick_size=0.5, contract_size=10.0),
        perpetual("ETH", tick_size=0.05, contract_size=1.0),
        spot("BTC", tick_size=1.0, min_trade_amount=0.0001),
        spot("ETH", tick_size=0.1, min_trade_amount=0.001),
    ]
    if with_options:
        listing.extend(build_option_chain("BTC", btc_price, now_s))
    return tuple(listing)
