"""Geographically redundant failover, end to end on one machine: two sites, each its own Ray
cluster, one heartbeat mesh with a witness, a shared venue. The venue's own record of trades is
the judge: which site's orders it executed, under which epoch, and when."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from actors.venue.process import VenueProcess
from cluster.multisite import MultiSite, connector_streams, failover_tree, trades_by_site
from tests.conftest import wait_until
from tests.test_connector import rpc

KEYS = {"bastion-test": "s3cret-not-for-production"}


def by_site(venue: VenueProcess) -> dict[str, list[tuple[int, int]]]:
    """site -> [(timestamp_ms, epoch)] of its trades, from the venue's own record."""
    return trades_by_site(lambda method, params: rpc(venue, method, params))


@pytest.mark.slow
def test_site_when_cut_off_then_standby_takes_over_after_the_lease_with_no_overlap(
        tmp_path: Path) -> None:
    import ray

    from supervisors import start_tree

    (cid, secret), = KEYS.items()
    with VenueProcess.start("deribit", seed=11, keys=KEYS, speedup=60.0) as venue:
        sites = MultiSite.start({"tokyo": 1, "london": 1}, tmp_path / "ms",
                                resources=["deribit"], preferred={"deribit": "tokyo"})
        try:
            for name in sites.sites:
                with sites.use(name):
                    start_tree(failover_tree(name, "deribit", venue.ws_url, cid, secret),
                               namespace="bastion", store_url=f"sqlite://{tmp_path / name}")
            sites.enable_roles({name: {"deribit": [(f"site-{name}/deribit", "bastion")]}
                                for name in sites.sites})
            sites.enable_replication(
                "deribit", {name: f"sqlite://{tmp_path / name}" for name in sites.sites},
                {name: connector_streams(name, "deribit") for name in sites.sites})

            # The preferred site trades; the other stands by.
            wait_until(lambda: len(by_site(venue).get("tokyo", [])) >= 20, 60,
                       "tokyo (preferred) trading")
            assert "london" not in by_site(venue)

            t_cut_ms = sites.cut_off("tokyo") * 1000  # when tokyo's own agents were cut
            wait_until(lambda: len(by_site(venue).get("london", [])) >= 20, 30,
                       "london trading after tokyo was cut off")
            trades = by_site(venue)
            tokyo, london = trades["tokyo"], trades["london"]
            last_tokyo_ms, first_london_ms = max(t for t, _ in tokyo), min(t for t, _ in london)
            rto_s = (first_london_ms - t_cut_ms) / 1000
            timing = (f"cut at {t_cut_ms:.0f}, tokyo's last trade +{last_tokyo_ms - t_cut_ms:.0f}"
                      f" ms, london's first +{first_london_ms - t_cut_ms:.0f} ms")
            # Never two active sites: every tokyo trade precedes every london trade.
            assert last_tokyo_ms < first_london_ms, timing
            # Tokyo stopped by itself within its lease (1 s with the local preset).
            assert last_tokyo_ms - t_cut_ms < 1000, timing
            assert 0 < rto_s < 6.0, timing  # the goal is <= 3 s; bench reports the figure
            assert max(e for _, e in tokyo) < min(e for _, e in london), (tokyo[-1], london[0])
            engine = rpc(venue, "public/simulator/status")["engine"]
            assert engine["duplicate_labels"] == 0
            assert engine["fenced_orders"] == 0  # the gate stopped tokyo before the venue had to
            # London rebuilt tokyo's orders from the replicated journal before the venue.
            with sites.use("london"):
                status = ray.get(ray.get_actor("site-london/deribit", namespace="bastion")
                                 .status.remote(), timeout=10)
            imported = status["replica"]["last_import"]
            assert imported and imported["records"] >= 20, status["replica"]
            assert imported["events"].get("intent", 0) >= 1, imported
            assert status["replica"]["imported_upto"] >= imported["records"]

            # Heal: exactly one active site (london); no automatic failback.
            sites.heal()
            n_london = len(london)
            wait_until(lambda: len(by_site(venue)["london"]) >= n_london + 40, 30,
                       "london still trading after the heal")
            after = by_site(venue)
            assert max(t for t, _ in after["tokyo"]) == last_tokyo_ms  # tokyo stayed quiet
            roles = {name: sites.roles(name)["resources"]["deribit"] for name in sites.sites}
            assert roles["london"]["state"] == "ACTIVE", roles
            assert roles["tokyo"]["state"] != "ACTIVE", roles

            # Both sites' connectors heard every fill on the shared account.
            for name in sites.sites:
                with sites.use(name):
                    conn = ray.get_actor(f"site-{name}/deribit", namespace="bastion")
                    wait_until(lambda c=conn: ray.get(c.positions.remote(), timeout=10).get(
                        "BTC-PERPETUAL", 0.0) == float(rpc(venue, "private/get_position", {
                            "instrument_name": "BTC-PERPETUAL"})["size"]), 20,
                        f"{name} connector position = venue's")
        finally:
            sites.shutdown()


def _ticker_bid(venue: VenueProcess) -> float:
    return float(rpc(venue, "public/ticker", {"instrument_name": "BTC-PERPETUAL"})[
        "best_bid_price"])


