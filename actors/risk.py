"""A risk book's pure core: positions and P&L from fills, marks, funding, Greeks and VaR.

No Ray, no clock, no I/O: times are passed in (float seconds, ``*_s``). The actor
(``actors.risk_book``) journals what this module turns into events and folds them back in with
:meth:`RiskState.apply`, so a state rebuilt from the journal equals the one that acknowledged
the fills.

Contracts are read from Deribit instrument names (:func:`parse_contract`):

========================  ===========  ===============  ============  =====================
name                      amount in    price in         P&L in        P&L of a closed unit
========================  ===========  ===============  ============  =====================
``BTC-PERPETUAL``         USD          USD              BTC           ``1/entry - 1/exit``
``BTC-27DEC26``           USD          USD              BTC           (inverse future)
``BTC_USDC-PERPETUAL``    BTC          USDC             USDC          ``exit - entry``
``BTC_USDC`` (spot)       BTC          USDC             USDC          ``exit - entry``
``BTC-27DEC26-60000-C``   BTC          BTC (premium)    BTC           ``exit - entry``
``BTC_USDC-27DEC26-...``  BTC          USDC             USDC          ``exit - entry``
========================  ===========  ===============  ============  =====================

The entry price of an inverse future is the harmonic mean of its fills (USD over coins), of
anything else the arithmetic mean. A fill that reduces a position realises P&L on the closed
part; one that flips it opens the rest at the fill price. Fees (Deribit ``fee``, positive =
paid, in the P&L currency) and funding are kept apart from trading P&L. Total P&L in USD
converts each currency at its index (USD, USDC and USDT count as 1 USD).

Fills are idempotent by ``trade_id``: every instrument keeps the ids it applied and the
high-water mark of ``trade_seq``; a replayed id is a duplicate, and a fill more than
``dedup_window_seq`` below the high-water mark (whose id may have been forgotten) is refused as
stale. Bad input is refused with a reason key, counted and never applied.

Greeks (per underlying): options by Black-76 on the forward (``underlying_price`` if the mark
batch has it, else ``index_price``) with zero rates, the batch's ``iv`` (a decimal, 0.65 = 65 %)
or, where that is missing, the vol implied by the mark price; ``delta`` in underlying units (an
inverse perpetual contributes ``size / mark``, a linear contract ``size``), ``gamma`` per USD,
``vega_usd`` per vol point and ``theta_usd`` per calendar day.

VaR/ES: total P&L (USD) is sampled every ``var_sample_s`` of mark time; historical and
parametric VaR/ES (``actors.var``) are taken over the last ``var_window`` changes between
samples. Marks, Greeks and the samples are live state, rebuilt from the next mark batches.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.limits import InstrumentRisk, Measures
from actors.options import Greeks, black76_greeks, black76_implied_vol, portfolio_greeks
from actors.var import historical_var_es, var_es

SECONDS_PER_YEAR = 365.0 * 86_400.0
USD_LIKE = frozenset({"USD", "USDC", "USDT"})
_ZERO_REL = 1e-12  # a size this small relative to the trade is flat (float residue)
_MONTHS = {m: i + 1 for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL",
                                            "AUG", "SEP", "OCT", "NOV", "DEC"))}
_C = r"[A-Z0-9]{2,10}"
_DATE = r"(\d{1,2})([A-Z]{3})(\d{2})"
_PATTERNS = (
    ("perpetual", True, re.compile(rf"^({_C})-PERPETUAL$")),
    ("perpetual", False, re.compile(rf"^({_C})_({_C})-PERPETUAL$")),
    ("future", True, re.compile(rf"^({_C})-{_DATE}$")),
    ("option", True, re.compile(rf"^({_C})-{_DATE}-(\d+(?:[.d]\d+)?)-([CP])$")),
    ("option", False, re.compile(rf"^({_C})_({_C})-{_DATE}-(\d+(?:[.d]\d+)?)-([CP])$")),
    ("spot", False, re.compile(rf"^({_C})_({_C})$")),
)


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What the name of an instrument says about its units (see the module table)."""

    name: str
    kind: str  # perpetual | future | spot | option
    base: str
    quote: str  # the currency of the price
    inverse: bool  # USD-sized, coin-settled future: P&L = size (1/entry - 1/exit)
    pnl_currency: str
    strike: float = math.nan
    expiry_s: float = math.inf
    is_call: bool = True

    @property
    def is_option(self) -> bool:
        return self.kind == "option"


