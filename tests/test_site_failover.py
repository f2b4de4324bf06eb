"""Geographically redundant failover, end to end on one machine: two sites, each its own Ray
cluster, one heartbeat mesh with a witness, a shared venue. The venue's own record of trades is
the judge: which site's orders it executed, under which epoch, and when."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.venue.process import VenueProcess
from cluster.multisite import MultiSite, failover_tree, trades_by_site
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
