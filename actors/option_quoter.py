"""An option quoter: two-sided quotes on a few near-the-money options, delta-hedged with the
perpetual, as a supervised, event-sourced actor (:class:`OptionQuoter`).

Every ``interval_s`` one :meth:`OptionQuoter.step` (the market maker's loop, journal and
routing: ``actors.strategy.RoutedStrategy``):

1. **Settle** intents journaled before a restart: routed again under their own client order
   ids, so the router answers with the original outcome and nothing is sent twice.
2. **Sample** the underlying's mid ``F`` (the perpetual's best bid/ask over the venues with a
   fresh mark) into an EWMA of squared log returns: ``spot_vol_bps`` per interval.
3. **Pick** (:func:`pick_options`) up to ``max_options`` of the options the connectors publish
   marks for (the connector's option selector resolved them through
   ``public/get_instruments``): nearest expiry first, then nearest ``F``; none that expires
   within ``min_expiry_s``.
4. **Value** (vectorized, ``actors.options``) the picked options and those held: the venue's
   implied vol from its mid, ``black76_implied_vol(mid, F, K, T, inverse=True)`` with ``T``
   from the expiry in the name and our clock; our own vol view is an EWMA of it
   (``iv_ewma_alpha``) tilted by ``vol_edge_frac``; fair value is the Black-76 coin price at
   that vol. Prices depend on ``vol**2 * T`` only, so implying and pricing on one ``T`` stays
   consistent with a venue whose options age on another clock (a replay).
5. **Classify** with the market maker's one ``(state, trigger) -> state`` table
   (``actors.strategy.TRANSITIONS``): the risk book's state first (REDUCING, HALTED or
   unreachable), then data (a fresh ``F``, warm-up, something to quote), then the worse of two
   volatility signals with the same hysteresis: ``spot_vol_bps`` against ``widen_vol_bps`` /
   ``pause_vol_bps``, and the largest jump of the venue's implied vol off our view, ``|iv -
   view| / view``, against ``widen_iv_jump`` / ``pause_iv_jump``. Changes are journaled.
6. **Quote** (:func:`decide_option_quotes`) each picked option: bid at the Black-76 price of
   ``vol * (1 - h)``, ask at ``vol * (1 + h)``, ``h = base_half_spread_frac * (1 +
   spot_vol_bps / widen_vol_bps)``, times ``widened_mult`` in WIDENED; at least
   ``min_edge_ticks`` from fair, on the tick grid, post-only and never through the venue's
   touch; ``quote_size`` a side, never taking ``|position|`` past ``max_position``. REDUCING
   quotes only the side that shrinks the position; PAUSED nothing, and live quotes are
   cancelled. A live quote stays while within ``requote_tolerance_bps`` of the new price.
7. **Hedge** (:func:`hedge_order`): the net delta in coin is the sum over option positions of
   size times Black-76 ``dV/dF`` (as the risk book counts it) plus our perpetual position
   (USD) over ``F``; beyond ``hedge_threshold_usd`` (``|delta| * F``), an IOC limit on the
   perpetual ``hedge_cross_bps`` through the touch takes it back to flat in whole contracts.
   Hedges go out in every state (they reduce risk) unless the risk book is HALTED or
   unreachable; positions include hedges the venue reported filled whose fills are still on
   their way, so one delta is never hedged twice.

Positions come from the fills the connectors publish (``on_fills``), attributed by label to
our own orders: the market maker may trade the same perpetual on the same account. The same
fills reach the risk book, which values the options with its own Greeks. Not journaled: marks,
the vol views and the spot vol; after a restart the quoter warms up again (PAUSED).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.options import black76_greeks, black76_implied_vol, black76_price
from actors.risk import SECONDS_PER_YEAR, Contract, parse_contract
from actors.strategy import (
    MakerBook,
    MMState,
    MMTrigger,
    Order,
    QuoteDecision,
    RoutedStrategy,
    Touch,
    VolEstimate,
    config_from,
    plan_orders,
    risk_trigger,
    vol_trigger,
)
from actors.venue.clock import Clock

_SEVERITY = {MMTrigger.CALM: 0, MMTrigger.VOLATILE: 1, MMTrigger.EXTREME: 2}


class QuoterConfigError(ValueError):
    """An option-quoter setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"QuoterConfig: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class QuoterConfig:
    """Option amounts are coins, option prices coin per coin (Deribit's inverse options),
    perpetual amounts USD; ``*_frac`` are fractions of the vol, ``*_bps`` basis points (spot
    vol per interval, requote tolerance of the option price), durations seconds."""

    underlying: str = "BTC-PERPETUAL"
    max_options: int = 4
    quote_size: float = 0.1
    amount_step: float = 0.1           # the venue's min_trade_amount for options
    tick_size: float = 0.0001
    max_position: float = 1.0          # |position| per option
    base_half_spread_frac: float = 0.02
    widened_mult: float = 2.0
    min_edge_ticks: int = 1
    vol_edge_frac: float = 0.0         # our view = the venue's implied vol * (1 + this)
    iv_ewma_alpha: float = 0.1
    widen_vol_bps: float = 15.0
    pause_vol_bps: float = 60.0
    widen_iv_jump: float = 0.05        # |venue iv - view| / view
    pause_iv_jump: float = 0.2
    recover_fraction: float = 0.8
    ewma_alpha: float = 0.2            # spot vol: weight of the newest squared return
    warmup_samples: int = 3
    requote_tolerance_bps: float = 50.0
    hedge_threshold_usd: float = 100.0
    hedge_step_usd: float = 10.0       # the perpetual's contract size
    hedge_tick_size: float = 0.5
    hedge_cross_bps: float = 10.0
    min_expiry_s: float = 3600.0
    stale_after_s: float = 5.0
    interval_s: float = 0.5
    call_timeout_s: float = 5.0
    route_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.underlying, str) or \
                not self.underlying.endswith("-PERPETUAL") or "_" in self.underlying:
            raise QuoterConfigError("underlying", self.underlying,
                                    "must be an inverse perpetual like 'BTC-PERPETUAL'")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "underlying":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or (value < 0 and f.name != "vol_edge_frac"):
                raise QuoterConfigError(f.name, value, "must be a finite number >= 0")
        for name in ("max_options", "quote_size", "amount_step", "tick_size", "max_position",
                     "widen_vol_bps", "pause_vol_bps", "widen_iv_jump", "pause_iv_jump",
                     "hedge_step_usd", "hedge_tick_size", "interval_s", "ewma_alpha",
                     "iv_ewma_alpha"):
            if getattr(self, name) <= 0:
                raise QuoterConfigError(name, getattr(self, name), "must be > 0")
        for name in ("max_options", "min_edge_ticks", "warmup_samples"):
            if not isinstance(getattr(self, name), int):
                raise QuoterConfigError(name, getattr(self, name), "must be an int")
        if abs(self.quote_size / self.amount_step - round(self.quote_size / self.amount_step)) \
                > 1e-9:
            raise QuoterConfigError("quote_size", self.quote_size,
                                    f"must be a multiple of amount_step={self.amount_step}")
        for low, high in (("widen_vol_bps", "pause_vol_bps"), ("widen_iv_jump", "pause_iv_jump")):
            if getattr(self, low) > getattr(self, high):
                raise QuoterConfigError(low, getattr(self, low),
                                        f"must be <= {high}={getattr(self, high)}")
        for name in ("recover_fraction", "ewma_alpha", "iv_ewma_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise QuoterConfigError(name, getattr(self, name), "must be in (0, 1]")
        if not -0.5 < self.vol_edge_frac <= 1.0:
            raise QuoterConfigError("vol_edge_frac", self.vol_edge_frac, "must be in (-0.5, 1]")
        if not 0 < self.base_half_spread_frac < 0.5:
            raise QuoterConfigError("base_half_spread_frac", self.base_half_spread_frac,
                                    "must be in (0, 0.5)")

    @property
    def currency(self) -> str:
        return self.underlying.split("-")[0]


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def pick_options(names: Sequence[str], forward: float, now_s: float,
                 cfg: QuoterConfig) -> list[str]:
    """Up to ``max_options`` options of our currency: nearest expiry first, then nearest the
    forward in log-moneyness; none expiring within ``min_expiry_s``; none without a forward."""
    if not (math.isfinite(forward) and forward > 0):
        return []
    ranked = []
    for name in names:
        c = parse_contract(name)
        if c is None or not c.is_option or c.base != cfg.currency or c.quote != c.base:
            continue
        if c.expiry_s - now_s < cfg.min_expiry_s:
            continue
        ranked.append((c.expiry_s, abs(math.log(c.strike / forward)), name))
    return [name for *_, name in sorted(ranked)[:cfg.max_options]]


def option_arrays(contracts: Sequence[Contract], now_s: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``is_call``, ``strike`` and ``t_years`` columns of some options."""
    return (np.array([c.is_call for c in contracts], dtype=bool),
            np.array([c.strike for c in contracts], dtype=np.float64),
            np.array([(c.expiry_s - now_s) / SECONDS_PER_YEAR for c in contracts],
                     dtype=np.float64))


def venue_implied_vols(is_call: np.ndarray, forward: float, strike: np.ndarray,
                       t_years: np.ndarray, mid_coin: np.ndarray) -> np.ndarray:
    """The vol at which Black-76 gives each venue mid (coin); NaN where none does."""
    return black76_implied_vol(mid_coin, is_call, forward, strike, t_years, inverse=True).vol


def quote_prices(is_call: np.ndarray, forward: float, strike: np.ndarray, t_years: np.ndarray,
                 vol: np.ndarray, half_frac: float) -> tuple[np.ndarray, ...]:
    """Fair, bid and ask coin prices: Black-76 at ``vol``, ``vol * (1 - half_frac)`` and
    ``vol * (1 + half_frac)``."""
    return tuple(black76_price(is_call, forward, strike, t_years, vol * m, inverse=True)
                 for m in (1.0, 1.0 - half_frac, 1.0 + half_frac))


def half_spread_frac(state: MMState, spot_vol_bps: float, cfg: QuoterConfig) -> float:
    """The half spread as a fraction of the vol: wider with spot vol, wider still WIDENED."""
    h = cfg.base_half_spread_frac * (1.0 + max(spot_vol_bps, 0.0) / cfg.widen_vol_bps)
    return min(h * (cfg.widened_mult if state is MMState.WIDENED else 1.0), 0.9)


def classify_options(state: MMState, spot_vol_bps: float, iv_jump: float, samples: int,
                     mark_age_s: float, n_priced: int, risk_state: str,
                     cfg: QuoterConfig) -> tuple[MMTrigger, str]:
    """The trigger the inputs fire (module docstring, step 5) and its reason."""
    risk = risk_trigger(risk_state)
    if risk is not None:
        return risk
    if not mark_age_s <= cfg.stale_after_s:
        return MMTrigger.NO_DATA, f"no underlying mark for {mark_age_s:.1f} s"
    if samples < cfg.warmup_samples:
        return MMTrigger.NO_DATA, f"warming up: {samples} of {cfg.warmup_samples} returns"
    if n_priced == 0:
        return MMTrigger.NO_DATA, "no option with a fresh mark and a vol to quote"
    spot = vol_trigger(state, spot_vol_bps, cfg.widen_vol_bps, cfg.pause_vol_bps,
                       cfg.recover_fraction, "spot vol bps")
    jump = vol_trigger(state, iv_jump * 100.0, cfg.widen_iv_jump * 100.0,
                       cfg.pause_iv_jump * 100.0, cfg.recover_fraction, "implied vol jump %")
    return max((spot, jump), key=lambda t: _SEVERITY[t[0]])


def _floor_to(x: float, step: float) -> float:
    return round(math.floor(x / step + 1e-9) * step, 10)


def _ceil_to(x: float, step: float) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 10)


def decide_option_quotes(state: MMState, names: Sequence[str], fair: np.ndarray,
                         bid: np.ndarray, ask: np.ndarray, venue_bid: np.ndarray,
                         venue_ask: np.ndarray, positions: Mapping[str, float],
                         cfg: QuoterConfig) -> QuoteDecision:
    """The quotes wanted now, one bid and one ask per option at most (step 6)."""
    if state is MMState.PAUSED:
        return QuoteDecision((), "paused")
    tick, step, edge = cfg.tick_size, cfg.amount_step, cfg.min_edge_ticks * cfg.tick_size
    orders: list[Order] = []
    skipped = 0
    for i, name in enumerate(names):
        if not (math.isfinite(fair[i]) and math.isfinite(bid[i]) and math.isfinite(ask[i])):
            skipped += 1
            continue
        buy_px = _floor_to(min(bid[i], fair[i] - edge), tick)
        sell_px = _ceil_to(max(ask[i], fair[i] + edge), tick)
        if math.isfinite(venue_ask[i]):
            buy_px = min(buy_px, _floor_to(venue_ask[i] - tick, tick))
        if math.isfinite(venue_bid[i]):
            sell_px = max(sell_px, _ceil_to(venue_bid[i] + tick, tick))
        pos = positions.get(name, 0.0)
        if state is MMState.REDUCING:
            buy = min(cfg.quote_size, -pos) if pos < 0 else 0.0
            sell = min(cfg.quote_size, pos) if pos > 0 else 0.0
        else:
            buy = min(cfg.quote_size, cfg.max_position - pos)
            sell = min(cfg.quote_size, cfg.max_position + pos)
        buy, sell = _floor_to(max(buy, 0.0), step), _floor_to(max(sell, 0.0), step)
        if buy >= step and buy_px >= tick:
            orders.append(Order("quote", "buy", buy, buy_px, name))
        if sell >= step:
            orders.append(Order("quote", "sell", sell, sell_px, name))
    reason = f"{state.value}: {len(orders)} quotes on {len(names) - skipped} options" + (
        f", {skipped} without a price" if skipped else "")
    return QuoteDecision(tuple(orders), reason)


def hedge_order(delta_coin: float, forward: float, bid: float, ask: float,
                cfg: QuoterConfig) -> Order | None:
    """The perpetual IOC that takes ``delta_coin`` back to flat, or None within the
    threshold (or without a usable touch)."""
    delta_usd = delta_coin * forward
    if not (math.isfinite(delta_usd) and abs(delta_usd) > cfg.hedge_threshold_usd):
        return None
    if not (math.isfinite(bid) and math.isfinite(ask) and 0 < bid <= ask):
        return None
    amount = _floor_to(abs(delta_usd), cfg.hedge_step_usd)
    if amount < cfg.hedge_step_usd:
        return None
    cross = cfg.hedge_cross_bps / 1e4
    if delta_usd > 0:
        return Order("hedge", "sell", amount, _floor_to(bid * (1 - cross), cfg.hedge_tick_size),
                     cfg.underlying)
    return Order("hedge", "buy", amount, _ceil_to(ask * (1 + cross), cfg.hedge_tick_size),
                 cfg.underlying)


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class OptionQuoter(RoutedStrategy):
    """An option quoter. Keywords: ``router`` and ``risk_book`` (actor paths), ``underlying``
    (the hedge perpetual; its currency's options are quoted), ``max_options``,
    ``quote_size``, ``interval_s``, ``config`` (any other :class:`QuoterConfig` field),
    ``strategy_id`` (prefix of its client order ids; default: its tree path), ``clock``,
    ``calls`` (an ``ActorCalls`` stand-in, for tests)."""

    def __init__(self, router: str, risk_book: str, underlying: str = "BTC-PERPETUAL",
                 max_options: int = 4, quote_size: float = 0.1, interval_s: float = 0.5,
                 config: Mapping[str, Any] | None = None, strategy_id: str | None = None,
                 clock: Clock | None = None, calls: Any = None) -> None:
        self.cfg = config_from(QuoterConfig, QuoterConfigError, config, underlying=underlying,
                               max_options=max_options, quote_size=quote_size,
                               interval_s=interval_s)
        self._setup(router, risk_book, MakerBook(self.cfg.underlying),
                    interval_s=self.cfg.interval_s, call_timeout_s=self.cfg.call_timeout_s,
                    route_timeout_s=self.cfg.route_timeout_s, strategy_id=strategy_id,
                    default_id="oq", clock=clock, calls=calls)
        self.spot = VolEstimate(self.cfg.ewma_alpha)
        self.touch = Touch()
        self.views: dict[str, float] = {}   # option -> our vol view (EWMA of the venue's)
        self.last: dict[str, Any] = {}
        self._contracts: dict[str, Contract | None] = {}

    def _contract(self, name: str) -> Contract | None:
        if name not in self._contracts:
            self._contracts[name] = parse_contract(name)
        return self._contracts[name]

    def _trades(self, name: str) -> bool:
        if name == self.cfg.underlying:
            return True
        c = self._contract(name)
        return c is not None and c.is_option and c.base == self.cfg.currency and \
            c.quote == c.base

    def on_marks(self, batch: Mapping[str, Any]) -> None:
        """Keep the latest best bid/ask of the underlying and our options (conflated)."""
        if not self.touch.update(batch, self._trades, self._clock.now_s()):
            self.counters["marks_malformed"] += 1

    async def _step(self, now: float) -> dict[str, Any]:
        cfg, book = self.cfg, self.book
        await self._settle_intents()
        f_bid, f_ask, age = self.touch.best(cfg.underlying, now, cfg.stale_after_s)
        forward = (f_bid + f_ask) / 2 if age <= cfg.stale_after_s else math.nan
        if math.isfinite(forward):
            self.spot = self.spot.update(forward)
        fresh = [n for n in self.touch.quotes if n != cfg.underlying
                 and math.isfinite(self.touch.best(n, now, cfg.stale_after_s)[1])]
        picked = pick_options(fresh, forward, now, cfg)
        held = [n for n, q in book.positions.items() if q != 0.0 and n != cfg.underlying]
        names = list(dict.fromkeys(picked + held))
        vals = self._value(names, forward, now)
        risk_state = await self._risk_state()
        priced = [i for i, n in enumerate(names) if n in picked and math.isfinite(vals["vol"][i])]
        trigger, reason = classify_options(book.machine.state, self.spot.vol_bps,
                                           vals["iv_jump"], self.spot.samples, age, len(priced),
                                           risk_state, cfg)
        self._move(trigger, reason, now)
        state = book.machine.state
        h = half_spread_frac(state, self.spot.vol_bps, cfg)
        fair, bid, ask = quote_prices(vals["is_call"], forward, vals["strike"], vals["t"],
                                      vals["vol"], h)
        quoted = [n for i, n in enumerate(names) if i in priced]
        idx = [names.index(n) for n in quoted]
        decision = decide_option_quotes(state, quoted, fair[idx], bid[idx], ask[idx],
                                        vals["venue_bid"][idx], vals["venue_ask"][idx],
                                        book.positions, cfg)
        cancels: list[str] = [c for c, lo in book.live.items()
                              if lo.get("instrument") not in quoted]
        places: list[Order] = []
        for name in quoted:
            wanted = QuoteDecision(tuple(o for o in decision.orders if o.instrument == name),
                                   decision.reason)
            c, p = plan_orders(wanted, {k: v for k, v in book.live.items()
                                        if v.get("instrument") == name}, cfg)
            cancels += c
            places += p
        delta = self._delta_coin(names, vals, forward)
        hedge = None
        if risk_trigger(risk_state) is None or risk_state == "REDUCING":
            hedge = hedge_order(delta, forward, f_bid, f_ask, cfg)
        if hedge is not None:
            places.insert(0, hedge)
        self.last = {"forward": forward, "picked": picked, "half_spread_frac": h,
                     "delta_coin": delta, "delta_usd": delta * forward,
                     "iv_jump": vals["iv_jump"], "decision": decision.reason,
                     "fair": {n: float(fair[i]) for i, n in enumerate(names)},
                     "hedge": None if hedge is None else dataclasses.asdict(hedge)}
        for coid in cancels:
            await self._cancel(coid, cfg.call_timeout_s)
        sent: list[dict[str, Any]] = []
        if book.intents:  # the router did not answer: no new orders until it does
            self.counters["steps_waiting_for_router"] += 1
            places = []
        for order in places:
            sent.append(await self._place(order.to_router(), order.kind))
        return {"state": state.value, "trigger": trigger.value, "reason": reason,
                "spot_vol_bps": self.spot.vol_bps, "decision": decision.reason,
                "cancelled": cancels, "sent": sent, "delta_usd": delta * forward}

    def _value(self, names: list[str], forward: float, now: float) -> dict[str, Any]:
        """Venue touch, the venue's implied vol, our updated view and the vol we price at
        for each option in ``names``; ``iv_jump``: the largest ``|iv - view| / view`` of the
        previous views."""
        contracts = [self._contract(n) for n in names]
        is_call, strike, t = option_arrays(contracts, now)  # type: ignore[arg-type]
        touch = [self.touch.best(n, now, self.cfg.stale_after_s)[:2] for n in names]
        venue_bid = np.array([b for b, _ in touch], dtype=np.float64)
        venue_ask = np.array([a for _, a in touch], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            mid = np.where(venue_bid > 0, (venue_bid + venue_ask) / 2, np.nan)
        iv = venue_implied_vols(is_call, forward, strike, t, mid) if names else np.zeros(0)
        prev = np.array([self.views.get(n, math.nan) for n in names], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            jumps = np.abs(iv - prev) / prev
        jumps = jumps[np.isfinite(jumps)]
        a = self.cfg.iv_ewma_alpha
        view = np.where(np.isfinite(prev), np.where(np.isfinite(iv), (1 - a) * prev + a * iv,
                                                    prev), iv)
        for n, v in zip(names, view, strict=True):
            if math.isfinite(v):
                self.views[n] = float(v)
        return {"is_call": is_call, "strike": strike, "t": t, "venue_bid": venue_bid,
                "venue_ask": venue_ask, "venue_iv": iv,
                "vol": view * (1.0 + self.cfg.vol_edge_frac),
                "iv_jump": float(jumps.max()) if jumps.size else 0.0}

    def _delta_coin(self, names: list[str], vals: Mapping[str, Any], forward: float) -> float:
        """Our net delta in coin: options by Black-76 ``dV/dF`` at our vol, plus the
        perpetual's USD position over the forward (positions include reported hedges)."""
        if not math.isfinite(forward):
            return math.nan
        greeks = black76_greeks(vals["is_call"], forward, vals["strike"], vals["t"],
                                vals["vol"])
        sizes = np.array([self.book.expected_position(n) for n in names], dtype=np.float64)
        unpriced = (sizes != 0) & ~np.isfinite(greeks.delta)
        if unpriced.any():
            self.counters["delta_unpriced_options"] += int(unpriced.sum())
        options = float(np.nansum(sizes * greeks.delta))
        return options + self.book.expected_position(self.cfg.underlying) / forward

    # ---- queries -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {**self._common_status(), "underlying": self.cfg.underlying,
                "spot_vol_bps": self.spot.vol_bps, "spot_samples": self.spot.samples,
                "views": dict(self.views), **self.last}

    def __repr__(self) -> str:
        book = getattr(self, "book", None)
        if book is None:
            return "OptionQuoter(?)"
        return (f"OptionQuoter({self.cfg.currency} options {book.machine.state.value} "
                f"positions={len(self.positions())} live={len(book.live)})")

