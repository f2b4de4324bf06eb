"""What the demo watches on one site, from a process of its own (a driver holds one Ray
connection, so each site gets its own watcher while the demo's main process injects faults).

    python -m cluster.demo_record --address A --site tokyo --namespace bastion \
        --controller NODE_ID --out tokyo.obs.jsonl

Every ``--interval-s`` it writes one JSON line per change it sees (``obs`` says which):

* ``child``: a supervised child's status, pid, node or incarnation changed (``Tree.describe``);
* ``role_log``: a role event of the site's controller (activate / renew / deactivate);
* ``mesh``: a membership event of the controller's agent (suspect / down / up / ...);
* ``pnl``: the site's risk book P&L (every ``--pnl-every-s``).

It stops on SIGTERM, flushing what it has. The demo turns these into history events
(``cluster.demo``): restarts, migrations, roles and leases, detections, P&L.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any


def _children(tree: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for child in tree.get("children", []):
        out.append(child)
        if isinstance(child.get("tree"), dict):
            out.extend(_children(child["tree"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.demo_record")
    p.add_argument("--address", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--namespace", default="bastion")
    p.add_argument("--controller", required=True, help="the site controller's node id")
    p.add_argument("--book", default="main")
    p.add_argument("--out", required=True)
    p.add_argument("--interval-s", type=float, default=0.2)
    p.add_argument("--pnl-every-s", type=float, default=2.0)
    args = p.parse_args(argv)
    import ray

    from supervisors import Tree

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tree = Tree(f"site-{args.site}", args.namespace, "")
    seen_children: dict[str, tuple[Any, ...]] = {}
    role_seq = 0  # from the first: the roles were enabled before this watcher started
    mesh_seq = 0
    next_pnl = 0.0
    with open(args.out, "a", encoding="utf-8") as out:
        def write(**obs: Any) -> None:
            out.write(json.dumps({"site": args.site, **obs}, default=str) + "\n")

        while not stop.wait(args.interval_s):
            now = time.time()
            try:
                controller = ray.get_actor(f"mesh/{args.controller}", namespace="bastion-mesh")
                for e in ray.get(controller.role_events_since.remote(role_seq), timeout=5):
                    role_seq = max(role_seq, int(e["seq"]))
                    write(obs="role_log", ts=e.get("sent_wall_s", now), event=e)
                for e in ray.get(controller.events_since.remote(mesh_seq), timeout=5):
                    mesh_seq = max(mesh_seq, int(e.get("seq", 0)))
                    write(obs="mesh", ts=now, kind=e.get("kind"), node_id=e.get("node_id"),
                          reason=e.get("reason"))
            except Exception as exc:  # noqa: BLE001 - the site may be cut off or restarting
                write(obs="error", ts=now, what="controller", error=repr(exc)[:200])
            try:
                for c in _children(tree.describe(timeout_s=5)):
                    state = (c.get("status"), c.get("pid"), c.get("node_id"),
                             c.get("incarnation"), c.get("exited_at"))
                    if seen_children.get(c["actor_name"]) != state:
                        seen_children[c["actor_name"]] = state
                        write(obs="child", ts=now, path=c["actor_name"], status=state[0],
                              pid=state[1], node=state[2], incarnation=state[3],
                              exited_at=state[4])
            except Exception as exc:  # noqa: BLE001 - a supervisor restarting
                write(obs="error", ts=now, what="tree", error=repr(exc)[:200])
            if now >= next_pnl:
                next_pnl = now + args.pnl_every_s
                try:
                    book = ray.get_actor(f"site-{args.site}/risk/{args.book}",
                                         namespace=args.namespace)
                    pnl = ray.get(book.summary.remote(), timeout=5)["pnl"]
                    if pnl.get("total_usd") is not None:
                        write(obs="pnl", ts=now, book=f"{args.site}/{args.book}",
                              value=float(pnl["total_usd"]))
                except Exception:  # noqa: BLE001, S110 - the book restarting: next sample
                    pass
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
