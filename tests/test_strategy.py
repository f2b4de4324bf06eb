"""The market maker: pure quote decisions against volatility and inventory, the state table
(pause and resume on volatility, on a REDUCING or HALTED risk book), the actor's steps and its
restart against a scripted desk (no Ray), and one run of the whole tree — maker, router, risk
book, connector and a venue simulator — that trades and ends with matching positions."""

from __future__ import annotations

import asyncio
import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from actors.router import CallFailed
from actors.strategy import (
    TRANSITIONS,
    MakerBook,
    MakerConfig,
    MakerConfigError,
    MakerMachine,
    MarketMaker,
    MMState,
    MMTrigger,
    Order,
    QuoteDecision,
    VolEstimate,
    classify,
    decide_quotes,
    plan_orders,
)
from actors.venue.clock import ManualClock
from actors.venue.process import VenueProcess
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.journal import open_store
from supervisors.spec import Backoff
from tests.conftest import wait_until

Q, W, P, R = MMState.QUOTING, MMState.WIDENED, MMState.PAUSED, MMState.REDUCING
CFG = MakerConfig()
BID, ASK = 50_000.0, 50_001.0


def quotes(decision: QuoteDecision) -> dict[str, Order]:
    return {o.direction: o for o in decision.orders if o.kind == "quote"}


# --- volatility -------------------------------------------------------------------------------
def test_vol_when_mid_constant_then_zero_and_when_returns_alternate_then_their_size() -> None:
    flat = VolEstimate(0.2)
    for _ in range(10):
        flat = flat.update(100.0)
    assert flat.samples == 9 and flat.vol_bps == 0.0
    vol = VolEstimate(0.2)
    mid = 100.0
    for i in range(50):
        mid *= math.exp(10e-4 if i % 2 else -10e-4)  # +-10 bps each interval
        vol = vol.update(mid)
    assert vol.vol_bps == pytest.approx(10.0, rel=1e-6)
    assert vol.update(float("nan")) == vol and vol.update(-1.0) == vol


# --- the state table --------------------------------------------------------------------------
def test_transitions_when_any_state_and_trigger_then_defined_and_risk_wins() -> None:
    assert set(TRANSITIONS) == set(itertools.product(MMState, MMTrigger))
    for state in MMState:
        assert TRANSITIONS[(state, MMTrigger.RISK_HALTED)] is P
        assert TRANSITIONS[(state, MMTrigger.RISK_REDUCING)] is R
        assert TRANSITIONS[(state, MMTrigger.EXTREME)] is P
        assert TRANSITIONS[(state, MMTrigger.NO_DATA)] is P
    assert TRANSITIONS[(P, MMTrigger.CALM)] is W  # a pause ends through WIDENED


def run_regimes(inputs: list[tuple[float, str]], cfg: MakerConfig = CFG) -> list[MMState]:
    """Drive a machine from PAUSED through ``(vol_bps, risk_state)`` inputs; the states."""
    machine, seen = MakerMachine(), []
    for t, (vol, risk) in enumerate(inputs):
        trigger, reason = classify(machine.state, vol, 10, 0.1, risk, cfg)
        machine.transition(trigger, float(t), reason)
        seen.append(machine.state)
    return seen


def test_machine_when_vol_rises_and_falls_then_widens_pauses_and_resumes_via_widened() -> None:
    vols = [1.0, 1.0, 6.0, 25.0, 18.0, 15.0, 3.0, 3.0]
    assert run_regimes([(v, "ACTIVE") for v in vols]) == [W, Q, W, P, P, W, Q, Q]
    # 18 bps < pause 20 but >= 0.8 * 20: still paused (hysteresis); 15 < 16 resumes


@pytest.mark.parametrize(("state", "vol", "want"), [
    (Q, 4.9, MMTrigger.CALM), (Q, 5.0, MMTrigger.VOLATILE), (W, 4.5, MMTrigger.VOLATILE),
    (W, 3.9, MMTrigger.CALM), (Q, 19.0, MMTrigger.VOLATILE), (Q, 20.0, MMTrigger.EXTREME),
    (P, 16.5, MMTrigger.EXTREME), (P, 15.9, MMTrigger.VOLATILE), (P, 3.0, MMTrigger.CALM),
])
def test_classify_when_vol_near_thresholds_then_hysteresis(state: MMState, vol: float,
                                                           want: MMTrigger) -> None:
    assert classify(state, vol, 10, 0.1, "ACTIVE", CFG)[0] is want


