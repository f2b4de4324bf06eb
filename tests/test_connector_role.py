"""RoleGate: a connector orders only while its site holds the venue's lease (pure, fake time)."""

from __future__ import annotations

from actors.connector_role import RoleGate


def ev(kind: str, epoch: int, valid_for_s: float = 1.0, sent_wall_s: float = 100.0,
       resource: str = "deribit") -> dict:
    return {"kind": kind, "resource": resource, "epoch": epoch, "valid_for_s": valid_for_s,
            "sent_wall_s": sent_wall_s}


def test_gate_when_disabled_then_always_open_and_labels_unstamped() -> None:
    gate = RoleGate(False, "deribit")
    assert gate.may_send(0.0) and gate.label("c.1") == "c.1"


def test_gate_when_activated_then_open_only_after_reconciliation_and_stamped() -> None:
    gate = RoleGate(True, "deribit", margin_s=0.05)
    assert not gate.may_send(0.0) and "STANDBY" in gate.refusal(0.0)
    assert gate.on_event(ev("activate", 3), now_s=10.0, wall_s=100.0) == "activate"
    assert not gate.may_send(10.01)  # ACTIVATING: reconciling with the venue first
    assert gate.reconciled(10.02) and gate.may_send(10.03)
    assert gate.label("site-tokyo-conn.7") == "e3.site-tokyo-conn.7"


def test_gate_when_renewals_stop_then_lapses_before_the_lease_ends() -> None:
    gate = RoleGate(True, "deribit", margin_s=0.25)
    gate.on_event(ev("activate", 1, valid_for_s=1.0, sent_wall_s=99.75), now_s=10.0, wall_s=100.0)
    gate.reconciled(10.0)
    # deadline = 10.0 + 1.0 - 0.25 (transit) - 0.25 (margin) = 10.5
    assert gate.may_send(10.49) and not gate.may_send(10.5)
    assert gate.state == "STANDBY" and gate.counts["lapsed"] == 1
    gate.on_event(ev("renew", 1), now_s=11.0, wall_s=100.0)  # a late renewal re-activates
    assert gate.state == "ACTIVATING"  # through a fresh reconciliation


def test_gate_when_renewed_then_deadline_moves_and_stale_epochs_are_dropped() -> None:
    gate = RoleGate(True, "deribit", margin_s=0.0)
    gate.on_event(ev("activate", 5), now_s=0.0, wall_s=100.0)
    gate.reconciled(0.0)
    gate.on_event(ev("renew", 5), now_s=0.9, wall_s=100.0)
    assert gate.may_send(1.8)
    assert gate.on_event(ev("activate", 4), now_s=1.0, wall_s=100.0) is None
    assert gate.counts["stale"] == 1 and gate.epoch == 5
    assert gate.on_event(ev("deactivate", 4), now_s=1.0, wall_s=100.0) is None
    assert gate.may_send(1.0)


def test_gate_when_deactivated_or_superseded_then_closed() -> None:
    gate = RoleGate(True, "deribit")
    gate.on_event(ev("activate", 2), now_s=0.0, wall_s=100.0)
    gate.reconciled(0.0)
    assert gate.on_event({"kind": "deactivate", "resource": "deribit", "epoch": 2,
                          "reason": "transfer"}, now_s=0.1, wall_s=100.0) == "deactivate"
    assert not gate.may_send(0.2)
    gate.on_event(ev("activate", 3), now_s=1.0, wall_s=100.0)
    gate.reconciled(1.0)
    assert gate.on_event(ev("activate", 7), now_s=1.1, wall_s=100.0) == "activate"
    assert gate.epoch == 7 and not gate.may_send(1.1)  # reconciles again under the new epoch


def test_gate_when_event_malformed_or_foreign_then_ignored_and_counted() -> None:
    gate = RoleGate(True, "deribit")
    for bad in ({"kind": "activate"}, ev("activate", 1, resource="other"),
                {**ev("activate", 1), "epoch": True}, {**ev("activate", 1), "kind": "boom"}):
        assert gate.on_event(bad, 0.0, 100.0) is None
    assert gate.on_event({**ev("activate", 1), "valid_for_s": float("nan")}, 0.0, 100.0) is None
    assert gate.counts["ignored"] == 4 and gate.counts["malformed"] == 1
    assert gate.state == "STANDBY"


