"""Pure core of a Deribit-like venue simulator: instruments, matching engine, market data.

No Ray, no network, no sleeping: time comes from an injected ``Clock``. The JSON-RPC/WebSocket
server that speaks Deribit API v2 wraps ``VenueEngine`` and adds latency.

    clock = ManualClock(start_s)
    engine = VenueEngine(VenueConfig(default_instruments(start_s)), clock)
    for batch in Pacer(ReplaySource(ReplayConfig(default_replay_series()), ...), clock).due():
        engine.on_market_data(batch)
    engine.buy("acct", "BTC-PERPETUAL", 100, price=43_000.0, label="c1")
"""

from actors.venue.clock import Clock, ManualClock, WallClock
from actors.venue.engine import VenueConfig, VenueConfigError, VenueEngine, VenueStats
from actors.venue.faults import Faults, FaultsError
from actors.venue.feed import BookUpdate, ChangeIdTracker, check_sequence
from actors.venue.instruments import (
    Instrument,
    InstrumentError,
    VolSurface,
    build_option_chain,
    default_instruments,
    option_expiries,
    perpetual,
    quote_option,
    spot,
)
from actors.venue.market_data import (
    DepthModel,
    ListSource,
    MarketDataError,
    MarketDataSource,
    OptionChainQuoter,
    Pacer,
    ReplayConfig,
    ReplaySeries,
    ReplaySource,
    Tick,
    TickBatch,
    default_data_dir,
    default_replay_series,
    load_ohlcv,
)
from actors.venue.records import Order, OrderResult, Position, Rejection, Trade
from actors.venue.synthetic import RegimeParams, SyntheticConfig, SyntheticSource

__all__ = [
    "BookUpdate", "ChangeIdTracker", "Clock", "DepthModel", "Faults", "FaultsError",
    "Instrument", "InstrumentError", "ListSource", "ManualClock", "MarketDataError",
    "MarketDataSource", "OptionChainQuoter", "Order", "OrderResult", "Pacer", "Position",
    "RegimeParams", "Rejection", "ReplayConfig", "ReplaySeries", "ReplaySource",
    "SyntheticConfig", "SyntheticSource", "Tick", "TickBatch", "Trade", "VenueConfig",
    "VenueConfigError", "VenueEngine", "VenueStats", "VolSurface", "WallClock",
    "build_option_chain", "check_sequence", "default_data_dir", "default_instruments",
    "default_replay_series", "load_ohlcv", "option_expiries", "perpetual", "quote_option",
    "spot",
]