def test_machine_when_risk_book_reduces_or_halts_then_reducing_or_paused_until_it_clears(
        ) -> None:
    risks = ["ACTIVE", "ACTIVE", "REDUCING", "REDUCING", "ACTIVE", "HALTED", "REDUCING",
             "ACTIVE", "ACTIVE"]
    assert run_regimes([(1.0, r) for r in risks]) == [W, Q, R, R, Q, P, R, Q, Q]
    machine = MakerMachine(Q)
    trigger, reason = classify(Q, 1.0, 10, 0.1, "unreachable: timeout", CFG)
    assert trigger is MMTrigger.RISK_HALTED and "unreachable" in reason  # fail closed
    change = machine.transition(trigger, 7.0, reason)
    assert change.to_dict() == {"ts_s": 7.0, "from": "QUOTING", "to": "PAUSED",
                                "trigger": "risk_halted", "reason": reason}
    assert machine.transition(trigger, 8.0, reason) is None  # self-loop: nothing recorded
    assert list(machine.history) == [change]


def test_classify_when_marks_stale_or_warming_up_then_no_data() -> None:
    assert classify(Q, 1.0, 10, CFG.stale_after_s + 0.1, "ACTIVE", CFG)[0] is MMTrigger.NO_DATA
    assert classify(Q, 1.0, 10, math.inf, "ACTIVE", CFG)[0] is MMTrigger.NO_DATA
    trigger, reason = classify(Q, 1.0, 1, 0.1, "ACTIVE", CFG)
    assert trigger is MMTrigger.NO_DATA and "warming up" in reason


# --- quotes -----------------------------------------------------------------------------------
def test_quotes_when_vol_rises_then_spread_widens_and_widened_state_wider_still() -> None:
    spreads = []
    for vol in (0.0, 2.0, 5.0, 10.0):
        q = quotes(decide_quotes(Q, BID, ASK, vol, 0.0, CFG))
        spreads.append(q["sell"].price - q["buy"].price)
    assert spreads == sorted(spreads) and spreads[0] < spreads[-1]
    calm = quotes(decide_quotes(Q, BID, ASK, 6.0, 0.0, CFG))
    wide = quotes(decide_quotes(W, BID, ASK, 6.0, 0.0, CFG))
    assert wide["buy"].price < calm["buy"].price and wide["sell"].price > calm["sell"].price
    for o in (*calm.values(), *wide.values()):
        assert o.price / CFG.tick_size == int(o.price / CFG.tick_size)
        assert o.amount == CFG.quote_size and o.to_router(CFG.instrument)["post_only"]


def test_quotes_when_inventory_long_then_skewed_down_and_at_max_no_more_buying() -> None:
    flat = decide_quotes(Q, BID, ASK, 0.0, 0.0, CFG)
    long = decide_quotes(Q, BID, ASK, 0.0, 60.0, CFG)
    short = decide_quotes(Q, BID, ASK, 0.0, -60.0, CFG)
    assert long.reservation < flat.reservation < short.reservation
    assert quotes(long)["buy"].price <= quotes(flat)["buy"].price
    assert quotes(long)["sell"].price <= quotes(flat)["sell"].price
    near_max = quotes(decide_quotes(Q, BID, ASK, 0.0, 75.0, MakerConfig(hedge_fraction=0.9)))
    assert "buy" in near_max and quotes(decide_quotes(
        Q, BID, ASK, 0.0, 100.0, MakerConfig(hedge_fraction=1.0))).keys() == {"sell"}


