"""Venue market data: replay of the bundled real 1-minute slice (prices match the file, bad rows
skipped and counted), pacing, option quotes, and the seeded regime-switching generator."""

from __future__ import annotations

import gzip
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actors.venue import (
    ChangeIdTracker,
    DepthModel,
    ListSource,
    ManualClock,
    MarketDataError,
    OptionChainQuoter,
    Pacer,
    Rejection,
    ReplayConfig,
    ReplaySeries,
    ReplaySource,
    SyntheticConfig,
    SyntheticSource,
    TickBatch,
    VenueConfig,
    VenueEngine,
    VolSurface,
    build_option_chain,
    default_data_dir,
    default_instruments,
    default_replay_series,
    load_ohlcv,
)
from actors.venue.market_data import (
    BUNDLED_CRISIS_FILES,
    BUNDLED_DATA_DIR,
    SHARED_CRISIS_FILES,
    SHARED_DATA_DIR,
)

T_CRASH_DAY = pd.Timestamp("2021-05-19T00:00:00Z").timestamp()
BTC_SLICE = BUNDLED_DATA_DIR / BUNDLED_CRISIS_FILES["BTC"]
ETH_SLICE = BUNDLED_DATA_DIR / BUNDLED_CRISIS_FILES["ETH"]
INSTRUMENTS = {i.instrument_name: i for i in default_instruments(T_CRASH_DAY, 40_000.0)}


def replay(series: tuple[ReplaySeries, ...], start: str, end: str, steps: int = 4
           ) -> ReplaySource:
    config = ReplayConfig(series, steps_per_bar=steps, start_s=pd.Timestamp(start).timestamp(),
                          end_s=pd.Timestamp(end).timestamp())
    return ReplaySource(config, INSTRUMENTS)


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def file_bars(path: Path, start: str, end: str) -> pd.DataFrame:
    df = pd.read_csv(path, parse_dates=["timestamp"], index_col="timestamp")
    return df[(df.index >= pd.Timestamp(start)) & (df.index < pd.Timestamp(end))]


# --- the bundled slice ----------------------------------------------------------------------------
def test_bundled_slice_when_listed_then_small_and_readme_has_provenance() -> None:
    files = sorted(BUNDLED_DATA_DIR.glob("*.csv.gz"))
    assert [f.name for f in files] == sorted(BUNDLED_CRISIS_FILES.values())
    assert sum(f.stat().st_size for f in BUNDLED_DATA_DIR.iterdir()) <= 1_000_000
    readme = (BUNDLED_DATA_DIR / "README.md").read_text()
    assert "tooyipjee/freqtrade" in readme and "gzip -9n" in readme


def test_bundled_slice_when_loaded_then_clean_and_contains_the_crash_low() -> None:
    df, skipped = load_ohlcv(BTC_SLICE)
    assert skipped == {} and len(df) == 5561
    low = df.loc[df["low"].idxmin()]
    assert low["low"] == 30_000.0
    assert pd.Timestamp(low["ts_s"], unit="s", tz="UTC") == pd.Timestamp("2021-05-19T13:10Z")


@pytest.mark.skipif(not (SHARED_DATA_DIR / SHARED_CRISIS_FILES["BTC"]).is_file(),
                    reason="shared data folder not present")
def test_bundled_slice_when_compared_with_shared_file_then_rows_identical() -> None:
    for coin in ("BTC", "ETH"):
        with gzip.open(BUNDLED_DATA_DIR / BUNDLED_CRISIS_FILES[coin], "rt") as f:
            sliced = f.read().splitlines()
        with gzip.open(SHARED_DATA_DIR / SHARED_CRISIS_FILES[coin], "rt") as f:
            full = [line for line in f.read().splitlines()
                    if line[:10] >= "2021-05-17" or line.startswith("timestamp")]
        assert sliced == full


def test_default_data_dir_when_resolved_then_shared_if_present_else_bundled() -> None:
    data_dir = default_data_dir()
    assert data_dir in (SHARED_DATA_DIR, BUNDLED_DATA_DIR)
    series = default_replay_series()
    assert {s.instrument_name for s in series} == {"BTC-PERPETUAL", "BTC_USDC", "ETH-PERPETUAL",
                                                   "ETH_USDC"}
    assert all(s.path.is_file() for s in series)
    bundled = default_replay_series(BUNDLED_DATA_DIR)
    assert {s.path for s in bundled} == {BTC_SLICE, ETH_SLICE}