def _expiry_s(day: str, month: str, year: str) -> float | None:
    if month not in _MONTHS:
        return None
    try:  # Deribit expiries are at 08:00 UTC
        return dt.datetime(2000 + int(year), _MONTHS[month], int(day), 8,
                           tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def parse_contract(name: object) -> Contract | None:
    """The contract behind a Deribit instrument name, or None if it is not one."""
    if not isinstance(name, str):
        return None
    for kind, coin_margined, pattern in _PATTERNS:
        m = pattern.match(name)
        if m is None:
            continue
        g = m.groups()
        base = g[0]
        if kind == "perpetual":
            quote = "USD" if coin_margined else g[1]
            return Contract(name, kind, base, quote, coin_margined,
                            base if coin_margined else quote)
        if kind == "spot":
            return Contract(name, kind, base, g[1], False, g[1])
        quote = base if coin_margined else g[1]
        date = g[1:4] if coin_margined else g[2:5]
        expiry = _expiry_s(*date)
        if expiry is None:
            return None
        if kind == "future":
            return Contract(name, kind, base, "USD", True, base, expiry_s=expiry)
        strike = float(g[-2].replace("d", "."))
        if strike <= 0:
            return None
        return Contract(name, kind, base, quote, False, quote, strike, expiry, g[-1] == "C")
    return None


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class RiskConfigError(ValueError):
    """A risk setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"invalid risk config {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class RiskConfig:
    """``var_window``: P&L changes in the VaR window. ``var_sample_s``: mark time between P&L
    samples (the VaR horizon). ``var_confidence``: in (0, 1). ``funding_interval_s``: one
    funding settlement per interval per perpetual (Deribit's rate is quoted per 8 h).
    ``dedup_window_seq``: how far below an instrument's highest ``trade_seq`` a fill's id is
    still remembered; older fills are refused as stale."""

    var_window: int = 250
    var_sample_s: float = 60.0
    var_confidence: float = 0.99
    funding_interval_s: float = 8 * 3600.0
    dedup_window_seq: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("var_window", "dedup_window_seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise RiskConfigError(name, value, "must be an integer >= 2")
        for name in ("var_sample_s", "funding_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise RiskConfigError(name, value, "must be a finite number of seconds > 0")
        if not isinstance(self.var_confidence, float) or not 0 < self.var_confidence < 1:
            raise RiskConfigError("var_confidence", self.var_confidence, "must be in (0, 1)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RiskConfig:
        known = set(cls.__dataclass_fields__)
        for key in data or {}:
            if key not in known:
                raise RiskConfigError(str(key), data[key], f"unknown; known: {sorted(known)}")
        return cls(**dict(data or {}))


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Position:
    """One instrument's net position from its fills (all fields journal-derived)."""

    size: float = 0.0  # signed, in amount units
    avg_price: float = 0.0  # entry price of the open part (0 when flat)
    realised: float = 0.0  # trading P&L of closed amounts, in the P&L currency
    fees: float = 0.0
    funding: float = 0.0  # received (> 0) or paid (< 0)
    trades: int = 0
    last_price: float = math.nan
    hwm_seq: int = -1
    funding_slot: int = -1
    seen: dict[str, int] = field(default_factory=dict)  # trade_id -> trade_seq

    def apply_fill(self, contract: Contract, signed: float, price: float) -> None:
        old = self.size
        new = old + signed
        if abs(new) <= _ZERO_REL * max(abs(old), abs(signed)):
            new = 0.0
        if old == 0.0 or (old > 0) == (signed > 0):  # open or increase
            add = abs(signed)
            if contract.inverse:  # harmonic mean: USD over coins
                coins = (abs(old) / self.avg_price if old else 0.0) + add / price
                self.avg_price = (abs(old) + add) / coins
            else:
                self.avg_price = (abs(old) * self.avg_price + add * price) / (abs(old) + add)
        else:  # reduce, close or flip
            closed = min(abs(old), abs(signed))
            sign = 1.0 if old > 0 else -1.0
            if contract.inverse:
                self.realised += sign * closed * (1.0 / self.avg_price - 1.0 / price)
            else:
                self.realised += sign * closed * (price - self.avg_price)
            if new == 0.0:
                self.avg_price = 0.0
            elif (new > 0) != (old > 0):
                self.avg_price = price
        self.size = new
        self.last_price = price
        self.trades += 1

    def unrealised(self, contract: Contract, mark: float) -> float:
        if self.size == 0.0 or not math.isfinite(mark) or mark <= 0:
            return 0.0
        if contract.inverse:
            return self.size * (1.0 / self.avg_price - 1.0 / mark)
        return self.size * (mark - self.avg_price)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "avg": self.avg_price, "realised": self.realised,
                "fees": self.fees, "funding": self.funding, "trades": self.trades,
                "last": self.last_price, "hwm": self.hwm_seq, "fslot": self.funding_slot,
                "seen": dict(self.seen)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Position:
        return cls(d["size"], d["avg"], d["realised"], d["fees"], d["funding"], d["trades"],
                   d["last"], d["hwm"], d["fslot"], dict(d["seen"]))


@dataclass(frozen=True)
class Prepared:
    """Events to journal for one input batch, and what was refused (``index``, ``id``,
    ``reason``, ``field``). ``duplicates`` counts replays ignored."""

    events: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    duplicates: int = 0

    @property
    def applied(self) -> int:
        return sum(1 for e in self.events if e["t"] in ("fill", "funding"))


@dataclass(frozen=True)
class MarkResult:
    applied: int
    rejected: dict[str, int]
    ignored: int  # rows for instruments this book does not trade


def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _reject(index: int, ident: object, reason: str, field_name: str = "") -> dict[str, Any]:
    ok = ident is None or isinstance(ident, str | int)
    return {"index": index, "id": ident if ok else repr(ident)[:40],
            "reason": reason, "field": field_name}


def var_summary(changes: Iterable[float] | np.ndarray, confidence: float) -> dict[str, Any]:
    """Historical and parametric VaR/ES of P&L changes (positive numbers are losses)."""
    x = np.asarray(changes, dtype=np.float64)
    x = x[np.isfinite(x)]
    out: dict[str, Any] = {"samples": int(x.size), "confidence": confidence,
                           "historical": None, "parametric": None}
    if x.size >= 1:
        h = historical_var_es(x, confidence)
        out["historical"] = {"var": float(h.var), "es": float(h.es)}
    if x.size >= 2:
        p = var_es(x, confidence, "parametric")
        out["parametric"] = {"var": float(p.var), "es": float(p.es)}
    return out


# --------------------------------------------------------------------------------------------
# The book
# --------------------------------------------------------------------------------------------

_FILL_FIELDS = ("trade_id", "trade_seq", "instrument_name", "direction", "amount", "price",
                "timestamp")
_GREEK_FIELDS = ("price", "delta", "gamma", "vega_per_vol", "theta_per_year", "rho")


class RiskState:
    """Positions, P&L, Greeks and VaR of one book. ``instruments``: the names this book
    trades (None: any name :func:`parse_contract` accepts)."""

    def __init__(self, instruments: Iterable[str] | None = None,
                 config: RiskConfig | None = None) -> None:
        self.config = config or RiskConfig()
        self.instruments = None if instruments is None else frozenset(instruments)
        for name in self.instruments or ():
            if parse_contract(name) is None:
                raise RiskConfigError("instruments", name, "not a Deribit instrument name")
        self._contracts: dict[str, Contract | None] = {}
        # journal-derived
        self.positions: dict[str, Position] = {}
        self.counters: dict[str, int] = {}
        self.peak_pnl_usd = 0.0
        # live (from mark batches; not journaled)
        self.marks: dict[str, tuple[float, float, float]] = {}  # mark, index, iv
        self.index: dict[str, float] = {}
        self.marks_ts_s = math.nan
        self.mark_counters: dict[str, int] = {}
        self._greeks: dict[str, tuple[float, ...]] = {}  # option -> _GREEK_FIELDS
        self._samples: deque[tuple[float, float]] = deque(maxlen=self.config.var_window + 1)
        self._live_peak_usd = 0.0
        self._prune_at = 1024

    # ---- contracts ---------------------------------------------------------------------
    def contract(self, name: object) -> Contract | None:
        """The contract if this book trades ``name``."""
        if not isinstance(name, str):
            return None
        name = str(name)  # np.str_ from a batch column -> str
        if name not in self._contracts:
            known = self.instruments is None or name in self.instruments
            self._contracts[name] = parse_contract(name) if known else None
        return self._contracts[name]

    def _position(self, name: str) -> Position:
        return self.positions.setdefault(name, Position())

    # ---- fills -------------------------------------------------------------------------
    def _fill_event(self, i: int, raw: object) -> dict[str, Any]:
        """A fill event, or a rejection (a dict with ``reason``)."""
        if not isinstance(raw, Mapping):
            return _reject(i, None, "not_a_dict")
        ident = raw.get("trade_id")
        for key in _FILL_FIELDS:
            if key not in raw or raw[key] is None:
                return _reject(i, ident, "missing_field", key)
        if not isinstance(ident, str | int) or isinstance(ident, bool) or ident == "":
            return _reject(i, ident, "bad_type", "trade_id")
        contract = self.contract(raw["instrument_name"])
        if contract is None:
            return _reject(i, ident, "unknown_instrument", "instrument_name")
        if raw["direction"] not in ("buy", "sell"):
            return _reject(i, ident, "bad_direction", "direction")
        for key in ("amount", "price", "timestamp", "fee"):
            value = raw.get(key, 0.0)
            if not _is_number(value):
                return _reject(i, ident, "bad_type", key)
            if not math.isfinite(value):
                return _reject(i, ident, "not_finite", key)
            if key in ("amount", "price") and value <= 0:
                return _reject(i, ident, "not_positive", key)
            if key == "timestamp" and value < 0:
                return _reject(i, ident, "negative", key)
        seq = raw["trade_seq"]
        if not _is_number(seq) or not math.isfinite(seq) or seq < 0 or seq != int(seq):
            return _reject(i, ident, "bad_type", "trade_seq")
        amount = float(raw["amount"])
        return {"t": "fill", "id": str(ident), "seq": int(seq), "i": contract.name,
                "q": amount if raw["direction"] == "buy" else -amount,
                "px": float(raw["price"]), "fee": float(raw.get("fee", 0.0)),
                "ts": float(raw["timestamp"]) / 1000.0,
                "oid": str(raw.get("order_id", "") or ""), "label": str(raw.get("label") or "")}

    def prepare_fills(self, fills: object) -> Prepared:
        """Validate and deduplicate Deribit trade dicts; nothing changes until the events are
        applied. The last event counts refusals and duplicates (``t = "rejects"``)."""
        if not isinstance(fills, list | tuple):
            rejected = [_reject(0, None, "not_a_list")]
            return Prepared([self._rejects_event("fill", rejected, 0)], rejected)
        events: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        duplicates = 0
        batch: set[tuple[str, str]] = set()
        for i, raw in enumerate(fills):
            event = self._fill_event(i, raw)
            if "reason" in event:
                rejected.append(event)
                continue
            pos = self.positions.get(event["i"])
            key = (event["i"], event["id"])
            if key in batch or (pos is not None and event["id"] in pos.seen):
                duplicates += 1
                continue
            if pos is not None and event["seq"] <= pos.hwm_seq - self.config.dedup_window_seq:
                rejected.append(_reject(i, event["id"], "stale_trade_seq", "trade_seq"))
                continue
            batch.add(key)
            events.append(event)
        if rejected or duplicates:
            events.append(self._rejects_event("fill", rejected, duplicates))
        return Prepared(events, rejected, duplicates)

    @staticmethod
    def _rejects_event(what: str, rejected: list[dict[str, Any]],
                       duplicates: int) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in rejected:
            key = f"{what}_rejected.{r['reason']}"
            counts[key] = counts.get(key, 0) + 1
        if duplicates:
            counts[f"{what}_duplicate"] = duplicates
        return {"t": "rejects", "counts": counts}

    def on_fills(self, fills: object) -> Prepared:
        """Prepare and apply (the pure path; the actor journals the events in between)."""
        prepared = self.prepare_fills(fills)
        for event in prepared.events:
            self.apply(event)
        return prepared

    # ---- funding -----------------------------------------------------------------------
    def prepare_funding(self, instrument: object, rate: object, ts_s: object) -> Prepared:
        """One funding settlement of a perpetual: longs pay shorts ``rate`` (a fraction per
        ``funding_interval_s``) of the position's value at the mark, in the P&L currency
        (``size / mark`` coins for an inverse perp, ``size * mark`` for a linear one). At most
        one per interval slot ``floor(ts / interval)``: a repeat is a duplicate."""
        contract = self.contract(instrument)
        why = ("unknown_instrument" if contract is None else
               "not_a_perpetual" if contract.kind != "perpetual" else
               "bad_rate" if not _is_number(rate) or not math.isfinite(rate) else
               "bad_timestamp" if not _is_number(ts_s) or not math.isfinite(ts_s) or ts_s < 0
               else "")
        ident = instrument if isinstance(instrument, str) else None
        if why:
            rejected = [_reject(0, ident, why)]
            return Prepared([self._rejects_event("funding", rejected, 0)], rejected)
        assert contract is not None
        pos = self.positions.get(contract.name) or Position()  # no change before apply()
        slot = math.floor(float(ts_s) / self.config.funding_interval_s)
        if slot <= pos.funding_slot:
            return Prepared([self._rejects_event("funding", [], 1)], [], 1)
        mark = self.mark_price(contract.name)
        if pos.size != 0.0 and not math.isfinite(mark):
            rejected = [_reject(0, ident, "no_mark")]
            return Prepared([self._rejects_event("funding", rejected, 0)], rejected)
        value = 0.0 if pos.size == 0.0 else (pos.size / mark if contract.inverse
                                             else pos.size * mark)
        return Prepared([{"t": "funding", "i": contract.name, "rate": float(rate),
                          "ts": float(ts_s), "slot": slot, "px": mark,
                          "amount": -value * float(rate)}], [])

    def on_funding(self, instrument: object, rate: object, ts_s: object) -> Prepared:
        prepared = self.prepare_funding(instrument, rate, ts_s)
        for event in prepared.events:
            self.apply(event)
        return prepared

    # ---- the fold ----------------------------------------------------------------------
    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event["t"]
        if kind == "fill":
            contract = self.contract(event["i"])
            assert contract is not None, event["i"]
            pos = self._position(event["i"])
            pos.apply_fill(contract, event["q"], event["px"])
            pos.fees += event["fee"]
            pos.seen[event["id"]] = event["seq"]
            pos.hwm_seq = max(pos.hwm_seq, event["seq"])
            self._count("fills_applied")
            if len(pos.seen) > self._prune_at:
                floor = pos.hwm_seq - self.config.dedup_window_seq
                pos.seen = {k: s for k, s in pos.seen.items() if s > floor}
                self._prune_at = max(1024, 2 * len(pos.seen))
        elif kind == "funding":
            pos = self._position(event["i"])
            pos.funding += event["amount"]
            pos.funding_slot = event["slot"]
            self._count("funding_applied")
        elif kind == "rejects":
            for key, n in event["counts"].items():
                self._count(key, n)
        elif kind == "peak":
            self.peak_pnl_usd = max(self.peak_pnl_usd, event["peak_usd"])
        else:
            raise ValueError(f"unknown risk event type {kind!r}")

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # ---- marks (live) --------------------------------------------------------------------
    def on_marks(self, batch: object, ts_s: float) -> MarkResult:
        """Take a batch of marks (columns ``instrument``, ``mark_price``, ``index_price``,
        optional ``iv`` and ``underlying_price``; equal-length 1-D arrays). A malformed batch
        is refused as a whole; a bad row is refused and counted; the last row of an
        instrument wins. Recomputes the Greeks of every marked option and samples P&L."""
        cols = self._mark_columns(batch)
        if isinstance(cols, str):
            self._mark_count(cols)
            return MarkResult(0, {cols: 1}, 0)
        names, mark, index, iv, fwd = cols
        ok_mark = np.isfinite(mark) & (mark > 0)
        ok_index = np.isfinite(index) & (index > 0)
        bad_iv = np.isfinite(iv) & (iv <= 0) | np.isinf(iv)
        rejected: dict[str, int] = {}
        ignored = applied = 0
        options: dict[str, int] = {}
        for row, raw_name in enumerate(names):
            name = str(raw_name)
            contract = self.contract(name)
            if contract is None:
                ignored += 1
                continue
            reason = ("mark_price_invalid" if not ok_mark[row] else
                      "index_price_invalid" if not ok_index[row] else "")
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            if bad_iv[row]:
                rejected["iv_invalid"] = rejected.get("iv_invalid", 0) + 1
            vol = float(iv[row]) if np.isfinite(iv[row]) and iv[row] > 0 else math.nan
            self.marks[name] = (float(mark[row]), float(index[row]), vol)
            self.index[contract.base] = float(index[row])
            applied += 1
            if contract.is_option:
                options[name] = row
        for reason, n in rejected.items():
            self._mark_count(f"rejected.{reason}", n)
        self._mark_count("rows_ignored", ignored)
        self._mark_count("rows_applied", applied)
        self._mark_count("batches")
        self.marks_ts_s = float(ts_s)
        self._option_greeks([(n, self.contract(n), fwd[r], index[r]) for n, r in options.items()],
                            float(ts_s))
        self._sample(float(ts_s))
        return MarkResult(applied, rejected, ignored)

    @staticmethod
    def _mark_columns(batch: object) -> tuple[np.ndarray, ...] | str:
        if not isinstance(batch, Mapping):
            return "batch_not_a_dict"
        for key in ("instrument", "mark_price", "index_price"):
            if key not in batch:
                return f"batch_missing_{key}"
        try:
            names = np.asarray(batch["instrument"])
            numeric = [np.asarray(batch[k], dtype=np.float64) if k in batch else None
                       for k in ("mark_price", "index_price", "iv", "underlying_price")]
        except (TypeError, ValueError):
            return "batch_bad_type"
        n = names.shape[0] if names.ndim == 1 else -1
        if n < 0 or any(a is not None and a.shape != (n,) for a in numeric):
            return "batch_bad_shape"
        mark, index, iv, fwd = numeric
        iv = np.full(n, np.nan) if iv is None else iv
        fwd = index if fwd is None else np.where(np.isfinite(fwd) & (fwd > 0), fwd, index)
        return names, mark, index, iv, fwd

    def _mark_count(self, key: str, n: int = 1) -> None:
        if n:
            self.mark_counters[key] = self.mark_counters.get(key, 0) + n

    def _option_greeks(self, rows: list[tuple[str, Contract | None, float, float]],
                       now_s: float) -> None:
        """Black-76 Greeks per unit of every marked option (vectorized), in USD."""
        if not rows:
            return
        names = [r[0] for r in rows]
        contracts = [r[1] for r in rows]
        fwd = np.array([r[2] for r in rows], dtype=np.float64)
        strike = np.array([c.strike for c in contracts])
        t_years = np.array([(c.expiry_s - now_s) / SECONDS_PER_YEAR for c in contracts])
        is_call = np.array([c.is_call for c in contracts])
        coin = np.array([c.quote == c.base for c in contracts])
        mark = np.array([self.marks[n][0] for n in names])
        vol = np.array([self.marks[n][2] for n in names])
        missing = ~np.isfinite(vol)
        if missing.any():  # the vol implied by the mark price (coin premium for inverse)
            usd_price = np.where(coin, mark * fwd, mark)
            solved = black76_implied_vol(usd_price[missing], is_call[missing], fwd[missing],
                                         strike[missing], t_years[missing])
            vol[missing] = solved.vol
            self._mark_count("iv_solved", int(missing.sum()) - solved.failed)
            self._mark_count("iv_unsolved", solved.failed)
        g = black76_greeks(is_call, fwd, strike, t_years, vol)
        for i, name in enumerate(names):
            self._greeks[name] = tuple(float(getattr(g, f)[i]) for f in _GREEK_FIELDS)

    def _sample(self, ts_s: float) -> None:
        total = self.total_pnl_usd()
        self._live_peak_usd = max(self._live_peak_usd, total)
        if not self._samples or ts_s - self._samples[-1][0] >= self.config.var_sample_s:
            self._samples.append((ts_s, total))

    # ---- views -------------------------------------------------------------------------
    def mark_price(self, name: str) -> float:
        """The latest mark, else the last fill price, else NaN."""
        if name in self.marks:
            return self.marks[name][0]
        pos = self.positions.get(name)
        return pos.last_price if pos is not None else math.nan

    def usd_rate(self, currency: str) -> float:
        """USD per unit of ``currency``: 1 for USD-like, the index for a coin, else NaN."""
        if currency in USD_LIKE:
            return 1.0
        if currency in self.index:
            return self.index[currency]
        for name, pos in self.positions.items():  # fallback: a USD-priced fill of that coin
            c = self.contract(name)
            if c is not None and c.base == currency and c.quote in USD_LIKE and not c.is_option \
                    and math.isfinite(pos.last_price):
                return pos.last_price
        return math.nan

    def position_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(self.positions):
            pos, c = self.positions[name], self.contract(name)
            assert c is not None
            mark = self.mark_price(name)
            rows.append({
                "instrument": name, "kind": c.kind, "size": pos.size,
                "average_price": pos.avg_price, "realised_pnl": pos.realised,
                "unrealised_pnl": pos.unrealised(c, mark), "fees": pos.fees,
                "funding": pos.funding, "pnl_currency": c.pnl_currency,
                "mark_price": mark if math.isfinite(mark) else None,
                "mark_source": "mark" if name in self.marks else "last_fill",
                "notional_usd": abs(pos.size) * self._notional_per_amount(c),
                "trades": pos.trades, "last_trade_seq": pos.hwm_seq})
        return rows

    def pnl(self) -> dict[str, Any]:
        """P&L per currency and the total in USD (currencies without a USD rate are listed
        in ``unpriced`` and left out of the total)."""
        per: dict[str, dict[str, float]] = {}
        for name, pos in self.positions.items():
            c = self.contract(name)
            assert c is not None
            row = per.setdefault(c.pnl_currency, dict.fromkeys(
                ("realised", "unrealised", "fees", "funding", "total"), 0.0))
            unreal = pos.unrealised(c, self.mark_price(name))
            row["realised"] += pos.realised
            row["unrealised"] += unreal
            row["fees"] += pos.fees
            row["funding"] += pos.funding
            row["total"] += pos.realised + unreal - pos.fees + pos.funding
        total, unpriced = 0.0, []
        for ccy, row in sorted(per.items()):
            rate = self.usd_rate(ccy)
            if math.isfinite(rate):
                total += row["total"] * rate
            elif row["total"] != 0.0:
                unpriced.append(ccy)
        peak = max(self.peak_pnl_usd, self._live_peak_usd, total)
        return {"by_currency": per, "total_usd": total, "peak_usd": peak,
                "drawdown_usd": peak - total, "unpriced": unpriced}

    def total_pnl_usd(self) -> float:
        return self.pnl()["total_usd"]

    def _notional_per_amount(self, c: Contract) -> float:
        if c.inverse:
            return 1.0
        if c.is_option:
            return self.usd_rate(c.base)
        return self.mark_price(c.name) * self.usd_rate(c.quote)

    def _delta_per_amount(self, c: Contract) -> float:
        """Underlying units per unit of amount."""
        if c.is_option:
            g = self._greeks.get(c.name)
            return g[1] if g is not None else math.nan
        if c.inverse:
            return 1.0 / self.mark_price(c.name)
        return 1.0

    def greeks(self) -> dict[str, dict[str, float]]:
        """Per underlying: ``delta`` (units), ``delta_usd``, ``option_delta``, ``gamma``,
        ``vega_usd`` (per vol point), ``theta_usd`` (per day), ``options_unpriced``."""
        out: dict[str, dict[str, float]] = {}
        held: dict[str, tuple[list[float], list[tuple[float, ...]]]] = {}
        for name, pos in self.positions.items():
            c = self.contract(name)
            assert c is not None
            row = out.setdefault(c.base, {"delta": 0.0, "option_delta": 0.0, "gamma": 0.0,
                                          "vega_usd": 0.0, "theta_usd": 0.0,
                                          "options_unpriced": 0.0})
            if pos.size == 0.0:
                continue
            if not c.is_option:
                row["delta"] += pos.size * self._delta_per_amount(c)
            elif name in self._greeks and math.isfinite(self._greeks[name][1]):
                qs, gs = held.setdefault(c.base, ([], []))
                qs.append(pos.size)
                gs.append(self._greeks[name])
            else:
                row["options_unpriced"] += 1
        for base, (qs, gs) in held.items():
            arrays = [np.array(col) for col in zip(*gs, strict=True)]
            totals = portfolio_greeks(np.array(qs), Greeks(*arrays))
            row = out[base]
            row["option_delta"] = totals["delta"]
            row["delta"] += totals["delta"]
            row["gamma"] = totals["gamma"]
            row["vega_usd"] = totals["vega_per_vol_point"]
            row["theta_usd"] = totals["theta_per_day"]
        for base, row in out.items():
            row["delta_usd"] = row["delta"] * self.usd_rate(base)
        return out

    def measures(self) -> Measures:
        """The figures the limits apply to (NaN-free: an unknown USD value counts as 0)."""
        pos_usd, sizes = {}, {}
        for name, pos in self.positions.items():
            c = self.contract(name)
            assert c is not None
            notional = abs(pos.size) * self._notional_per_amount(c)
            pos_usd[name] = notional if math.isfinite(notional) else 0.0
            sizes[name] = pos.size
        greeks = self.greeks()
        finite = lambda x: x if math.isfinite(x) else 0.0  # noqa: E731
        return Measures(pos_usd, sizes, sum(pos_usd.values()),
                        {b: finite(g["delta_usd"]) for b, g in greeks.items()},
                        {b: finite(g["vega_usd"]) for b, g in greeks.items()},
                        finite(self.pnl()["drawdown_usd"]))

    def instrument_risk(self, name: str) -> InstrumentRisk | None:
        """What one unit of ``name`` adds to the measures (None: not traded by this book)."""
        c = self.contract(name)
        if c is None:
            return None
        pos = self.positions.get(name)
        usd = self.usd_rate(c.base)
        if c.inverse:  # size/mark coins, worth index each: ~1 USD of delta per USD of size
            usd = usd if math.isfinite(usd) else self.mark_price(name)
        vega = self._greeks.get(name, (math.nan,) * 6)[3] / 100.0 if c.is_option else 0.0
        return InstrumentRisk(name, c.base, pos.size if pos else 0.0,
                              self._notional_per_amount(c), self._delta_per_amount(c) * usd,
                              vega)

    def var(self) -> dict[str, Any]:
        """VaR/ES (USD, positive = loss) over the sampled P&L changes."""
        totals = np.array([p for _, p in self._samples], dtype=np.float64)
        out = var_summary(np.diff(totals), self.config.var_confidence)
        out["sample_s"] = self.config.var_sample_s
        return out

    def pnl_changes(self) -> np.ndarray:
        return np.diff(np.array([p for _, p in self._samples], dtype=np.float64))

    def status(self) -> str:
        """``ok``; ``no_marks`` before the first batch; ``missing_marks`` while an open
        position has no mark (it is valued at its last fill price)."""
        if not self.marks:
            return "no_marks"
        if any(p.size != 0.0 and n not in self.marks for n, p in self.positions.items()):
            return "missing_marks"
        return "ok"

    # ---- snapshots ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Journal-derived state only (marks and samples are live)."""
        return {"positions": {n: p.to_dict() for n, p in self.positions.items()},
                "counters": dict(self.counters), "peak_usd": self.peak_pnl_usd}

    def restore(self, data: Mapping[str, Any]) -> None:
        self.positions = {n: Position.from_dict(p) for n, p in data["positions"].items()}
        self.counters = dict(data["counters"])
        self.peak_pnl_usd = data["peak_usd"]

    def peak_event(self, ts_s: float, step_usd: float) -> dict[str, Any] | None:
        """A ``peak`` event when total P&L has risen ``step_usd`` above the journaled peak
        (the live peak, used for the drawdown, is exact; the journaled one lags by < step)."""
        total = self.total_pnl_usd()
        self._live_peak_usd = max(self._live_peak_usd, total)
        if math.isfinite(total) and total > self.peak_pnl_usd + step_usd:
            return {"t": "peak", "peak_usd": total, "ts": float(ts_s)}
        return None
