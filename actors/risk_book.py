"""``RiskBook``: one book's positions, P&L, Greeks, VaR, limits and trading state as an
event-sourced actor (a plain class; the supervisor makes it a Ray actor).

    ChildSpec(id="btc", cls="actors.risk_book:RiskBook",
              kwargs={"book_id": "btc", "instruments": ["BTC-PERPETUAL", "BTC_USDC"],
                      "limits": {"max_abs_delta_usd": 2e6}, "snapshot_every": 500})

Who calls what:

* the venue connector: ``on_fills(fills)`` with Deribit trade dicts, ``on_marks(batch)`` once
  per batch (columns ``instrument``, ``mark_price``, ``index_price``, ``iv`` as numpy arrays),
  ``on_funding(instrument, rate, ts_s)`` once per funding interval;
* the router / strategy: ``check_order(order)`` before sending; it returns
  ``OrderAccepted`` or ``OrderDenied`` (data, never an exception);
* operators: ``set_limits(new, who, why)``, ``halt(who, why)``, ``resume(who, why)``.

Journaled events (``emit``): ``fill``, ``rejects`` (counts of refused and duplicate input),
``funding``, ``peak`` (the P&L peak behind the drawdown, when it rises by 1 % of
``max_loss_usd``), ``limits`` and ``state``. Marks are not journaled: unrealised P&L, Greeks
and VaR are recomputed from the next mark batch after a restart (until then positions are
valued at their last fill price and ``summary()["status"]`` says ``no_marks``). The order-rate
window is live too: it starts empty after a restart.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from actors.limits import (
    Limits,
    LimitsError,
    OrderAccepted,
    OrderDenied,
    OrderRateWindow,
    PreTradeState,
    TradingStateMachine,
    Trigger,
    check,
    evaluate,
)
from actors.metrics import RiskBookMetrics
from actors.risk import RiskConfig, RiskState, parse_contract
from actors.venue.clock import Clock, WallClock
from supervisors import EventSourced

PEAK_STEP_FRACTION = 0.01
"""A new P&L peak is journaled once it exceeds the last journaled one by this fraction of
``max_loss_usd`` (so after a restart the drawdown is understated by less than 1 % of it)."""


def jsonable(value: Any) -> Any:
    """Plain dicts, lists, str, int, float and None; NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MarketDataLag:
    """How late market data reaches the risk numbers. Per batch that carries venue event times
    (the connector's conflated L1 batches: ``first_event_ts`` / ``last_event_ts`` per
    instrument, ``events`` merged), the lag of its OLDEST event (the worst any event waited)
    and of its newest, after the batch has been applied; the last ``keep`` of each."""

    def __init__(self, keep: int = 20_000) -> None:
        self.batches = 0
        self.events = 0
        self.oldest_lag_s: deque[float] = deque(maxlen=keep)
        self.newest_lag_s: deque[float] = deque(maxlen=keep)

    def record(self, batch: object, now_s: float) -> None:
        self.batches += 1
        if not isinstance(batch, Mapping) or "first_event_ts" not in batch:
            return
        try:
            first = np.asarray(batch["first_event_ts"], dtype=np.float64)
            last = np.asarray(batch["last_event_ts"], dtype=np.float64)
            self.events += int(np.asarray(batch.get("events", [len(first)])).sum())
        except (TypeError, ValueError):
            return
        if first.size and np.isfinite(first).all() and np.isfinite(last).all():
            self.oldest_lag_s.append(now_s - float(first.min()))
            self.newest_lag_s.append(now_s - float(last.max()))

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "events": self.events,
                "oldest_lag_s": list(self.oldest_lag_s),
                "newest_lag_s": list(self.newest_lag_s)}