def test_quotes_when_inventory_beyond_hedge_threshold_then_crossing_ioc() -> None:
    d = decide_quotes(Q, BID, ASK, 0.0, 90.0, CFG)  # > 0.8 * 100: back to 0.5 * 100
    hedge = next(o for o in d.orders if o.kind == "hedge")
    assert (hedge.direction, hedge.amount) == ("sell", 40.0) and hedge.price < BID
    # not reduce_only: the venue applies that to the account, which other strategies share
    assert hedge.to_router(CFG.instrument) == {
        "instrument": CFG.instrument, "direction": "sell", "amount": 40.0, "type": "limit",
        "price": hedge.price, "time_in_force": "immediate_or_cancel"}
    assert quotes(d).keys() == {"buy"}  # the hedge replaces the passive sell
    short = decide_quotes(Q, BID, ASK, 0.0, -90.0, CFG)
    assert next(o for o in short.orders if o.kind == "hedge").price > ASK


def test_quotes_when_reducing_then_only_the_reducing_side_and_paused_nothing() -> None:
    assert quotes(decide_quotes(R, BID, ASK, 0.0, 30.0, CFG)).keys() == {"sell"}
    assert quotes(decide_quotes(R, BID, ASK, 0.0, -5.0, CFG)) == {}  # below one contract
    assert quotes(decide_quotes(R, BID, ASK, 0.0, 0.0, CFG)) == {}
    assert decide_quotes(P, BID, ASK, 0.0, 30.0, CFG).orders == ()
    assert decide_quotes(Q, math.nan, ASK, 0.0, 0.0, CFG).orders == ()


def test_plan_when_live_quote_within_tolerance_then_kept_else_cancelled_and_replaced() -> None:
    d = decide_quotes(Q, BID, ASK, 0.0, 0.0, CFG)
    q = quotes(d)
    live = {"m.1": {"direction": "buy", "price": q["buy"].price + 1.0, "amount": 10.0},
            "m.2": {"direction": "sell", "price": q["sell"].price + 50.0, "amount": 10.0}}
    cancel, place = plan_orders(d, live, CFG)
    assert cancel == ["m.2"] and place == [q["sell"]]


def test_config_when_bad_value_then_error_names_field() -> None:
    for kwargs, name in [({"quote_size": 15.0}, "quote_size"), ({"ewma_alpha": 1.5},
                         "ewma_alpha"), ({"widen_vol_bps": 30.0}, "widen_vol_bps"),
                         ({"hedge_target_fraction": 0.9}, "hedge_target_fraction"),
                         ({"tick_size": float("nan")}, "tick_size")]:
        with pytest.raises(MakerConfigError, match=name):
            MakerConfig(**kwargs)
    with pytest.raises(MakerConfigError, match="colour"):
        MarketMaker(router="r", risk_book="b", config={"colour": 1})
    with pytest.raises(MakerConfigError, match="quote_size"):
        MarketMaker(router="r", risk_book="b", config={"quote_size": 20.0})


def test_book_when_quote_filled_in_parts_then_inventory_moves_and_quote_stops_being_live(
        ) -> None:
    book = MakerBook("BTC-PERPETUAL")
    order = Order("quote", "buy", 20.0, 100.0).to_router("BTC-PERPETUAL")
    book.apply({"t": "intent", "coid": "m.1", "kind": "quote", "order": order})
    book.apply({"t": "outcome", "coid": "m.1",
                "outcome": {"status": "accepted", "state": "open", "label": "L1"}})
    assert list(book.live) == ["m.1"] and not book.intents
    book.apply({"t": "fills", "fills": [{"trade_id": "T1", "signed": 10.0, "label": "L1"}]})
    assert book.inventory == 10.0 and "m.1" in book.live
    book.apply({"t": "fills", "fills": [{"trade_id": "T2", "signed": 10.0, "label": "L1"}]})
    assert book.inventory == 20.0 and not book.live
    again = MakerBook("BTC-PERPETUAL")
    again.restore(book.snapshot())
    assert again.snapshot() == book.snapshot()