# --- replay ---------------------------------------------------------------------------------------
def test_replay_when_four_steps_per_bar_then_ticks_are_the_files_ohlc_path() -> None:
    start, end = "2021-05-19T12:00Z", "2021-05-19T14:00Z"
    src = replay((ReplaySeries("BTC_USDC", BTC_SLICE),), start, end)
    ticks = [b.ticks[0] for b in src.batches()]
    bars = file_bars(BTC_SLICE, start, end)
    assert len(ticks) == 4 * len(bars) == 480
    for (ts, bar), group in zip(bars.iterrows(), _chunks(ticks, 4), strict=True):
        o, h, lo, c = bar["open"], bar["high"], bar["low"], bar["close"]
        expected = [o, lo, h, c] if c >= o else [o, h, lo, c]
        assert [t.index_price for t in group] == expected
        assert [t.ts_s for t in group] == [ts.timestamp() + 15 * k for k in range(4)]
        for t in group:
            assert t.best_bid < t.index_price < t.best_ask
            assert t.last_price == round(t.index_price)  # BTC_USDC tick is 1.0
    assert min(t.index_price for t in ticks) == 30_000.0
    assert src.stats.batches == 480 and src.stats.rows_skipped == {}


def test_replay_when_one_step_per_bar_then_close_at_bar_end() -> None:
    start, end = "2021-05-19T13:00Z", "2021-05-19T13:30Z"
    src = replay((ReplaySeries("ETH-PERPETUAL", ETH_SLICE),), start, end, steps=1)
    ticks = [b.ticks[0] for b in src.batches()]
    bars = file_bars(ETH_SLICE, start, end)
    assert [t.index_price for t in ticks] == bars["close"].tolist()
    assert [t.ts_s for t in ticks] == [ts.timestamp() + 60 for ts in bars.index]


def test_replay_when_several_series_then_batches_group_instruments_by_time() -> None:
    src = replay(default_replay_series(BUNDLED_DATA_DIR), "2021-05-19T13:00Z",
                 "2021-05-19T13:05Z")
    batches = list(src.batches())
    assert len(batches) == 20
    for b in batches:
        assert [t.instrument_name for t in b.ticks] == ["BTC-PERPETUAL", "BTC_USDC",
                                                        "ETH-PERPETUAL", "ETH_USDC"]
        perp, spot = b.ticks[0], b.ticks[1]
        assert perp.index_price == spot.index_price
        assert perp.bids[0][1] % 10 == 0  # perp amounts in whole 10 USD contracts
    assert all(a.ts_s < b.ts_s for a, b in itertools.pairwise(batches))


def test_replay_when_file_has_bad_rows_then_skipped_counted_and_never_emitted(
        tmp_path: Path) -> None:
    rows = [
        "timestamp,open,high,low,close,volume",
        "2021-05-19T13:00:00Z,100.0,101.0,99.0,100.5,10",
        "2021-05-19T13:01:00Z,100.5,nan,99.0,100.0,10",  # NaN price
        "2021-05-19T13:02:00Z,100.5,101.0,-99.0,100.0,10",  # negative price
        "2021-05-19T13:03:00Z,0,101.0,99.0,100.0,10",  # zero price
        "not-a-time,100.5,101.0,99.0,100.0,10",  # bad timestamp
        "2021-05-19T13:04:00Z,100.5,100.0,99.0,100.7,10",  # high below close
        "2021-05-19T13:05:00Z,100.5,101.0,99.0,100.0,-1",  # negative volume
        "2021-05-19T13:05:00Z,100.0,101.0,99.0,100.0,10",  # ok
        "2021-05-19T13:05:00Z,100.0,101.0,99.0,100.0,10",  # repeated stamp
        "2021-05-19T13:04:30Z,100.0,101.0,99.0,100.0,10",  # backwards stamp
        "2021-05-19T13:06:00Z,abc,101.0,99.0,100.0,10",  # unparseable price
        "2021-05-19T13:07:00Z,100.0,102.0,98.0,101.0,10",
    ]
    path = tmp_path / "bad.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    src = ReplaySource(ReplayConfig((ReplaySeries("BTC_USDC", path),)), INSTRUMENTS)
    assert src.stats.rows_read == 12
    assert src.stats.rows_skipped == {"nan_price": 2, "non_positive_price": 2,
                                      "bad_timestamp": 1, "inconsistent_ohlc": 1,
                                      "bad_volume": 1, "unordered_timestamp": 2}
    ticks = [t for b in src.batches() for t in b.ticks]
    assert len(ticks) == 3 * 4
    for t in ticks:
        values = [t.index_price, t.last_price] + [p for p, _ in t.bids + t.asks]
        assert all(math.isfinite(v) and v > 0 for v in values)


