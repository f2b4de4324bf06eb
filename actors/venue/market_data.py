"""Market data for the venue: batches of ticks from real history or a synthetic generator.

A ``MarketDataSource`` yields ``TickBatch``es in source time; ``Pacer`` maps them onto the venue
clock at a chosen speed-up. A ``Tick`` carries the external liquidity of one instrument (a few
price levels per side, in the instrument's own amount units), the last trade and the index.

**Replay** (``ReplaySource``) plays the real 1-minute OHLCV files documented in
``shared/data/README.md`` (default: ``../shared/data`` next to the repo when present, else the
small slice bundled in ``actors/venue/data/``). The files are bars, not quotes, so each bar is
turned into ``steps_per_bar`` ticks deterministically:

* the price path visits open -> low -> high -> close when the bar closed up (close >= open),
  else open -> high -> low -> close, linearly between those anchors; tick ``k`` of the bar is
  stamped ``bar_open + k * bar_s / steps_per_bar`` at path position ``3k / (steps_per_bar - 1)``,
  so with 4 steps the ticks are exactly O, L, H, C (one step: the close at the bar's end);
* ``index_price`` is that path price (as in the file, times ``1 + basis_bps/1e4`` when a series
  sets a basis); bid/ask come from ``DepthModel``: a half-spread of
  ``max(min_half_spread_bps, range_spread_coef * bar_range_bps)`` around it, rounded outward to
  the tick, ``n_levels`` levels ``level_step_bps`` apart, each worth
  ``level_notional_usd * (1 + level) / (1 + bar_range_bps / depth_halving_range_bps)``;
* ``last_amount`` is the bar volume spread evenly over its ticks.

Bad rows (unparseable stamp, NaN or non-positive price, inconsistent OHLC, NaN or negative
volume, repeated or backwards stamp) are skipped and counted in ``stats.rows_skipped`` by
reason; they never reach a tick.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from actors.venue.clock import Clock
from actors.venue.instruments import Instrument, VolSurface, quote_option

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"
SHARED_CRISIS_FILES = {
    "BTC": "crisis_1m/binance_spot_BTCUSDT_1m_2021-04-20_2021-05-20.csv.gz",
    "ETH": "crisis_1m/binance_spot_ETHUSDT_1m_2021-04-20_2021-05-20.csv.gz",
}
BUNDLED_CRISIS_FILES = {
    "BTC": "binance_spot_BTCUSDT_1m_2021-05-17_2021-05-20.csv.gz",
    "ETH": "binance_spot_ETHUSDT_1m_2021-05-17_2021-05-20.csv.gz",
}
OHLCV_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")


class MarketDataError(ValueError):
    """A market-data configuration or file is unusable; names the field and the value."""

    def __init__(self, where: str, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"{where}: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class Tick:
    """External market of one instrument at ``ts_s``: levels ``(price, amount)`` best first."""

    ts_s: float
    instrument_name: str
    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]
    last_price: float | None = None
    last_amount: float = 0.0
    index_price: float | None = None
    mark_iv: float | None = None

    @property
    def best_bid(self) -> float | None:
        return self.bids[0][0] if self.bids else None

    @property
    def best_ask(self) -> float | None:
        return self.asks[0][0] if self.asks else None

    @property
    def mid(self) -> float | None:
        if not self.bids or not self.asks:
            return None
        return (self.bids[0][0] + self.asks[0][0]) / 2.0


@dataclass(frozen=True)
class TickBatch:
    """Ticks that share a timestamp. ``source_ts_s`` is the data time before pacing;
    ``regime`` is the synthetic generator's regime (``None`` for replay)."""

    ts_s: float
    ticks: tuple[Tick, ...]
    source_ts_s: float | None = None
    regime: str | None = None


@dataclass
class SourceStats:
    rows_read: int = 0
    rows_skipped: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    ticks: int = 0


class MarketDataSource(Protocol):
    """Anything that yields tick batches in increasing source time."""

    stats: SourceStats

    def batches(self) -> Iterator[TickBatch]: ...