@pytest.mark.slow
def test_site_when_cut_off_with_its_connector_frozen_then_promoted_site_rebuilds_from_the_replica(
        tmp_path: Path) -> None:
    """The old active can neither renew nor cancel (its connector is SIGSTOPped and its site
    cut off): the promoted site learns its resting orders from the replicated journal alone,
    before asking the venue, and cancels them."""
    import os
    import signal
    import time

    import msgpack
    import ray

    from supervisors import start_tree
    from supervisors.journal import open_store

    (cid, secret), = KEYS.items()
    pid = None
    with VenueProcess.start("deribit", seed=12, keys=KEYS, speedup=60.0) as venue:
        sites = MultiSite.start({"tokyo": 1, "london": 1}, tmp_path / "ms",
                                resources=["deribit"], preferred={"deribit": "tokyo"})
        try:
            trees = {}
            for name in sites.sites:
                with sites.use(name):
                    trees[name] = start_tree(
                        failover_tree(name, "deribit", venue.ws_url, cid, secret,
                                      flow_interval_s=None),
                        namespace="bastion", store_url=f"sqlite://{tmp_path / name}")
            sites.enable_roles({name: {"deribit": [(f"site-{name}/deribit", "bastion")]}
                                for name in sites.sites})
            sites.enable_replication(
                "deribit", {name: f"sqlite://{tmp_path / name}" for name in sites.sites},
                {name: connector_streams(name, "deribit") for name in sites.sites})

            def connector_status(site: str) -> dict:
                with sites.use(site):
                    return ray.get(ray.get_actor(f"site-{site}/deribit", namespace="bastion")
                                   .status.remote(), timeout=10)

            wait_until(lambda: connector_status("tokyo")["role"]["state"] == "ACTIVE", 60,
                       "tokyo active")
            with sites.use("tokyo"):
                conn = ray.get_actor("site-tokyo/deribit", namespace="bastion")
                bid = _ticker_bid(venue)
                resting = [ray.get(conn.submit.remote({
                    "instrument": "BTC-PERPETUAL", "direction": "buy", "amount": 10.0,
                    "type": "limit", "price": round(bid * (0.5 + 0.01 * i))}), timeout=20)
                    for i in range(5)]
                t_acked = time.monotonic()
                assert all(r["status"] == "accepted" for r in resting), resting
                pid = trees["tokyo"].child("site-tokyo/deribit").pid
            labels = {r["label"] for r in resting}

            london_store = open_store(f"sqlite://{tmp_path / 'london'}")

            def replicated() -> set[str]:
                seen = set()
                for rec in london_store.read("replica/deribit/deribit"):
                    event = msgpack.unpackb(msgpack.unpackb(rec.payload, raw=False)["p"],
                                            raw=False, strict_map_key=False)
                    if isinstance(event, dict) and event.get("t") == "ack":
                        seen.add(event.get("label"))
                return seen & labels

            wait_until(lambda: replicated() == labels, 20, "acks replicated to london")
            lag_s = time.monotonic() - t_acked
            shipped = sites.replication("london")["deribit"]
            assert shipped["counters"].get("applied", 0) >= 10, shipped

            os.kill(pid, signal.SIGSTOP)  # tokyo's connector can neither cancel nor renew

            # A venue without a dead-man's switch (Deribit has none): take tokyo's off, so
            # only the replica can tell london what tokyo left resting.
            def disarmed() -> bool:
                for switch in rpc(venue, "private/get_cancel_all_after"):
                    rpc(venue, "private/cancel_all_after",
                        {"timeout": 0, "label_prefix": switch["label_prefix"]})
                return not rpc(venue, "private/get_cancel_all_after")

            wait_until(disarmed, 10, "tokyo's dead-man's switch disarmed")
            sites.cut_off("tokyo")
            wait_until(lambda: connector_status("london")["role"]["state"] == "ACTIVE", 30,
                       "london promoted")

            def open_tokyo_orders() -> set[str]:
                orders = rpc(venue, "private/get_open_orders_by_instrument",
                             {"instrument_name": "BTC-PERPETUAL"})
                return {o["label"] for o in orders} & labels

            wait_until(lambda: not open_tokyo_orders(), 30, "tokyo's resting orders cancelled")
            status = connector_status("london")
            imported = status["replica"]["last_import"]
            assert imported["events"].get("intent", 0) >= 5, imported
            assert imported["events"].get("ack", 0) >= 5, imported
            engine = rpc(venue, "public/simulator/status")["engine"]
            cancelled_by_london = status["counters"].get("cancelled_stale_epoch", 0)
            reasons = {}
            for label in labels:
                state = rpc(venue, "private/get_order_state_by_label",
                            {"currency": "BTC", "label": label})
                state = state[0] if isinstance(state, list) else state
                reasons[label] = (state["order_state"], state.get("cancel_reason"))
            assert set(reasons.values()) == {("cancelled", "user_request")}, reasons
            assert cancelled_by_london == 5, status["counters"]
            with sites.use("london"):
                wait_until(lambda: not labels & {o["label"] for o in ray.get(ray.get_actor(
                    "site-london/deribit", namespace="bastion").open_orders.remote(),
                    timeout=10)}, 20, "london's ledger: none of tokyo's orders open")
            assert engine["duplicate_labels"] == 0
            print(f"replication lag (ack at tokyo -> visible at london) <= {lag_s:.3f} s; "
                  f"london imported {imported} and cancelled {cancelled_by_london} of "
                  f"tokyo's orders")
        finally:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            sites.shutdown()