def test_load_ohlcv_when_column_missing_then_error_names_it(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("timestamp,open,high,low,close\n2021-05-19T13:00:00Z,1,1,1,1\n")
    with pytest.raises(MarketDataError, match="volume"):
        load_ohlcv(path)


def test_depth_model_when_bar_range_grows_then_spread_widens_and_depth_thins() -> None:
    inst, model = INSTRUMENTS["BTC-PERPETUAL"], DepthModel()
    calm = model.levels(inst, 40_000.0, 10.0)
    crash = model.levels(inst, 40_000.0, 500.0)
    spread = [asks[0][0] - bids[0][0] for bids, asks in (calm, crash)]
    assert spread[1] > spread[0] > 0
    assert crash[0][0][1] < calm[0][0][1]
    bids, asks = calm
    assert len(bids) == len(asks) == model.n_levels
    assert [p for p, _ in bids] == sorted((p for p, _ in bids), reverse=True)
    assert [p for p, _ in asks] == sorted(p for p, _ in asks)
    with pytest.raises(MarketDataError, match="n_levels=0"):
        DepthModel(n_levels=0)


def test_replay_config_when_invalid_then_error_names_field() -> None:
    with pytest.raises(MarketDataError, match="steps_per_bar=0"):
        ReplayConfig((ReplaySeries("BTC_USDC", BTC_SLICE),), steps_per_bar=0)
    with pytest.raises(MarketDataError, match="series.instrument_name='BTCUSDT'"):
        ReplaySource(ReplayConfig((ReplaySeries("BTCUSDT", BTC_SLICE),)), INSTRUMENTS)


# --- pacing ---------------------------------------------------------------------------------------
def test_pacer_when_clock_advances_then_releases_due_batches_restamped() -> None:
    src = replay((ReplaySeries("BTC_USDC", BTC_SLICE),), "2021-05-19T13:00Z",
                 "2021-05-19T13:10Z")
    clock = ManualClock(1_700_000_000.0)
    pacer = Pacer(src, clock, speedup=60.0)
    first = pacer.due()
    assert len(first) == 1 and first[0].ts_s == 1_700_000_000.0
    assert first[0].source_ts_s == pd.Timestamp("2021-05-19T13:00Z").timestamp()
    clock.advance(1.0)  # one minute of data at 60x
    nxt = pacer.due()
    assert [b.ts_s for b in nxt] == [1_700_000_000.0 + k * 0.25 for k in range(1, 5)]
    assert all(t.ts_s == b.ts_s for b in nxt for t in b.ticks)
    clock.advance(1_000.0)
    assert len(pacer.due()) == 40 - 5 and pacer.exhausted
    with pytest.raises(MarketDataError, match="speedup=0"):
        Pacer(src, clock, speedup=0)


def test_replay_when_fed_to_engine_then_resting_bid_fills_in_the_crash() -> None:
    clock = ManualClock(T_CRASH_DAY)
    engine = VenueEngine(VenueConfig(tuple(INSTRUMENTS.values())), clock)
    src = replay(default_replay_series(BUNDLED_DATA_DIR), "2021-05-19T12:00Z",
                 "2021-05-19T14:00Z")
    tracker = ChangeIdTracker()
    batches = iter(src.batches())
    engine.on_market_data(next(batches))
    order = engine.buy("A", "BTC-PERPETUAL", 1000, price=31_000.0, label="dip")
    assert not isinstance(order, Rejection) and order.order.order_state == "open"
    for batch in batches:
        clock.set(max(clock.now_s(), batch.ts_s))
        engine.on_market_data(batch)
        for update in engine.drain_book_updates():
            assert tracker.accept(update) in ("snapshot", "ok")
    state = engine.get_order_state("A", order.order.order_id)
    assert not isinstance(state, Rejection)
    assert (state.order_state, state.average_price) == ("filled", 31_000.0)
    position = engine.get_position("A", "BTC-PERPETUAL")
    assert not isinstance(position, Rejection) and position.size == 1000.0
    assert engine.stats.ticks_skipped == {}


# --- synthetic generator --------------------------------------------------------------------------
def _take(source: SyntheticSource, n: int) -> list[TickBatch]:
    return list(itertools.islice(source.batches(), n))


def test_synthetic_when_same_seed_then_identical_else_different() -> None:
    cfg = SyntheticConfig(seed=11, chunk_steps=128)
    a = _take(SyntheticSource(cfg, INSTRUMENTS), 300)
    b = _take(SyntheticSource(cfg, INSTRUMENTS), 300)
    c = _take(SyntheticSource(SyntheticConfig(seed=12, chunk_steps=128), INSTRUMENTS), 300)
    assert a == b and a != c
    assert [t.instrument_name for t in a[0].ticks] == ["BTC-PERPETUAL", "BTC_USDC",
                                                       "ETH-PERPETUAL", "ETH_USDC"]
    perp, spot = a[0].ticks[0], a[0].ticks[1]
    assert perp.mid > spot.mid  # the perp carries the basis


def test_synthetic_when_regimes_switch_then_stressed_vol_exceeds_calm_vol() -> None:
    cfg = SyntheticConfig(seed=3, step_s=60.0, n_steps=40_000,
                          calm_mean_duration_s=6 * 3600.0, stressed_mean_duration_s=2 * 3600.0)
    src = SyntheticSource(cfg, {"BTC_USDC": INSTRUMENTS["BTC_USDC"]})
    batches = list(src.batches())
    assert len(batches) == 40_000 and sum(src.regime_counts.values()) == 40_000
    price = np.array([b.ticks[0].index_price for b in batches])
    stressed = np.array([b.regime == "stressed" for b in batches])
    ret = np.diff(np.log(price))
    in_stress = stressed[1:]
    calm_vol = ret[~in_stress].std() * math.sqrt(365 * 1440)
    stress_vol = ret[in_stress].std() * math.sqrt(365 * 1440)
    assert stress_vol > 2.0 * calm_vol
    assert calm_vol == pytest.approx(0.5, rel=0.35)  # jumps add a little to the diffusion
    assert stressed.mean() == pytest.approx(0.25, abs=0.08)  # 2 h / (6 h + 2 h)
    assert src.regime_counts["stressed"] == int(stressed.sum())
    switches = int(np.sum(stressed[1:] != stressed[:-1]))
    assert 40 <= switches <= 200  # about 2 * 40000 min / 480 min = 167 expected
    spreads = np.array([b.ticks[0].best_ask - b.ticks[0].best_bid for b in batches])
    assert spreads[stressed].mean() > spreads[~stressed].mean()


def test_synthetic_config_when_invalid_then_error_names_field() -> None:
    with pytest.raises(MarketDataError, match="step_s=0"):
        SyntheticConfig(step_s=0)
    with pytest.raises(MarketDataError, match="correlation=2"):
        SyntheticConfig(correlation=2)
    with pytest.raises(MarketDataError, match="initial_prices"):
        SyntheticConfig(initial_prices=(("BTC", -1.0),))


def test_synthetic_when_driving_engine_then_book_sequence_stays_continuous() -> None:
    clock = ManualClock(1_700_000_000.0)
    engine = VenueEngine(VenueConfig(tuple(INSTRUMENTS.values()), seed=1), clock)
    src = SyntheticSource(SyntheticConfig(seed=5, n_steps=500), INSTRUMENTS)
    tracker = ChangeIdTracker()
    for i, batch in enumerate(src.batches()):
        clock.set(batch.ts_s)
        engine.on_market_data(batch)
        if i % 25 == 0:
            side = engine.buy if i % 50 == 0 else engine.sell
            assert not isinstance(side("A", "ETH-PERPETUAL", 5, type="market"), Rejection)
        for update in engine.drain_book_updates():
            assert tracker.accept(update) in ("snapshot", "ok")
    assert engine.stats.ticks_applied == 500 * 4 and engine.stats.trades >= 20


# --- option quotes --------------------------------------------------------------------------------
def test_option_quoter_when_underlying_ticks_then_chain_quoted_and_stress_lifts_vol() -> None:
    t0 = 1_700_000_000.0
    chain = build_option_chain("BTC", 40_000.0, t0)
    insts = {i.instrument_name: i for i in default_instruments(t0, 40_000.0)}
    cfg = SyntheticConfig(seed=2, start_s=t0, n_steps=3)
    quoted = list(OptionChainQuoter(SyntheticSource(cfg, insts), chain, VolSurface()).batches())
    options = [t for t in quoted[0].ticks if t.instrument_name in {i.instrument_name
                                                                   for i in chain}]
    assert len(options) == len(chain)
    for t in options:
        assert t.asks and t.mark_iv is not None and 0.05 <= t.mark_iv <= 5.0
        if t.bids:
            assert t.best_bid < t.best_ask
    calm = quoted[0]
    stressed = TickBatch(calm.ts_s, calm.ticks[:4], calm.source_ts_s, "stressed")
    lifted = next(OptionChainQuoter(ListSource([stressed]), chain, VolSurface()).batches())
    iv = {t.instrument_name: t.mark_iv for t in options}
    assert all(t.mark_iv == pytest.approx(iv[t.instrument_name] * 1.5, rel=1e-5)
               for t in lifted.ticks[4:])
    engine = VenueEngine(VenueConfig(tuple(insts.values())), ManualClock(t0))
    engine.on_market_data(calm)
    book = engine.ticker(options[0].instrument_name)
    assert not isinstance(book, Rejection) and book["mark_iv"] == pytest.approx(
        options[0].mark_iv * 100)