# --- the actor against a scripted desk (no Ray) --------------------------------------------
class ScriptedDesk:
    """Stands in for ``ActorCalls``: a risk book with a settable state and an idempotent
    router that rests post-only orders and fills IOC ones; records every call."""

    def __init__(self) -> None:
        self.risk_state = "ACTIVE"
        self.routes: list[str] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.cancels: list[str] = []
        self.router_down = False

    async def call(self, path: str, method: str, *args: Any, timeout_s: float) -> Any:
        if method == "trading_state":
            return self.risk_state
        if method == "route":
            order, coid = args
            self.routes.append(coid)
            if self.router_down:
                raise CallFailed("root/router.route: died")
            self.outcomes.setdefault(coid, {
                "status": "accepted", "venue": "v1", "label": f"L-{coid}",
                "state": "open" if order.get("post_only") else "filled"})
            return self.outcomes[coid]
        if method == "cancel":
            self.cancels.append(args[0])
            return {"status": "accepted", "state": "cancelled"}
        raise AssertionError(f"unexpected call {path}.{method}")


def make_maker(tmp_path, desk: ScriptedDesk, clock: ManualClock) -> MarketMaker:
    mm = MarketMaker(router="root/router", risk_book="root/book", interval_s=1.0,
                     strategy_id="mm", clock=clock, calls=desk)
    url = f"sqlite://{tmp_path}"
    mm._bastion_recover(SimpleNamespace(stream="t/mm", store_url=url), open_store(url))
    return mm


