"""``bastion scale add-node | remove-node`` (see :mod:`cluster.scale`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _cluster_for(site: str | None, args: argparse.Namespace) -> Any:
    """The local cluster holding ``site``: a multi-site deployment's site cluster (its state
    under ``<state dir>/../site-<site>`` or the deployment's work dir), else the one cluster."""
    from cluster.cli import _connect, state_dir
    from cluster.local import ClusterError, LocalCluster

    candidates = [Path(args.cluster_dir)] if args.cluster_dir else []
    base = state_dir()
    if site:
        candidates += [base / f"site-{site}", base.parent / f"site-{site}"]
    candidates.append(base)
    for path in candidates:
        try:
            cluster = LocalCluster.load(path)
        except ClusterError:
            continue
        if site is None or any(n.config.site == site for n in cluster.nodes.values()):
            _connect(cluster)
            return cluster
    raise SystemExit(f"bastion: no running local cluster with site {site!r} (looked in "
                     f"{', '.join(str(p) for p in candidates)}); start one with bastion up")


def cmd_add_node(args: argparse.Namespace) -> int:
    from cluster.scale import ScaleError, add_node, rebalance

    labels = dict(kv.split("=", 1) for kv in args.labels.split(",") if kv) if args.labels \
        else {}
    cluster = _cluster_for(args.site, args)
    try:
        out = add_node(cluster, args.site, name=args.name, zone=args.zone,
                       num_cpus=args.cpus, labels=labels)
        if args.rebalance:
            out["moved_in"] = rebalance(out["node_id"])
    except ScaleError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else
          f"added {out['name']} ({out['node_id'][:12]}) to {args.site}; mesh "
          f"{'admitted it' if out['mesh'] else 'not running'}"
          + (f"; moved in: {', '.join(out['moved_in']) or 'nothing'}" if args.rebalance else ""))
    return 0


def cmd_remove_node(args: argparse.Namespace) -> int:
    from cluster.scale import ScaleError, remove_node

    cluster = _cluster_for(None, args) if not args.site else _cluster_for(args.site, args)
    try:
        out = remove_node(cluster, args.name)
    except ScaleError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else
          f"drained and removed {args.name}: moved {', '.join(out['moved']) or 'nothing'}; "
          f"mesh: {'left' if out['mesh_left'] else 'no agent'}")
    return 0


def register(sub: Any) -> None:
    """Add ``scale`` to the ``bastion`` subcommands."""
    scale = sub.add_parser("scale", help="add a node to a running deployment, or drain and "
                                         "remove one")
    scale_sub = scale.add_subparsers(dest="scale_command", required=True)
    add = scale_sub.add_parser("add-node", help="start a node in a site; the mesh admits it")
    add.add_argument("--site", required=True)
    add.add_argument("--name", default=None, help="default: <site>-<n>")
    add.add_argument("--zone", default="a")
    add.add_argument("--cpus", type=float, default=4.0)
    add.add_argument("--labels", default="", help="k=v,k=v (extra node labels)")
    add.add_argument("--rebalance", action="store_true",
                     help="move running children onto it now (else: new and restarted "
                          "children go there first)")
    rm = scale_sub.add_parser("remove-node", help="drain a node (children move), then stop it")
    rm.add_argument("name")
    rm.add_argument("--site", default=None)
    for p in (add, rm):
        p.add_argument("--cluster-dir", default=None, help="the local cluster's state dir")
        p.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_add_node)
    rm.set_defaults(func=cmd_remove_node)