def with_option_underlyings(batch: object, index: Mapping[str, float]) -> object:
    """The batch with an underlying for each option row. A connector that sees only books
    sends an option's own mid (in coin) as its ``index_price``: valued on that, the option's
    Greeks are nonsense and the row would move its coin's index. So unless the batch has an
    ``underlying_price`` column, an option row gets the mark of a perpetual of its coin in the
    same batch, else ``index[coin]`` (the last index the book has), else NaN (the row is then
    refused), as both ``index_price`` and ``underlying_price``. Other batches pass as they are
    (a malformed one is refused by ``RiskState.on_marks``)."""
    if not isinstance(batch, Mapping) or "underlying_price" in batch or not all(
            k in batch for k in ("instrument", "mark_price", "index_price")):
        return batch
    try:
        names = np.asarray(batch["instrument"])
        mark = np.asarray(batch["mark_price"], dtype=np.float64)
        underlying = np.array(batch["index_price"], dtype=np.float64)
    except (TypeError, ValueError):
        return batch
    if names.ndim != 1 or mark.shape != names.shape or underlying.shape != names.shape:
        return batch
    contracts = [parse_contract(str(n)) for n in names]
    if not any(c is not None and c.is_option for c in contracts):
        return batch
    perps = {c.base: float(mark[i]) for i, c in enumerate(contracts)
             if c is not None and c.kind == "perpetual"}
    for i, c in enumerate(contracts):
        if c is not None and c.is_option:
            underlying[i] = perps.get(c.base, index.get(c.base, math.nan))
    return {**batch, "index_price": underlying, "underlying_price": underlying}