def _check_positive(where: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise MarketDataError(where, name, value, "must be finite and > 0")


@dataclass(frozen=True)
class DepthModel:
    """Synthetic spread and depth around a reference price (formulas in the module doc)."""

    min_half_spread_bps: float = 1.0
    range_spread_coef: float = 0.05
    n_levels: int = 5
    level_step_bps: float = 2.0
    level_notional_usd: float = 50_000.0
    depth_halving_range_bps: float = 50.0

    def __post_init__(self) -> None:
        _check_positive("DepthModel", self, "min_half_spread_bps", "level_step_bps",
                        "level_notional_usd", "depth_halving_range_bps")
        if not math.isfinite(self.range_spread_coef) or self.range_spread_coef < 0:
            raise MarketDataError("DepthModel", "range_spread_coef", self.range_spread_coef,
                                  "must be finite and >= 0")
        if not isinstance(self.n_levels, int) or not 1 <= self.n_levels <= 50:
            raise MarketDataError("DepthModel", "n_levels", self.n_levels, "must be 1..50")

    def levels(self, inst: Instrument, mid: float, range_bps: float
               ) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]:
        half_bps = max(self.min_half_spread_bps, self.range_spread_coef * range_bps)
        bid0 = inst.floor_ticks(mid * (1.0 - half_bps / 1e4))
        ask0 = max(inst.ceil_ticks(mid * (1.0 + half_bps / 1e4)), bid0 + 1)
        step = max(1, round(mid * self.level_step_bps / 1e4 / inst.tick_size))
        depth = 1.0 / (1.0 + range_bps / self.depth_halving_range_bps)
        bids, asks = [], []
        for i in range(self.n_levels):
            notional = self.level_notional_usd * (1 + i) * depth
            amount = inst.lots_to_amount(inst.lots_for_notional_usd(notional, mid))
            if bid0 - i * step >= 1:
                bids.append((inst.ticks_to_price(bid0 - i * step), amount))
            asks.append((inst.ticks_to_price(ask0 + i * step), amount))
        return tuple(bids), tuple(asks)


# --- historical files ---------------------------------------------------------------------------
def load_ohlcv(path: Path | str) -> tuple[pd.DataFrame, Counter[str]]:
    """Read one OHLCV CSV(.gz) as documented in shared/data/README.md.

    Returns the clean rows (``ts_s`` float seconds plus open/high/low/close/volume) and the
    count of skipped rows by reason. A missing column raises ``MarketDataError``."""
    raw = pd.read_csv(path, dtype=str)
    missing = [c for c in OHLCV_COLUMNS if c not in raw.columns]
    if missing:
        raise MarketDataError(str(path), "columns", missing, "missing OHLCV columns")
    skipped: Counter[str] = Counter()
    ts = pd.to_datetime(raw["timestamp"], utc=True, errors="coerce", format="ISO8601")
    num = {c: pd.to_numeric(raw[c], errors="coerce").to_numpy(dtype=float)
           for c in OHLCV_COLUMNS[1:]}
    o, h, lo, c, v = (num[k] for k in ("open", "high", "low", "close", "volume"))
    prices = np.stack([o, h, lo, c])
    reasons = [
        ("bad_timestamp", ts.isna().to_numpy()),
        ("nan_price", np.isnan(prices).any(axis=0)),
        ("non_positive_price", (prices <= 0).any(axis=0)),
        ("inconsistent_ohlc", (h < np.maximum(o, c)) | (lo > np.minimum(o, c))),
        ("bad_volume", np.isnan(v) | (v < 0)),
    ]
    keep = np.ones(len(raw), dtype=bool)
    for reason, bad in reasons:
        hit = bad & keep
        skipped[reason] += int(hit.sum())
        keep &= ~hit
    ts_s = ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(1, "s")).to_numpy(dtype=float)
    out = pd.DataFrame({"ts_s": ts_s, "open": o, "high": h, "low": lo, "close": c,
                        "volume": v})[keep].reset_index(drop=True)
    stamps = out["ts_s"].to_numpy()  # a stamp not after every earlier one is out of order
    before = np.concatenate([[-np.inf], np.maximum.accumulate(stamps)[:-1]])
    order_ok = stamps > before
    skipped["unordered_timestamp"] += int((~order_ok).sum())
    return out[order_ok].reset_index(drop=True), +skipped


