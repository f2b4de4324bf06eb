"""``make demo`` for now: a local multi-node cluster, a supervision tree with stateful actors,
a child SIGKILLed and then a node SIGKILLed, with what happened and how long recovery took.

Later issues grow it into the full two-site trading demo.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .local import LocalCluster, NodeConfig

console = Console()

NODES = [
    NodeConfig("head", site="tokyo", zone="a", num_cpus=0),
    NodeConfig("tokyo-1", site="tokyo", zone="a", num_cpus=4),
    NodeConfig("tokyo-2", site="tokyo", zone="b", num_cpus=4),
    NodeConfig("tokyo-3", site="tokyo", zone="c", num_cpus=4),
    NodeConfig("london-1", site="london", zone="a", num_cpus=4),
]


def _wait(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling while it recovers
            last = exc
        time.sleep(0.005)
    raise RuntimeError(f"demo: timed out waiting for {what} (last: {last!r})")


def _tree_spec() -> Any:
    from supervisors import ChildSpec, Placement, SupervisorSpec
    from supervisors.spec import Backoff

    def book(cid: str, **placement: Any) -> ChildSpec:
        return ChildSpec(id=cid, cls="supervisors.examples:Counter",
                         kwargs={"snapshot_every": 200}, backoff=Backoff(initial_s=0.05),
                         placement=Placement(**placement))

    return SupervisorSpec(id="root", strategy="one_for_one", intensity=10, period_s=10, children=[
        SupervisorSpec(id="books", strategy="one_for_one", intensity=10, period_s=10, children=[
            book("btc", site="tokyo", anti_affinity="btc", preferred_nodes=("tokyo-3",)),
            book("btc-replica", site="tokyo", anti_affinity="btc",
                 preferred_nodes=("tokyo-1",)),
            book("eth", site="tokyo", preferred_nodes=("tokyo-3",)),
        ]),
        SupervisorSpec(id="london", strategy="rest_for_one", intensity=5, children=[
            book("ldn-book", site="london"),
        ]),
    ])


def _show_tree(tree: Any, names: dict[str, str], title: str) -> None:
    table = Table(title=title)
    for col in ("child", "status", "node", "pid", "restarts"):
        table.add_column(col)
    for sup in ("root", "root/books", "root/london"):
        for c in tree.children(sup):
            table.add_row(f"{sup}/{c.id}", c.status, names.get(c.node_id or "", "-"),
                          str(c.pid), str(c.restarts))
    console.print(table)


def main(quick: bool = False) -> int:
    import ray

    from supervisors import _ray as sray
    from supervisors import start_tree

    work = Path(tempfile.mkdtemp(prefix="bastion-demo-"))
    console.rule("[bold]Bastion demo: supervision trees on a local multi-node Ray cluster")
    t0 = time.monotonic()
    with console.status("starting a 5-node Ray cluster (head + tokyo-1..3 + london-1)..."):
        cluster = LocalCluster.start(NODES, work_dir=work / "cluster", include_dashboard=True)
    console.print(f"cluster up in {time.monotonic() - t0:.1f} s at {cluster.address}")
    console.print(f"Ray dashboard: {cluster.dashboard_url}  (token auth off for the local demo; "
                  "actors are in namespace 'demo')")
    results: list[tuple[str, str]] = []
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        names = {n.node_id: n.name for n in sray.list_nodes()}
        store_url = f"sqlite://{work / 'journal'}"
        with console.status("starting the supervision tree..."):
            tree = start_tree(_tree_spec(), namespace="demo", store_url=store_url)
        _show_tree(tree, names, "supervision tree")

        # 1. Acknowledged events into the books.
        btc = tree.actor("root/books/btc")
        n_events = 300 if quick else 2000
        acked = ray.get([btc.add.remote(1) for _ in range(n_events)], timeout=120)
        ray.get(tree.actor("root/books/eth").add.remote(7), timeout=30)
        console.print(f"btc book: {len(acked)} events acknowledged (last seq {acked[-1]})")

        # 2. SIGKILL the btc book's worker process.
        info = tree.child("root/books/btc")
        console.rule("fault 1: SIGKILL of the btc book's process")
        t_kill = time.perf_counter()
        os.kill(info.pid, signal.SIGKILL)
        state = _wait(lambda: (v := ray.get(tree.actor("root/books/btc", 30).value.remote(),
                                              timeout=5)) and v["seq"] >= acked[-1] and v,
                      60, "btc to come back")
        dt = time.perf_counter() - t_kill
        new = tree.child("root/books/btc")
        ok = state["total"] == n_events and new.pid != info.pid
        console.print(f"restarted as pid {new.pid} (was {info.pid}) and answering with "
                      f"total={state['total']} seq={state['seq']} in [bold]{dt * 1000:.0f} ms"
                      f"[/bold]; every acknowledged event present: {ok}")
        results.append(("child SIGKILL -> answering with state", f"{dt * 1000:.0f} ms"))

        # 3. SIGKILL the whole node that runs btc and eth.
        victim = names[new.node_id]
        on_victim = [c.id for c in tree.children("root/books") if c.node_id == new.node_id]
        console.rule(f"fault 2: SIGKILL of node {victim} (raylet + all its processes), "
                     f"hosting {on_victim}")
        t_kill = time.perf_counter()
        cluster.kill_node(victim)

        def all_back() -> bool:
            for cid in on_victim:
                c = tree.child(f"root/books/{cid}")
                if c.status != "running" or c.node_id == new.node_id:
                    return False
                ray.get(tree.actor(f"root/books/{cid}", 5).value.remote(), timeout=5)
            return True

        _wait(all_back, 60, "the node's children to run elsewhere")
        dt = time.perf_counter() - t_kill
        btc_state = ray.get(tree.actor("root/books/btc").value.remote(), timeout=30)
        eth_state = ray.get(tree.actor("root/books/eth").value.remote(), timeout=30)
        replica = tree.child("root/books/btc-replica")
        moved = tree.child("root/books/btc")
        console.print(f"{on_victim} answering on other tokyo nodes in [bold]{dt * 1000:.0f} ms"
                      f"[/bold]; btc total={btc_state['total']} eth total={eth_state['total']};"
                      f" btc on {names.get(moved.node_id or '')}, its replica on "
                      f"{names.get(replica.node_id or '')} (anti-affinity held: "
                      f"{moved.node_id != replica.node_id})")
        results.append(("node SIGKILL -> children answering elsewhere", f"{dt * 1000:.0f} ms"))
        _show_tree(tree, names, "after the faults")
        correct = (btc_state["total"] == n_events and eth_state["total"] == 7
                   and moved.node_id != replica.node_id)
        table = Table(title="recovery")
        table.add_column("fault")
        table.add_column("recovered in")
        for row in results:
            table.add_row(*row)
        console.print(table)
        console.print("state intact after both faults: "
                      + ("[green]yes[/green]" if correct else "[red]NO[/red]"))
        tree.stop()
        ray.shutdown()
        return 0 if correct else 1
    finally:
        with console.status("tearing down..."):
            cluster.shutdown()
        console.print(f"cluster down; no process left. total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