class RiskBook(EventSourced):
    """A risk book. Constructor keywords: ``book_id``, ``instruments`` (Deribit names this
    book trades; None: any), ``limits`` (a dict of :class:`actors.limits.Limits` fields),
    ``snapshot_every`` (events between snapshots), ``config`` (:class:`RiskConfig` fields),
    ``clock`` (anything with ``now_s()``; the wall clock by default)."""

    def __init__(self, book_id: str = "book", instruments: list[str] | None = None,
                 limits: Mapping[str, Any] | None = None, snapshot_every: int = 1000,
                 config: Mapping[str, Any] | None = None, clock: Clock | None = None) -> None:
        self.book_id = book_id
        self.snapshot_every = snapshot_every
        self.risk = RiskState(instruments, RiskConfig.from_dict(config))
        self._limits = Limits.from_dict(limits)
        self._limit_changes: list[dict[str, Any]] = []
        self.machine = TradingStateMachine()
        self._orders = OrderRateWindow()
        self._order_counters: dict[str, int] = {}
        self._clock: Clock = clock or WallClock()
        self._marks_version = 0
        self._measures_cache: tuple[tuple[int, int], Any] | None = None
        self._md = MarketDataLag()

    # ---- EventSourced --------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        kind = event["t"]
        if kind == "limits":
            self._limits = Limits.from_dict(event["new"])
            self._limit_changes.append({k: event[k] for k in ("ts", "who", "why", "old",
                                                               "new")})
        elif kind == "state":
            change = self.machine.fire(Trigger(event["trigger"]), event["ts"], event["reason"])
            if change is None or change.to_state.value != event["to"]:
                raise RuntimeError(f"journal: state event {event} does not apply in "
                                   f"{self.machine.state.value}")
        else:
            self.risk.apply(event)
        self._measures_cache = None

    def snapshot_state(self) -> Any:
        return {"book_id": self.book_id, "risk": self.risk.snapshot(),
                "limits": self._limits.to_dict(), "limit_changes": self._limit_changes,
                "machine": self.machine.to_dict()}

    def restore_state(self, state: Any) -> None:
        self.risk.restore(state["risk"])
        self._limits = Limits.from_dict(state["limits"])
        self._limit_changes = list(state["limit_changes"])
        self.machine.restore(state["machine"])
        self._measures_cache = None

    # ---- inputs from the connector ---------------------------------------------------------
    def on_fills(self, fills: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply Deribit trade dicts. Returns ``seq`` (the journal sequence acknowledging
        them), ``applied``, ``duplicates`` and ``rejected`` (``index``, ``id``, ``reason``,
        ``field`` per refused fill). Replayed fills (same ``trade_id``) are duplicates."""
        prepared = self.risk.prepare_fills(fills)
        self.emit_many(prepared.events)
        self._evaluate(self._clock.now_s())
        self._export_metrics()
        return {"seq": self.journal_seq, "applied": prepared.applied,
                "duplicates": prepared.duplicates, "rejected": prepared.rejected}

    def on_marks(self, batch: dict[str, np.ndarray], ts_s: float | None = None
                 ) -> dict[str, Any]:
        """Take one batch of marks (never call this per tick). ``ts_s``: the batch time; by
        default the batch's ``timestamp`` column (ms, the latest) or the clock."""
        ts = self._batch_ts(batch) if ts_s is None else float(ts_s)
        result = self.risk.on_marks(with_option_underlyings(batch, self.risk.index), ts)
        self._marks_version += 1
        self._measures_cache = None
        self._evaluate(ts)
        self._md.record(batch, time.time())
        self._export_metrics()
        return {"applied": result.applied, "rejected": result.rejected,
                "ignored": result.ignored, "trading_state": self.machine.state.value}

    def on_funding(self, instrument: str, rate: float, ts_s: float) -> dict[str, Any]:
        """Settle one funding interval of a perpetual (``rate``: fraction per interval, paid
        by longs to shorts). Idempotent per interval."""
        prepared = self.risk.prepare_funding(instrument, rate, ts_s)
        self.emit_many(prepared.events)
        self._evaluate(self._clock.now_s())
        amount = next((e["amount"] for e in prepared.events if e["t"] == "funding"), None)
        return {"seq": self.journal_seq, "applied": prepared.applied, "amount": amount,
                "duplicates": prepared.duplicates, "rejected": prepared.rejected}

    # ---- the router ------------------------------------------------------------------------
    def check_order(self, order: dict[str, Any], now_s: float | None = None
                    ) -> OrderAccepted | OrderDenied:
        """Pre-trade check (see :func:`actors.limits.check`). An accepted order is counted
        in the order-rate window; nothing else changes (positions move only on fills)."""
        now = self._clock.now_s() if now_s is None else float(now_s)
        name = order.get("instrument_name") if isinstance(order, Mapping) else None
        state = PreTradeState(
            self.machine.state, self._measures(),
            self.risk.instrument_risk(name) if isinstance(name, str) else None,
            self._orders.recent(now, self._limits.order_window_s))
        result = check(order, state, self._limits, now)
        if result.ok:
            self._orders.record(now)
            key = "accepted"
        else:
            key = f"denied.{result.reason}"
        self._order_counters[key] = self._order_counters.get(key, 0) + 1
        return result

    # ---- operators -------------------------------------------------------------------------
    def set_limits(self, new: Mapping[str, Any], who: str, why: str,
                   ts_s: float | None = None) -> dict[str, Any]:
        """Change limits at run time; fields not given keep their values. Raises
        ``LimitsError`` (naming the field and value) for a bad limit or a missing who/why.
        The change is journaled and may move the trading state at once."""
        for name, value in (("who", who), ("why", why)):
            if not isinstance(value, str) or not value.strip():
                raise LimitsError(name, value, "say who changes the limits and why")
        limits = Limits.from_dict(new, base=self._limits)
        ts = self._clock.now_s() if ts_s is None else float(ts_s)
        if limits == self._limits:
            return {"seq": self.journal_seq, "changed": False, "limits": limits.to_dict()}
        self.emit({"t": "limits", "ts": ts, "who": who, "why": why,
                   "old": self._limits.to_dict(), "new": limits.to_dict()})
        self._evaluate(ts)
        return {"seq": self.journal_seq, "changed": True, "limits": self._limits.to_dict(),
                "trading_state": self.machine.state.value}

    def halt(self, who: str, why: str) -> dict[str, Any]:
        """Kill switch: HALTED until ``resume``."""
        return self._operator(Trigger.HALT, who, why)

    def resume(self, who: str, why: str) -> dict[str, Any]:
        """Leave HALTED for REDUCING (the limits then decide when to be ACTIVE again)."""
        result = self._operator(Trigger.RESUME, who, why)
        self._evaluate(self._clock.now_s())
        result["trading_state"] = self.machine.state.value
        return result

    def _operator(self, trigger: Trigger, who: str, why: str) -> dict[str, Any]:
        to = self.machine.next_state(trigger)
        if to is not None:
            self.emit({"t": "state", "trigger": trigger.value, "to": to.value,
                       "reason": f"{who}: {why}", "ts": self._clock.now_s()})
        return {"changed": to is not None, "trading_state": self.machine.state.value}

    # ---- queries ---------------------------------------------------------------------------
    def market_data_stats(self) -> dict[str, Any]:
        """Batches and events taken, and venue event -> risk updated latency (see
        :class:`MarketDataLag`)."""
        return self._md.stats()

    def positions(self) -> list[dict[str, Any]]:
        return jsonable(self.risk.position_rows())

    def trading_state(self) -> str:
        return self.machine.state.value

    def state_history(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.machine.history]

    def limits(self) -> dict[str, Any]:
        return self._limits.to_dict()

    def limit_history(self) -> list[dict[str, Any]]:
        return jsonable(self._limit_changes)

    def summary(self) -> dict[str, Any]:
        """Everything at once, msgpack/JSON-able (NaN as None)."""
        m = self._measures()
        return jsonable({
            "book_id": self.book_id, "status": self.risk.status(),
            "trading_state": self.machine.state.value, "positions": self.risk.position_rows(),
            "pnl": self.risk.pnl(), "greeks": self.risk.greeks(), "var": self.risk.var(),
            "limits": self._limits.to_dict(),
            "measures": {"position_usd": m.position_usd, "gross_notional_usd":
                         m.gross_notional_usd, "delta_usd": m.delta_usd,
                         "vega_usd": m.vega_usd, "drawdown_usd": m.drawdown_usd},
            "counters": {"book": self.risk.counters, "marks": self.risk.mark_counters,
                         "orders": self._order_counters},
            "marks_ts_s": self.risk.marks_ts_s,
            "journal": {"seq": getattr(self, "_es_seq", 0),
                        "epoch": getattr(self, "_es_epoch", 0)},
        })

    def recovery(self) -> dict[str, Any]:
        return self.recovery_stats()

    def _export_metrics(self) -> None:
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            metrics = self._metrics = RiskBookMetrics(self.book_id)
        if metrics.throttle.due():
            try:
                pnl = self.risk.total_pnl_usd()
            except Exception:  # noqa: BLE001 - metrics never break the book
                pnl = math.nan
            metrics.export(self.machine.state.value,
                           {n: p.size for n, p in self.risk.positions.items()}, pnl,
                           force=True)

    def __repr__(self) -> str:
        risk = getattr(self, "risk", None)
        if risk is None:
            return "RiskBook(?)"
        open_positions = sum(1 for p in risk.positions.values() if p.size != 0.0)
        return (f"RiskBook({self.book_id} {self.machine.state.value} positions={open_positions}"
                f" pnl_usd={risk.total_pnl_usd():.2f} seq={getattr(self, '_es_seq', 0)})")

    # ---- internals -------------------------------------------------------------------------
    def _measures(self) -> Any:
        key = (getattr(self, "_es_seq", 0), self._marks_version)
        if self._measures_cache is None or self._measures_cache[0] != key:
            self._measures_cache = (key, self.risk.measures())
        return self._measures_cache[1]

    def _evaluate(self, ts: float) -> None:
        """Journal a new P&L peak and the trading-state change the measures call for."""
        events: list[dict[str, Any]] = []
        peak = self.risk.peak_event(ts, self._limits.max_loss_usd * PEAK_STEP_FRACTION)
        if peak is not None:
            events.append(peak)
        ev = evaluate(self._measures(), self._limits)
        to = self.machine.next_state(ev.trigger) if ev.trigger is not None else None
        if to is not None:
            events.append({"t": "state", "trigger": ev.trigger.value, "to": to.value,
                           "reason": ev.reason, "ts": ts})
        self.emit_many(events)

    def _batch_ts(self, batch: object) -> float:
        if isinstance(batch, Mapping) and "timestamp" in batch:
            try:
                stamps = np.asarray(batch["timestamp"], dtype=np.float64)
                if stamps.size and np.isfinite(stamps).all():
                    return float(stamps.max()) / 1000.0
            except (TypeError, ValueError):
                pass
        return self._clock.now_s()