def bar_path(df: pd.DataFrame, steps_per_bar: int, bar_s: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic intra-bar path: ``(ts_s, price, bar_index)`` per tick (module doc)."""
    o, h, lo, c = (df[k].to_numpy() for k in ("open", "high", "low", "close"))
    up = c >= o
    # the close is repeated so that every anchor is hit with frac == 0 (exact file values)
    anchors = np.stack([o, np.where(up, lo, h), np.where(up, h, lo), c, c], axis=1)
    n = len(df)
    if steps_per_bar == 1:
        ts = df["ts_s"].to_numpy() + bar_s
        return ts, c.copy(), np.arange(n)
    pos = np.arange(steps_per_bar) * 3.0 / (steps_per_bar - 1)
    seg = np.minimum(np.floor(pos).astype(int), 3)
    frac = pos - seg
    price = anchors[:, seg] + frac * (anchors[:, seg + 1] - anchors[:, seg])
    ts = df["ts_s"].to_numpy()[:, None] + np.arange(steps_per_bar) * (bar_s / steps_per_bar)
    return ts.ravel(), price.ravel(), np.repeat(np.arange(n), steps_per_bar)


def default_data_dir() -> Path:
    """``../shared/data`` relative to the repo root when present, else the bundled slice."""
    if (SHARED_DATA_DIR / SHARED_CRISIS_FILES["BTC"]).is_file():
        return SHARED_DATA_DIR
    return BUNDLED_DATA_DIR


@dataclass(frozen=True)
class ReplaySeries:
    """One instrument fed from one OHLCV file; ``basis_bps`` shifts its prices (a perp premium)."""

    instrument_name: str
    path: Path
    basis_bps: float = 0.0


def default_replay_series(data_dir: Path | None = None) -> tuple[ReplaySeries, ...]:
    """BTC/ETH 2021-05 China-ban crisis 1-minute files feeding the perpetuals and spot pairs
    (the same Binance spot series for both; perps carry no basis)."""
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    files = SHARED_CRISIS_FILES if (data_dir / SHARED_CRISIS_FILES["BTC"]).is_file() else (
        BUNDLED_CRISIS_FILES)
    out = []
    for coin, rel in files.items():
        path = data_dir / rel
        out += [ReplaySeries(f"{coin}-PERPETUAL", path), ReplaySeries(f"{coin}_USDC", path)]
    return tuple(out)


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay: series, the window ``[start_s, end_s)`` of bar open times (``None``:
    all), ticks per bar, bar length and the depth model."""

    series: tuple[ReplaySeries, ...]
    steps_per_bar: int = 4
    bar_s: float = 60.0
    start_s: float | None = None
    end_s: float | None = None
    depth: DepthModel = field(default_factory=DepthModel)

    def __post_init__(self) -> None:
        object.__setattr__(self, "series", tuple(self.series))
        if not self.series:
            raise MarketDataError("ReplayConfig", "series", self.series, "must not be empty")
        if not isinstance(self.steps_per_bar, int) or not 1 <= self.steps_per_bar <= 600:
            raise MarketDataError("ReplayConfig", "steps_per_bar", self.steps_per_bar,
                                  "must be an int in 1..600")
        _check_positive("ReplayConfig", self, "bar_s")


class ReplaySource:
    """Replays historical bars as ticks (see module doc). Files are read once, at start."""

    def __init__(self, config: ReplayConfig, instruments: Mapping[str, Instrument]) -> None:
        self.config = config
        self.stats = SourceStats()
        self._instruments = instruments
        for s in config.series:
            if s.instrument_name not in instruments:
                raise MarketDataError("ReplayConfig", "series.instrument_name",
                                      s.instrument_name, "not a listed instrument")
        frames: dict[Path, pd.DataFrame] = {}
        #: median bar volume of each whole file (before the window): the yardstick of how busy
        #: the market is at a replayed bar (``activity``)
        self.median_volume: dict[Path, float] = {}
        for path in dict.fromkeys(Path(s.path) for s in config.series):
            df, skipped = load_ohlcv(path)
            self.stats.rows_read += len(df) + sum(skipped.values())
            self.stats.rows_skipped.update(skipped)
            median = float(df["volume"].median()) if len(df) else 0.0
            self.median_volume[path] = median if np.isfinite(median) and median > 0 else 1.0
            if config.start_s is not None:
                df = df[df["ts_s"] >= config.start_s]
            if config.end_s is not None:
                df = df[df["ts_s"] < config.end_s]
            frames[path] = df.reset_index(drop=True)
        self._frames = frames
        self._activity_of: dict[str, float] = {}

    def activity(self, tick: Tick) -> float | None:
        """How busy the market is at this tick: its bar's volume over the file's median bar
        volume (1.0 = a median minute; a crash minute is often 10x or more)."""
        ref = self._activity_of.get(tick.instrument_name)
        if not ref:
            return None
        volume = tick.last_amount
        inst = self._instruments[tick.instrument_name]
        if inst.has_inverse_pnl and tick.last_price:
            volume /= tick.last_price  # ticks carry inverse volume in USD
        return volume / ref

    def frame(self, path: Path | str) -> pd.DataFrame:
        """The clean bars replayed from ``path`` (after the window)."""
        return self._frames[Path(path)]

    def batches(self) -> Iterator[TickBatch]:
        cfg = self.config
        parts = []
        for k, s in enumerate(cfg.series):
            df = self._frames[Path(s.path)]
            ts, price, bar = bar_path(df, cfg.steps_per_bar, cfg.bar_s)
            price = price * (1.0 + s.basis_bps / 1e4)
            close = df["close"].to_numpy()[bar]
            range_bps = (df["high"].to_numpy() - df["low"].to_numpy())[bar] / close * 1e4
            volume = df["volume"].to_numpy()[bar] / cfg.steps_per_bar
            self._activity_of[s.instrument_name] = self.median_volume[Path(s.path)] / (
                cfg.steps_per_bar)
            parts.append((ts, np.full(len(ts), k), price, range_bps, volume))
        ts_all = np.concatenate([p[0] for p in parts])
        series = np.concatenate([p[1] for p in parts])
        price_all = np.concatenate([p[2] for p in parts])
        range_all = np.concatenate([p[3] for p in parts])
        vol_all = np.concatenate([p[4] for p in parts])
        order = np.lexsort((series, ts_all))
        i, n = 0, len(order)
        while i < n:
            t = ts_all[order[i]]
            ticks = []
            while i < n and ts_all[order[i]] == t:
                j = order[i]
                s = cfg.series[series[j]]
                ticks.append(self._tick(self._instruments[s.instrument_name], float(t),
                                        float(price_all[j]), float(range_all[j]),
                                        float(vol_all[j])))
                i += 1
            self.stats.batches += 1
            self.stats.ticks += len(ticks)
            yield TickBatch(float(t), tuple(ticks), source_ts_s=float(t))

    def _tick(self, inst: Instrument, t: float, price: float, range_bps: float,
              volume: float) -> Tick:
        bids, asks = self.config.depth.levels(inst, price, range_bps)
        last_ticks = max(1, round(price / inst.tick_size))
        last_amount = volume * price if inst.has_inverse_pnl else volume
        return Tick(t, inst.instrument_name, bids, asks, inst.ticks_to_price(last_ticks),
                    last_amount, price)


# --- pacing and derived quotes -------------------------------------------------------------------
class Pacer:
    """Releases a source's batches on the venue clock: a batch ``d`` seconds of source time
    after the first one is due ``d / speedup`` seconds after ``start_s``; released batches are
    re-stamped to venue time (``source_ts_s`` keeps the data time)."""

    def __init__(self, source: MarketDataSource, clock: Clock, speedup: float = 1.0,
                 start_s: float | None = None) -> None:
        if not isinstance(speedup, int | float) or not math.isfinite(speedup) or speedup <= 0:
            raise MarketDataError("Pacer", "speedup", speedup, "must be finite and > 0")
        self._it = iter(source.batches())
        self._clock = clock
        self._speedup = float(speedup)
        self._start_s = clock.now_s() if start_s is None else start_s
        self._t0: float | None = None
        self._next: TickBatch | None = None
        self.exhausted = False

    def due(self, max_batches: int | None = None) -> list[TickBatch]:
        out: list[TickBatch] = []
        elapsed_s = (self._clock.now_s() - self._start_s) * self._speedup
        while max_batches is None or len(out) < max_batches:
            if self._next is None:
                self._next = next(self._it, None)
                if self._next is None:
                    self.exhausted = True
                    break
                if self._t0 is None:
                    self._t0 = self._next.ts_s
            assert self._t0 is not None
            offset_s = self._next.ts_s - self._t0
            if offset_s > elapsed_s:
                break
            venue_ts = self._start_s + offset_s / self._speedup
            batch = self._next
            self._next = None
            out.append(TickBatch(venue_ts, tuple(replace(t, ts_s=venue_ts) for t in batch.ticks),
                                 source_ts_s=batch.source_ts_s if batch.source_ts_s is not None
                                 else batch.ts_s, regime=batch.regime))
        return out


class OptionChainQuoter:
    """Adds option ticks, quoted from a ``VolSurface`` off the underlying's mid, to each batch
    that carries the underlying (at most every ``requote_interval_s`` of source time). Vols are
    multiplied by ``stressed_vol_multiplier`` in batches marked ``regime="stressed"``. Level
    ``i`` is ``i * level_step_ticks`` ticks behind the best with ``level_amount * (1 + i)``."""

    def __init__(self, source: MarketDataSource, chain: Iterable[Instrument],
                 surface: VolSurface, *, underlying: str = "BTC-PERPETUAL",
                 spread_vol: float = 0.02, n_levels: int = 3, level_amount: float = 5.0,
                 level_step_ticks: int = 5, stressed_vol_multiplier: float = 1.5,
                 requote_interval_s: float = 0.0) -> None:
        self._source = source
        self.stats = source.stats
        self._chain = tuple(i for i in chain if i.kind == "option")
        self._surface = surface
        self._underlying = underlying
        self._spread_vol = spread_vol
        self._n_levels = n_levels
        self._level_amount = level_amount
        self._step = level_step_ticks
        self._stressed = stressed_vol_multiplier
        self._interval_s = requote_interval_s
        self._last_quote_s = -math.inf

    def batches(self) -> Iterator[TickBatch]:
        for batch in self._source.batches():
            under = next((t for t in batch.ticks if t.instrument_name == self._underlying), None)
            if (under is None or under.mid is None
                    or batch.ts_s - self._last_quote_s < self._interval_s):
                yield batch
                continue
            self._last_quote_s = batch.ts_s
            mult = self._stressed if batch.regime == "stressed" else 1.0
            extra = [t for inst in self._chain
                     if (t := self._quote(inst, under.mid, batch.ts_s, mult)) is not None]
            yield replace(batch, ticks=batch.ticks + tuple(extra))

    def _quote(self, inst: Instrument, forward: float, t: float, mult: float) -> Tick | None:
        q = quote_option(inst, forward, t, self._surface, spread_vol=self._spread_vol,
                         vol_multiplier=mult)
        if q is None:
            return None
        bid_t = inst.price_to_ticks(q.bid_price) or 0
        ask_t = inst.price_to_ticks(q.ask_price) or 1
        bids, asks = [], []
        for i in range(self._n_levels):
            amount = inst.lots_to_amount(max(1, round(self._level_amount * (1 + i)
                                                      / inst.min_trade_amount)))
            if bid_t - i * self._step >= 1:
                bids.append((inst.ticks_to_price(bid_t - i * self._step), amount))
            asks.append((inst.ticks_to_price(ask_t + i * self._step), amount))
        return Tick(t, inst.instrument_name, tuple(bids), tuple(asks), None, 0.0, forward,
                    q.mark_iv)


class ListSource:
    """A fixed list of batches (tests, recorded sessions)."""

    def __init__(self, batches: Iterable[TickBatch]) -> None:
        self._batches = tuple(batches)
        self.stats = SourceStats(batches=len(self._batches),
                                 ticks=sum(len(b.ticks) for b in self._batches))

    def batches(self) -> Iterator[TickBatch]:
        return iter(self._batches)