# --- two gated connectors on one venue account, under a real tree ---------------------------
def test_gated_connectors_when_roles_move_then_only_the_active_orders_and_the_venue_fences(
        namespace, store_url, trees) -> None:
    import time

    import ray

    from actors.venue.process import VenueProcess
    from supervisors import ChildSpec, SupervisorSpec, start_tree
    from tests.conftest import wait_until
    from tests.test_connector import KEYS, rpc, venue_position

    (cid, secret), = KEYS.items()
    with VenueProcess.start("deribit", seed=9, keys=KEYS, speedup=60.0) as venue:
        spec = SupervisorSpec(id="root", children=[
            ChildSpec(id=site, cls="actors.connector:VenueConnector", kwargs={
                "venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                "client_secret": secret, "instruments": ["BTC-PERPETUAL"],
                "role_gated": True}) for site in ("tokyo", "london")])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        tokyo, london = tree.actor("root/tokyo"), tree.actor("root/london")
        for conn in (tokyo, london):
            wait_until(lambda c=conn: ray.get(c.state.remote(), timeout=5) == "RUNNING", 60,
                       "connector RUNNING")
        market = {"instrument": "BTC-PERPETUAL", "direction": "buy", "amount": 10,
                  "type": "market"}

        def submit(conn, order=market) -> dict:
            return ray.get(conn.submit.remote(order, 1.0), timeout=30)

        def role(conn, kind: str, epoch: int, valid_for_s: float = 30.0) -> dict:
            return ray.get(conn.on_role_event.remote(
                {"kind": kind, "resource": "deribit", "epoch": epoch,
                 "valid_for_s": valid_for_s, "sent_wall_s": time.time()}), timeout=10)

        out = submit(tokyo)
        assert out["status"] == "refused" and "STANDBY" in out["reason"]
        role(tokyo, "activate", 1)
        wait_until(lambda: ray.get(tokyo.status.remote(), timeout=5)["role"]["state"]
                   == "ACTIVE", 20, "tokyo ACTIVE after reconciling")
        out = submit(tokyo)
        assert out["status"] == "accepted" and out["label"].startswith("e1."), out
        assert submit(london)["status"] == "refused"

        # Split brain as the venue sees it: tokyo still believes it is active (epoch 1, its
        # deadline not yet passed) when london takes over with epoch 2.
        role(london, "activate", 2)
        wait_until(lambda: ray.get(london.status.remote(), timeout=5)["role"]["state"]
                   == "ACTIVE", 20, "london ACTIVE")
        assert submit(london)["status"] == "accepted"
        late = submit(tokyo)
        assert late["status"] == "rejected" and "fenced_epoch" in late["reason"], late
        engine = rpc(venue, "public/simulator/status")["engine"]
        assert engine["fenced_orders"] == 1 and engine["duplicate_labels"] == 0

        # Renewals stop: london lapses by itself, before its lease ends, and cancels what rests.
        role(london, "renew", 2, valid_for_s=1.0)
        resting = submit(london, {"instrument": "BTC-PERPETUAL", "direction": "buy",
                                  "amount": 10, "type": "limit", "price": 1000.0})
        assert resting["status"] == "accepted" and resting["state"] == "open", resting
        status = wait_until(lambda: (s := ray.get(london.status.remote(), timeout=5))
                            ["role"]["state"] == "STANDBY" and s, 10, "london lapsed")
        assert status["role"]["counts"]["lapsed"] == 1
        assert submit(london)["status"] == "refused"
        wait_until(lambda: not rpc(venue, "private/get_open_orders_by_currency",
                                   {"currency": "BTC"}), 10, "resting order cancelled")
        # Both connectors hear every fill on the shared account: positions agree with the venue.
        wait_until(lambda: ray.get(london.positions.remote(), timeout=5) ==
                   {"BTC-PERPETUAL": venue_position(venue)} ==
                   ray.get(tokyo.positions.remote(), timeout=5), 20, "positions agree")
        assert venue_position(venue) == 20.0