def test_maker_when_stepped_then_warms_up_quotes_pauses_on_halt_and_cancels(tmp_path) -> None:
    desk, clock = ScriptedDesk(), ManualClock()
    mm = make_maker(tmp_path, desk, clock)

    async def steps(n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            clock.advance(1.0)
            mm.on_marks({"venue": "v1", "instrument": ["BTC-PERPETUAL", "ETH-PERPETUAL"],
                         "bid": [BID, 3000.0], "ask": [ASK, 3000.5]})
            out.append(await mm.step())
        return out

    ticks = asyncio.run(steps(5))
    assert [t["state"] for t in ticks] == ["PAUSED"] * 3 + ["WIDENED", "QUOTING"]
    assert "warming up" in ticks[0]["reason"] and ticks[3]["trigger"] == "calm"
    wide, narrow = ([o["client_order_id"] for o in t["sent"]] for t in ticks[3:])
    assert len(wide) == len(narrow) == 2
    assert ticks[4]["cancelled"] == wide and desk.cancels == wide  # requoted narrower
    seqs = [int(c.split(".")[1]) for c in desk.routes]  # ids: "mm.<journal seq of intent>"
    assert desk.routes == wide + narrow and seqs == sorted(set(seqs))
    assert sorted(lo["direction"] for lo in mm.book.live.values()) == ["buy", "sell"]
    buy = next(c for c, lo in mm.book.live.items() if lo["direction"] == "buy")
    fill = {"trade_id": "T1", "instrument_name": "BTC-PERPETUAL", "direction": "buy",
            "amount": 10.0, "label": f"L-{buy}"}
    assert mm.on_fills([fill] * 2) == 1 and mm.on_fills([fill]) == 0  # at least once: dedup
    assert mm.inventory() == 10.0 and buy not in mm.book.live  # the buy quote filled
    desk.risk_state = "HALTED"
    halted = asyncio.run(steps(1))[0]
    assert halted["state"] == "PAUSED" and halted["trigger"] == "risk_halted"
    assert halted["cancelled"] == [c for c in narrow if c != buy] and not mm.book.live
    assert [t["to"] for t in mm.transitions()] == ["WIDENED", "QUOTING", "PAUSED"]


def test_maker_when_restarted_with_unrouted_intent_then_same_id_routed_once_more(
        tmp_path) -> None:
    desk, clock = ScriptedDesk(), ManualClock()
    mm = make_maker(tmp_path, desk, clock)
    batch = {"venue": "v1", "instrument": ["BTC-PERPETUAL"], "bid": [BID], "ask": [ASK]}

    async def run(maker: MarketMaker, n: int) -> None:
        for _ in range(n):
            clock.advance(1.0)
            maker.on_marks(batch)
            await maker.step()

    desk.router_down = True
    asyncio.run(run(mm, 5))  # quotes from step 4 on; their route calls fail: left pending
    pending = list(mm.book.intents)
    assert len(pending) == 2 and desk.routes == pending * 2  # retried, and nothing new
    desk.router_down = False
    reborn = make_maker(tmp_path, desk, clock)  # a new incarnation, same journal
    assert list(reborn.book.intents) == pending
    asyncio.run(run(reborn, 1))
    assert not reborn.book.intents
    assert desk.routes == pending * 3  # settled under the same ids, never under new ones
    # the reborn maker warms up again (PAUSED), so the quotes it settled are cancelled
    assert reborn.state() == "PAUSED" and desk.cancels == pending and not reborn.book.live


# --- the whole tree with a venue simulator ----------------------------------------------------
KEYS = {"bastion-test": "s3cret-not-for-production"}


def maker_tree(venue: VenueProcess) -> SupervisorSpec:
    (cid, secret), = KEYS.items()
    fast = Backoff(initial_s=0.0)
    return SupervisorSpec(id="root", intensity=10, period_s=60, children=[
        ChildSpec(id="book", cls="actors.risk_book:RiskBook", backoff=fast,
                  kwargs={"book_id": "mm", "instruments": ["BTC-PERPETUAL"],
                          "limits": {"max_orders_per_s": 100.0}}),
        ChildSpec(id="deribit", cls="actors.connector:VenueConnector", backoff=fast,
                  kwargs={"venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                          "client_secret": secret, "instruments": ["BTC-PERPETUAL"],
                          "subscribers": ["root/book", "root/router", "root/mm"]}),
        ChildSpec(id="router", cls="actors.router:OrderRouter", backoff=fast,
                  kwargs={"venues": {"deribit": "root/deribit"}, "risk_book": "root/book"}),
        ChildSpec(id="mm", cls="actors.strategy:MarketMaker", backoff=fast,
                  kwargs={"router": "root/router", "risk_book": "root/book",
                          "quote_size": 10.0, "base_spread_bps": 1.0, "max_inventory": 50.0,
                          "interval_s": 0.2,
                          "config": {"hedge_fraction": 0.5, "hedge_target_fraction": 0.2,
                                     "pause_vol_bps": 200.0, "widen_vol_bps": 100.0}}),
    ])


def test_maker_when_run_against_a_venue_then_trades_and_positions_match_everywhere(
        namespace, store_url, trees) -> None:
    from tests.test_router import rpc

    with VenueProcess.start("mm-venue", seed=3, keys=KEYS, speedup=60.0) as venue:
        tree = start_tree(maker_tree(venue), namespace=namespace, store_url=store_url)
        trees.append(tree)

        def call(path: str, method: str, *args: Any) -> Any:
            return ray.get(getattr(tree.actor(path, 10), method).remote(*args), timeout=30)

        def traded() -> dict[str, Any] | None:
            st = call("root/mm", "status")
            return st if st["fills"] >= 4 and st["outcomes"].get("accepted", 0) >= 4 else None

        status = wait_until(traded, 45, "the maker's fills")
        assert {"WIDENED", "QUOTING"} & {t["to"] for t in status["transitions"]}
        call("root/book", "halt", "test", "stop the maker to compare positions")
        wait_until(lambda: call("root/mm", "state") == "PAUSED"
                   and not call("root/mm", "status")["live"], 20, "the maker PAUSED, no quotes")

        def positions() -> tuple[float, float, float] | None:
            ours = call("root/deribit", "positions").get("BTC-PERPETUAL", 0.0)
            theirs = float(rpc(venue, "private/get_position",
                               {"instrument_name": "BTC-PERPETUAL"})["size"])
            maker = call("root/mm", "inventory")
            return (ours, theirs, maker) if ours == theirs == maker else None

        ours, _, _ = wait_until(positions, 20, "connector == venue == maker inventory")
        assert abs(ours) <= 50.0 + 10.0  # the maker kept its inventory near its bound
        last = call("root/mm", "transitions")[-1]
        assert (last["to"], last["trigger"]) == ("PAUSED", "risk_halted")
