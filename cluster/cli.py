"""``bastion``: drive a local cluster, inspect supervision trees, run the demo and benchmarks.

    bastion up [--nodes head:tokyo,tokyo-1:tokyo,...] [--dashboard] [--auth token]
    bastion up --deployment [FILE]     # cluster + venue simulators + supervision trees
                                       # (a file with `failover:` -> one Ray cluster per site)
    bastion status [--json]
    bastion failover --venue VENUE --to SITE   # hand a shared venue over (multi-site)
    bastion down
    bastion demo
    bastion venue serve --name NAME --port PORT [--data FILE] [--seed S] [--keys FILE]
    bastion bench {journal,restart,node,all} [--quick] [--json]
    bastion keys generate --dir DIR --name NAME [--name ...] [--force]
    bastion keys list --dir DIR        # public keys only
    bastion check HISTORY.jsonl [--json]   # invariants of a run: exit 1 on a violation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .local import ClusterError, LocalCluster, NodeConfig

DEFAULT_NODES = "head:tokyo,tokyo-1:tokyo,tokyo-2:tokyo,london-1:london"
STATE_DIR_ENV = "BASTION_CLUSTER_DIR"


#: ``bastion bench`` names (bench/run.py's registry, which needs a source checkout)
BENCHMARKS = ("journal", "restart", "node", "risk", "marketdata", "mesh", "failover", "all")

def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, Path.cwd() / ".bastion" / "cluster"))


def parse_nodes(text: str) -> list[NodeConfig]:
    """``name:site[:zone]`` comma-separated; the first is the head (it gets no CPUs)."""
    nodes = []
    for i, item in enumerate(x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise SystemExit(f"bastion: bad node {item!r} in --nodes; expected name:site[:zone]")
        name, site = parts[0], parts[1]
        zone = parts[2] if len(parts) == 3 else "a"
        nodes.append(NodeConfig(name, site=site, zone=zone, num_cpus=0 if i == 0 else 4))
    if not nodes:
        raise SystemExit("bastion: --nodes is empty")
    return nodes


def cmd_up(args: argparse.Namespace) -> int:
    wd = state_dir()
    if (wd / "cluster.json").exists():
        existing = LocalCluster.load(wd)
        if any(n.alive() for n in existing.nodes.values()):
            print(f"bastion: a cluster is already up at {existing.address} (bastion down first)",
                  file=sys.stderr)
            return 1
    from .sites_deploy import is_up

    if (wd / "multisite.json").exists():  # up, or partly gone: down cleans up either way
        state = "is already up" if is_up(wd) else "is recorded (not running)"
        print(f"bastion: a multi-site deployment {state} in {wd} (bastion down first)",
              file=sys.stderr)
        return 1
    if args.deployment:
        from . import deployment
        from .launcher import launch

        try:
            dep = deployment.load(None if args.deployment == "default" else args.deployment)
        except deployment.DeploymentError as exc:
            print(f"bastion: {exc}", file=sys.stderr)
            return 2
        if dep.failover is not None:
            return _up_sites(dep, wd, include_dashboard=args.dashboard)
        cluster, venues, trees = launch(dep, wd, detached=True,
                                        include_dashboard=args.dashboard)
        print(f"cluster up: {len(cluster.nodes)} nodes, address {cluster.address}")
        for key, venue in venues.items():
            print(f"venue {key}: {venue.ws_url} (HTTP {venue.http_url}, log {venue.log_path})")
        for tree in trees:
            print(f"tree {tree.root_id} running in namespace {tree.namespace!r}")
    else:
        cluster = LocalCluster.start(parse_nodes(args.nodes), work_dir=wd,
                                     include_dashboard=args.dashboard, auth_mode=args.auth)
        print(f"cluster up: {len(cluster.nodes)} nodes, address {cluster.address}")
    if cluster.dashboard_url:
        print(f"dashboard: {cluster.dashboard_url}")
    print(f"connect:   export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE={cluster.auth_mode}")
    return 0


def _up_sites(dep: Any, wd: Path, *, include_dashboard: bool) -> int:
    from .sites_deploy import launch_sites

    sites, venues, active = launch_sites(dep, wd, include_dashboard=include_dashboard,
                                         say=lambda line: print(line, flush=True))
    for name, site in sites.sites.items():
        print(f"site {name} up: {len(site.cluster.nodes)} nodes, address {site.cluster.address}"
              + (f", dashboard {site.cluster.dashboard_url}" if site.cluster.dashboard_url
                 else ""))
    if sites.witness is not None:
        print(f"witness: pid {sites.witness.pid}, mesh {sites.witness.endpoint}")
    for key, venue in venues.items():
        print(f"venue {key}: {venue.ws_url} (HTTP {venue.http_url}, log {venue.log_path})")
    for venue, site in active.items():
        print(f"{venue}: {site} ACTIVE (the others stand by)")
    print(f"state: {wd / sites.STATE_FILE} (bastion status / failover / down)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from .sites_deploy import down_sites

    if (state_dir() / "multisite.json").exists():
        n_sites, n_venues = down_sites(state_dir())
        print(f"sites down ({n_sites} site cluster(s), the witness and {n_venues} venue "
              f"simulator(s) stopped)")
        return 0
    try:
        cluster = LocalCluster.load(state_dir())
    except ClusterError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    from .launcher import stop_venues

    stopped = stop_venues(state_dir())
    cluster.shutdown()
    print(f"cluster down ({stopped} venue simulator(s) stopped)")
    return 0


def collect_status(cluster: LocalCluster | None) -> dict[str, Any]:
    """Nodes (Ray's view) and every supervision tree (the supervisors' view)."""
    import ray

    from supervisors import _ray as sray

    out: dict[str, Any] = {"address": cluster.address if cluster else None,
                           "dashboard": cluster.dashboard_url if cluster else None,
                           "nodes": [], "trees": []}
    names = {}
    for node in sray.list_nodes():
        names[node.node_id] = node.name
        out["nodes"].append({"name": node.name, "node_id": node.node_id, "alive": node.alive,
                             "site": node.labels.get("site"), "zone": node.labels.get("zone"),
                             "head": node.is_head})
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "/" in actor["name"]:
            continue
        handle = sray.get_named(actor["name"], actor["namespace"])
        if handle is None:
            continue
        try:
            tree = ray.get(handle.describe.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - not a supervisor (no describe) or unreachable
            continue
        tree["namespace"] = actor["namespace"]
        _name_nodes(tree, names)
        out["trees"].append(tree)
    return out


def _name_nodes(tree: dict[str, Any], names: dict[str, str]) -> None:
    tree["node"] = names.get(tree.get("node_id") or "")
    for child in tree.get("children", []):
        child["node"] = names.get(child.get("node_id") or "")
        if isinstance(child.get("tree"), dict) and "children" in child["tree"]:
            _name_nodes(child["tree"], names)


def render_status(status: dict[str, Any]) -> None:
    import time

    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree as RichTree

    console = Console()
    table = Table(title=f"nodes ({status['address']})")
    for col in ("name", "site", "zone", "alive", "node id"):
        table.add_column(col)
    for n in status["nodes"]:
        table.add_row(n["name"] + (" (head)" if n["head"] else ""), n["site"] or "-",
                      n["zone"] or "-", "yes" if n["alive"] else "[red]DEAD[/red]",
                      n["node_id"][:12])
    console.print(table)
    if status.get("dashboard"):
        console.print(f"dashboard: {status['dashboard']}")
    if not status["trees"]:
        console.print("no supervision trees running")
    now = time.time()

    def add(branch: RichTree, sup: dict[str, Any]) -> None:
        for child in sup.get("children", []):
            color = {"running": "green", "restarting": "yellow", "failed": "red"}.get(
                child["status"], "white")
            up = f"{now - child['started_at']:.0f}s" if child.get("started_at") and \
                child["status"] == "running" else "-"
            label = (f"{child['id']} [{color}]{child['status']}[/{color}] "
                     f"node={child.get('node') or '-'} pid={child.get('pid') or '-'} "
                     f"restarts={child['restarts']} up={up}")
            if child.get("last_failure"):
                label += f" last_failure={child['last_failure'][:60]!r}"
            sub = branch.add(label)
            if isinstance(child.get("tree"), dict):
                add(sub, child["tree"])

    for tree in status["trees"]:
        root = RichTree(f"[bold]{tree['path']}[/bold] ({tree['namespace']}) {tree['status']}"
                        f" node={tree.get('node')}")
        add(root, tree)
        console.print(root)


def _connect(cluster: LocalCluster | None) -> None:
    if cluster is not None:
        os.environ.setdefault("RAY_AUTH_MODE", cluster.auth_mode)
    import ray

    address = cluster.address if cluster else os.environ.get("RAY_ADDRESS", "auto")
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def cmd_status(args: argparse.Namespace) -> int:
    if (state_dir() / "multisite.json").exists():
        from .multisite import MultiSite
        from .sites_deploy import collect_sites_status, render_sites_status

        report = collect_sites_status(MultiSite.load(state_dir(), strict=False))
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            render_sites_status(report)
        return 0
    cluster = None
    try:
        cluster = LocalCluster.load(state_dir())
    except ClusterError:
        if not os.environ.get("RAY_ADDRESS"):
            print("bastion: no local cluster is up (bastion up) and RAY_ADDRESS is not set",
                  file=sys.stderr)
            return 1
    _connect(cluster)
    status = collect_status(cluster)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        render_status(status)
    return 0


def cmd_failover(args: argparse.Namespace) -> int:
    """Hand a shared venue to a site (multi-site): 0 once it is active there, 1 if refused."""
    from .multisite import MultiSite
    from .sites_deploy import HandOverRefused, hand_over

    try:
        sites = MultiSite.load(state_dir())
    except ClusterError as exc:
        print(f"bastion: failover: {exc} (bastion up --deployment FILE with a failover "
              f"section first)", file=sys.stderr)
        return 1
    try:
        hand_over(sites, args.venue, args.to, timeout_s=args.timeout_s)
    except HandOverRefused as exc:
        print(f"bastion: failover refused: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.single_site:
        from .demo import main as demo_main

        return demo_main(quick=args.quick)
    from .demo_sites import main as sites_demo

    return sites_demo(quick=args.quick)


def cmd_report(args: argparse.Namespace) -> int:
    """The resilience report of a run history: 0 when the checker passes, 1 on a violation,
    2 when the history cannot be read."""
    from .report import build_report, print_summary

    out = Path(args.out) if args.out else Path(args.history).resolve().parent
    try:
        report = build_report(args.history, out)
    except OSError as exc:
        print(f"bastion: cannot read {args.history}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        print_summary(report)
    return 0 if report.verdict.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "bench" / "run.py").exists():
        print("bastion: benchmarks run from a source checkout (bench/ not found)",
              file=sys.stderr)
        return 1
    sys.path.insert(0, str(repo))
    from bench.run import run_named

    figures = run_named(args.name, quick=args.quick)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:40s} {value}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """CURVE key pairs for the mesh (``topology.keys``); prints public keys only."""
    from topology import keys

    try:
        if args.keys_command == "generate":
            for name in args.name:
                public, secret = keys.generate_keypair(args.dir, name, overwrite=args.force)
                print(f"{name} {keys.load_public_key(public).decode()} "
                      f"(public {public}, secret {secret})")
        else:
            for name, key in keys.load_public_keys(args.dir).items():
                print(f"{name} {key.decode()}")
    except (OSError, ValueError) as exc:  # FileExistsError, KeyFileError, a bad name
        print(f"bastion: keys: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Judge a run history (``cluster.checker``): 0 all pass, 1 a violation, 2 unreadable."""
    from .checker import check, render_verdict
    from .history import load_history

    try:
        verdict = check(load_history(args.history))
    except OSError as exc:
        print(f"bastion: check: cannot read {args.history}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(verdict.to_dict(), default=str))
    else:
        render_verdict(verdict)
    return 0 if verdict.passed else 1


def cmd_chaos(args: argparse.Namespace) -> int:
    """Faults against the running local deployment (``cluster.chaos.command``): 0 done, 1 a
    fault failed or did not recover, 2 a bad scenario, 3 refused (not non-production)."""
    from .chaos.command import run_command

    return run_command(args, state_dir())


def _venue_main(argv: list[str]) -> int:
    from actors.venue.process import main as venue_main

    return int(venue_main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local multi-node Ray cluster")
    up.add_argument("--nodes", default=DEFAULT_NODES,
                    help="name:site[:zone],... the first is the head (default: %(default)s)")
    up.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True)
    up.add_argument("--auth", choices=("disabled", "token"), default="disabled")
    up.add_argument("--deployment", nargs="?", const="default", default=None,
                    help="also start a deployment: venues and supervision trees "
                         "(default file: cluster/deploy/bastion.yaml)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="tear the local cluster down").set_defaults(func=cmd_down)
    st = sub.add_parser("status", help="nodes and live supervision trees")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    fo = sub.add_parser("failover", help="hand a shared venue to another site (multi-site): "
                                         "exit 0 once it is active there, 1 if refused")
    fo.add_argument("--venue", required=True)
    fo.add_argument("--to", required=True, help="the site to make active")
    fo.add_argument("--timeout-s", type=float, default=30.0,
                    help="wait this long for the target to be active (default %(default)s)")
    fo.set_defaults(func=cmd_failover)
    demo = sub.add_parser("demo", help="two sites through a mix of real faults, then the "
                                       "resilience report")
    demo.add_argument("--quick", action="store_true", help="only the first two faults")
    demo.add_argument("--single-site", action="store_true",
                      help="the one-cluster demo (connector, risk book and node killed)")
    demo.set_defaults(func=cmd_demo)
    rep = sub.add_parser("report", help="the resilience report of a run history (PNG, HTML, "
                                        "the detection/recovery table, the checker's verdict)")
    rep.add_argument("history")
    rep.add_argument("--out", default=None, help="directory (default: the history's)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_report)
    venue = sub.add_parser("venue", help="venue simulator (Deribit API v2)")
    venue_sub = venue.add_subparsers(dest="venue_command", required=True)
    serve = venue_sub.add_parser("serve", help="run one simulator and print its URLs",
                                 add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(func=lambda a: _venue_main(["serve", *a.rest]))
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--json", action="store_true",
                       help="print one JSON object of the figures as the last line")
    bench.set_defaults(func=cmd_bench)
    keys = sub.add_parser("keys", help="CURVE key pairs for the mesh")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="write NAME.key (public, 0644) and "
                                               "NAME.key_secret (0600) for each --name")
    gen.add_argument("--dir", required=True)
    gen.add_argument("--name", action="append", required=True)
    gen.add_argument("--force", action="store_true", help="replace existing key pairs")
    listing = keys_sub.add_parser("list", help="print NAME PUBLIC_KEY for each NAME.key")
    listing.add_argument("--dir", required=True)
    keys.set_defaults(func=cmd_keys)
    chk = sub.add_parser("check", help="check a run history's invariants (exit 1 on a "
                                       "violation, 2 when unreadable)")
    chk.add_argument("history", help="the run's history file (JSONL)")
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.set_defaults(func=cmd_check)
    from .chaos.command import add_arguments as add_chaos_arguments

    chaos = sub.add_parser("chaos", help="inject real faults: scenarios and one-shot commands "
                                         "(deployments marked non-production only)")
    add_chaos_arguments(chaos)
    chaos.set_defaults(func=cmd_chaos)
    from .scale_cli import register as register_scale

    register_scale(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["venue", "serve"]:  # the simulator parses its own options
        return _venue_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClusterError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
