"""``make demo``: real trading on replayed real market data, on a local multi-node Ray cluster,
while Bastion's faults hit it: a connector SIGKILLed, a risk book SIGKILLed, a node SIGKILLed.
Ends with positions reconciled against the venue's own records.

The deployment is ``cluster/deploy/bastion.yaml`` (one site, a Deribit-API simulator replaying
the May 2021 crash at 60x, a connector, a risk book, a counterparty monitor). Order flow comes
from the market maker in ``actors.strategy`` when it is there, else from a simple client loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import base64
import contextlib
import json
import random
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import deployment as deployment_mod
from .launcher import launch, stop_venues

console = Console()
INSTRUMENT = "BTC-PERPETUAL"


def _wait(fn: Any, timeout_s: float, what: str, poll_s: float = 0.01) -> Any:
    """``fn()`` until it is truthy (errors count as not yet); RuntimeError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling while it recovers
            last = exc
        time.sleep(poll_s)
    raise RuntimeError(f"demo: timed out waiting for {what} (last: {last!r})")


def venue_rpc(http_url: str, client_id: str, secret: str, method: str,
              params: dict[str, Any] | None = None) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                       "params": params or {}}).encode()
    auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    req = urllib.request.Request(f"{http_url}/api/v2/{method}", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


class ClientFlow:
    """A steady stream of small crossing orders through the connector (the fallback flow)."""

    def __init__(self, tree: Any, path: str, seed: int = 1) -> None:
        self.tree, self.path = tree, path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.outcomes: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import ray

        position = 0.0
        while not self.stop.is_set():
            # Mean-reverting inventory: buy when short, sell when long, random otherwise.
            bias = -position / 400.0
            direction = "buy" if self.rng.random() < 0.5 + max(-0.4, min(0.4, bias)) \
                else "sell"
            amount = float(self.rng.randint(1, 10) * 10)
            try:
                conn = self.tree.actor(self.path, 10)
                out = ray.get(conn.submit.remote({"instrument": INSTRUMENT,
                                                  "direction": direction, "amount": amount,
                                                  "type": "market"}, 5.0), timeout=15)
                status = out["status"]
                if status == "accepted":
                    position += amount if direction == "buy" else -amount
            except Exception:  # noqa: BLE001 - the connector is being restarted
                status = "connector down"
            self.outcomes[status] = self.outcomes.get(status, 0) + 1
            time.sleep(0.05)


def main(quick: bool = False, duration_s: float | None = None) -> int:
    import ray

    from supervisors import _ray as sray

    duration_s = duration_s or (45.0 if quick else 120.0)
    dep = deployment_mod.load()
    site = dep.sites[0]
    venue_spec = site.venues[0]
    work = Path(tempfile.mkdtemp(prefix="bastion-demo-"))
    root = f"site-{site.name}"
    conn_path = f"{root}/venues/{venue_spec.name}/connector"
    book_path = f"{root}/risk/{site.books[0].name}"
    console.rule("[bold]Bastion demo: supervised trading on replayed real data")
    t0 = time.monotonic()
    with console.status("starting the cluster, the venue simulator and the supervision tree"):
        cluster, venues, trees = launch(dep, work / "cluster", detached=False)
    tree = trees[0]
    venue = venues[f"{site.name}/{venue_spec.name}"]
    console.print(f"up in {time.monotonic() - t0:.1f} s: {len(cluster.nodes)} nodes at "
                  f"{cluster.address}; venue {venue_spec.name} at {venue.ws_url} replaying "
                  f"May 2021 BTC/ETH at {venue_spec.speedup:g}x")
    console.print(f"Ray dashboard: {cluster.dashboard_url} (token auth off for the local "
                  f"demo; actors in namespace '{dep.namespace}', named by tree path)")
    events: list[tuple[str, str]] = []
    flow = None
    ok = False
    try:
        names = {n.node_id: n.name for n in sray.list_nodes()}
        _wait(lambda: ray.get(tree.actor(conn_path).state.remote(), timeout=5) == "RUNNING",
              60, "connector RUNNING")
        flow = ClientFlow(tree, conn_path)
        flow.thread.start()
        console.print("trading: the market maker quotes through the router, and a client's "
                      "market orders stream through the connector; fills flow to the risk "
                      "book in batches")
        phase = duration_s / 4

        def fault(title: str, path: str) -> None:
            info = tree.child(path)
            console.rule(title)
            t_kill = time.perf_counter()
            os.kill(info.pid, signal.SIGKILL)
            _wait(lambda: (c := tree.child(path)).status == "running" and c.pid != info.pid,
                  60, f"{path} restarted")
            if path == conn_path:
                _wait(lambda: ray.get(tree.actor(conn_path).state.remote(), timeout=5)
                      == "RUNNING", 60, "connector reconciled")
            dt = time.perf_counter() - t_kill
            console.print(f"{path} back (reconciled, state rebuilt) in {dt * 1000:.0f} ms")
            events.append((title, f"{dt * 1000:.0f} ms"))

        time.sleep(phase)
        fault("fault 1: SIGKILL of the venue connector mid-stream", conn_path)
        time.sleep(phase / 2)
        fault("fault 2: SIGKILL of the risk book", book_path)
        time.sleep(phase / 2)
        victim_id = tree.child(conn_path).node_id
        victim = names.get(victim_id or "", "?")
        console.rule(f"fault 3: SIGKILL of node {victim} (raylet + every process on it)")
        t_kill = time.perf_counter()
        cluster.kill_node(victim)
        _wait(lambda: (c := tree.child(conn_path)).status == "running"
              and c.node_id != victim_id
              and ray.get(tree.actor(conn_path).state.remote(), timeout=5) == "RUNNING",
              60, "connector migrated")
        dt = time.perf_counter() - t_kill
        new_node = names.get(tree.child(conn_path).node_id or "", "?")
        console.print(f"connector running on {new_node} and reconciled in {dt * 1000:.0f} ms")
        events.append((f"fault 3: node {victim} SIGKILL", f"{dt * 1000:.0f} ms"))
        time.sleep(phase)
        flow.stop.set()
        flow.thread.join(30)
        ok = _report(tree, conn_path, book_path, venue, venue_spec, flow, events)
        for t in trees:
            t.stop()
        ray.shutdown()
        return 0 if ok else 1
    finally:
        if flow is not None:
            flow.stop.set()
        with console.status("tearing down"):
            stop_venues(work / "cluster")
            cluster.shutdown()
        console.print(f"everything stopped; no process left. total "
                      f"{time.monotonic() - t0:.0f} s")


def _report(tree: Any, conn_path: str, book_path: str, venue: Any, venue_spec: Any,
            flow: ClientFlow, events: list[tuple[str, str]]) -> bool:
    import ray

    conn = tree.actor(conn_path)
    status = ray.get(conn.status.remote(), timeout=30)
    ours = ray.get(conn.positions.remote(), timeout=30).get(INSTRUMENT, 0.0)
    theirs = float(venue_rpc(venue.http_url, venue_spec.client_id, venue_spec.client_secret,
                             "private/get_position",
                             {"instrument_name": INSTRUMENT})["size"])
    engine = venue_rpc(venue.http_url, venue_spec.client_id, venue_spec.client_secret,
                       "public/simulator/status")["engine"]

    def book_size() -> float:
        rows = ray.get(tree.actor(book_path).positions.remote(), timeout=10)
        return next((r["size"] for r in rows if r["instrument"] == INSTRUMENT), 0.0)

    # Fills reach the book in batches: give it a moment to catch up, then report what it has.
    with contextlib.suppress(RuntimeError):
        _wait(lambda: book_size() == theirs, 30, "risk book to catch up")
    book = book_size()
    summary = ray.get(tree.actor(book_path).summary.remote(), timeout=30)
    maker = None
    root = book_path.split("/")[0]
    try:
        maker = ray.get(tree.actor(f"{root}/trading/maker", 5).status.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a deployment without a strategy
        maker = None
    table = Table(title="faults and recovery")
    table.add_column("fault")
    table.add_column("back in")
    for row in events:
        table.add_row(*row)
    console.print(table)
    recon = Table(title=f"{INSTRUMENT} position reconciled against the venue")
    for col in ("source", "position (USD contracts)"):
        recon.add_column(col)
    recon.add_row("venue (its own record of fills)", f"{theirs:g}")
    recon.add_row("connector (journal of acknowledged fills)", f"{ours:g}")
    recon.add_row("risk book (fills published in batches)", f"{book:g}")
    console.print(recon)
    console.print(f"orders: {flow.outcomes}; fills {status['fills']}; venue orders created "
                  f"{engine['orders_created']}, duplicate labels seen by the venue "
                  f"{engine['duplicate_labels']}; risk book state {summary['trading_state']}, "
                  f"PnL {summary['pnl']['total_usd']:.2f} USD")
    if maker is not None:
        console.print("market maker: " + ", ".join(
            f"{k}={maker[k]}" for k in ("state", "inventory", "orders", "fills")
            if k in maker))
    ok = ours == theirs == book and engine["duplicate_labels"] == 0
    console.print("verdict: " + ("[green]positions equal the venue's fills exactly; no order "
                                 "sent twice[/green]" if ok else "[red]MISMATCH[/red]"))
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
