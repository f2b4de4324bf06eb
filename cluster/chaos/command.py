"""``bastion chaos``: scenarios and one-shot faults against the running local deployment (the
one ``bastion up --deployment`` started: its ``cluster.json`` and ``venues.json`` in the work
dir, ``$BASTION_CLUSTER_DIR`` or ``./.bastion/cluster``).

    bastion chaos run SCENARIO.yaml [--dry-run] [--history FILE] [--no-watch] [--json]
    bastion chaos faults                         # the fault kinds (no cluster needed)
    bastion chaos targets [AMONG ...]            # what the running system offers as targets
    bastion chaos kill-actor PATH                # then waits for the restart (--no-wait)
    bastion chaos kill-supervisor PATH
    bastion chaos kill-node NAME [--restart-after S]
    bastion chaos pause PATH --for S
    bastion chaos pause-node NAME --for S
    bastion chaos partition NAME [NAME ...] [--one-way | --bridge] [--for S]
    bastion chaos link-loss NAME [NAME ...] --probability P [--for S]
    bastion chaos link-delay NAME [NAME ...] --delay-s S [--for S]
    bastion chaos skew NODE OFFSET_S [--for S]
    bastion chaos venue-fault VENUE KIND [--param K=V ...] [--for S]
    bastion chaos corrupt-journal STREAM [--seq N|last|snapshot] [--for S]
    bastion chaos heal                           # clear every mesh link fault and venue fault

Every command takes ``--deployment FILE`` (default ``cluster/deploy/bastion.yaml``) and refuses
(exit 3) unless that file says ``environment: non-production``. ``--history FILE`` appends the
``fault`` / ``fault_end`` / ``recovered`` events for ``bastion check``; ``--bound-s`` sets the
recovery bound. Without ``--for`` a fault that has an undo stays in force (``heal``, or the
same command with the opposite value, takes it back); ``pause`` needs ``--for``. Exit 0: done
(and recovered, when watched); 1: a fault failed, did not show, or its target did not come
back; 2: a bad scenario or argument; 3: refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 1, 2, 3

_LINK = ("partition", "link-loss", "link-delay")
_NEEDS_FOR = ("pause", "pause-node")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``chaos`` subcommands, on ``bastion chaos``'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--deployment", default=None,
                        help="the deployment file (default: cluster/deploy/bastion.yaml); it "
                             "must say environment: non-production")
    common.add_argument("--history", default=None, help="append fault events to this JSONL")
    common.add_argument("--bound-s", type=float, default=None, dest="bound_s",
                        help="recovery bound in seconds (default: per fault kind)")
    common.add_argument("--no-wait", action="store_true", dest="no_wait",
                        help="do not wait for the target to recover")
    common.add_argument("--json", action="store_true", help="print the report as JSON")
    sub = parser.add_subparsers(dest="chaos_command", required=True)
    run = sub.add_parser("run", parents=[common], help="run a scenario file")
    run.add_argument("scenario")
    run.add_argument("--dry-run", action="store_true", dest="dry_run",
                     help="print the plan (times and targets) and inject nothing")
    sub.add_parser("faults", help="list the fault kinds")
    targets = sub.add_parser("targets", parents=[common], help="list live targets")
    targets.add_argument("among", nargs="*")
    for kind, what in (("kill-actor", "PATH"), ("kill-supervisor", "PATH"),
                       ("kill-node", "NAME"), ("pause", "PATH"), ("pause-node", "NAME")):
        p = sub.add_parser(kind, parents=[common], help=f"{kind} {what}")
        p.add_argument("target", metavar=what)
        if kind == "kill-node":
            p.add_argument("--restart-after", type=float, default=None, dest="hold_s",
                           metavar="S", help="start the node again after S seconds")
        elif kind in _NEEDS_FOR:
            p.add_argument("--for", type=float, required=True, dest="hold_s", metavar="S")
    for kind in _LINK:
        p = sub.add_parser(kind, parents=[common],
                           help=f"{kind} between the named nodes or sites and the rest")
        p.add_argument("names", nargs="+", metavar="NAME")
        p.add_argument("--for", type=float, default=None, dest="hold_s", metavar="S")
        if kind == "partition":
            shape = p.add_mutually_exclusive_group()
            shape.add_argument("--one-way", action="store_true", dest="one_way",
                               help="drop only what the named side sends")
            shape.add_argument("--bridge", action="store_true",
                               help="the named node bridges two halves of the rest")
        elif kind == "link-loss":
            p.add_argument("--probability", type=float, required=True)
        else:
            p.add_argument("--delay-s", type=float, required=True, dest="delay_s")
    skew = sub.add_parser("skew", parents=[common], help="make a node's clock read OFFSET_S")
    skew.add_argument("target", metavar="NODE")
    skew.add_argument("offset_s", type=float, metavar="OFFSET_S")
    skew.add_argument("--for", type=float, default=None, dest="hold_s", metavar="S")
    venue = sub.add_parser("venue-fault", parents=[common], help="a venue simulator fault")
    venue.add_argument("target", metavar="VENUE")
    venue.add_argument("kind", metavar="KIND", help="outage, stale-feed, price-spike, "
                       "reject-storm, md-drop, md-duplicate, md-reorder, "
                       "withdrawals-suspended, latency")
    venue.add_argument("--param", action="append", default=[], metavar="K=V")
    venue.add_argument("--for", type=float, default=None, dest="hold_s", metavar="S")
    corrupt = sub.add_parser("corrupt-journal", parents=[common],
                             help="flip a byte of one journal record on disk")
    corrupt.add_argument("target", metavar="STREAM", help="a stream, or a stateful actor's path")
    corrupt.add_argument("--seq", default="last", help="N, last or snapshot (default: last)")
    corrupt.add_argument("--for", type=float, default=None, dest="hold_s", metavar="S")
    sub.add_parser("heal", parents=[common], help="clear every mesh link and venue fault")


def run_command(args: argparse.Namespace, work_dir: Path) -> int:
    """Run one ``bastion chaos`` command; returns the exit code."""
    from cluster.local import ClusterError

    from .context import ChaosError, ChaosRefused
    from .scenario import ScenarioError

    try:
        if args.chaos_command == "faults":
            return _list_faults()
        return _dispatch(args, work_dir)
    except ChaosRefused as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ScenarioError as exc:
        print(f"bastion: chaos: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ChaosError, ClusterError) as exc:
        print(f"bastion: chaos: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _deployment(args: argparse.Namespace) -> tuple[Any, str]:
    from cluster import deployment

    from .context import deployment_environment, require_non_production

    source = args.deployment or str(deployment.DEFAULT_SPEC)
    try:
        dep = deployment.load(args.deployment)
    except deployment.DeploymentError as exc:
        from .context import ChaosError

        raise ChaosError(str(exc)) from None
    require_non_production(deployment_environment(dep), f"deployment {source}")
    return dep, source


def _dispatch(args: argparse.Namespace, work_dir: Path) -> int:
    from .context import local_system

    dep, source = _deployment(args)  # refused here, before anything is touched
    if args.chaos_command == "run":
        from .scenario import load

        scenario = load(args.scenario)
        ctx = local_system(work_dir, dep, f"deployment {source}")
        return _run(ctx, scenario, args)
    ctx = local_system(work_dir, dep, f"deployment {source}")
    if args.chaos_command == "targets":
        from .context import AMONG

        for among in args.among or AMONG:
            print(f"{among}:")
            for name, site in sorted(ctx.candidates(among).items()):
                print(f"  {name}" + (f"  (site {site})" if site else ""))
        return 0
    if args.chaos_command == "heal":
        return _heal(ctx)
    kind, among, names, params = _one_shot_args(args, ctx)
    hold_s = getattr(args, "hold_s", None)
    from .faults import FAULT_KINDS, params_of
    from .scenario import one_shot

    scenario = one_shot(kind, among, names, params=params, hold_s=hold_s,
                        bound_s=args.bound_s)  # a bad value: ScenarioError, exit 2
    if hold_s is None and FAULT_KINDS[kind].undoable(params_of(kind, params)):
        return _leave_in_force(ctx, kind, names, params, args)
    return _run(ctx, scenario, args)


def _one_shot_args(args: argparse.Namespace, ctx: Any
                   ) -> tuple[str, str, list[str], dict[str, Any]]:
    from .context import ChaosError

    cmd = args.chaos_command
    if cmd in ("kill-actor", "pause"):
        among = "supervisors" if cmd == "pause" and args.target in ctx.candidates(
            "supervisors") else "actors"
        return cmd, among, [args.target], {}
    if cmd == "kill-supervisor":
        return cmd, "supervisors", [args.target], {}
    if cmd == "kill-node":
        return cmd, "nodes", [args.target], {"restart": args.hold_s is not None}
    if cmd == "pause-node":
        return cmd, "nodes", [args.target], {}
    if cmd in _LINK:
        nodes = ctx.candidates("nodes")
        among = "nodes" if all(n in nodes for n in args.names) else "sites"
        kind = cmd
        params: dict[str, Any] = {}
        if cmd == "partition" and args.one_way:
            kind = "partition-one-way"
        elif cmd == "partition" and args.bridge:
            kind = "partition-bridge"
        elif cmd == "link-loss":
            params = {"probability": args.probability}
        elif cmd == "link-delay":
            params = {"delay_s": args.delay_s}
        return kind, among, list(args.names), params
    if cmd == "skew":
        return "clock-skew", "nodes", [args.target], {"offset_s": args.offset_s}
    if cmd == "venue-fault":
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise ChaosError(f"--param {item!r}: expected K=V")
            params[key] = _value(value)
        key = next(k for k, v in ctx.venues.items() if v is ctx.venue(args.target))
        return f"venue-{args.kind}", "venues", [key], params  # a bare name resolved
    if cmd == "corrupt-journal":
        seq: Any = int(args.seq) if args.seq.isdigit() else args.seq
        among = "actors" if args.target in ctx.candidates("actors") else "streams"
        return cmd, among, [args.target], {"seq": seq}
    raise ChaosError(f"unknown chaos command {cmd!r}")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _run(ctx: Any, scenario: Any, args: argparse.Namespace) -> int:
    from cluster.history import HistoryWriter

    from .scenario import Runner, plan

    the_plan = plan(scenario, ctx.candidates)
    print(the_plan.render())
    if getattr(args, "dry_run", False):
        if args.json:
            print(json.dumps(the_plan.to_dict()))
        return 0
    history = HistoryWriter(args.history) if args.history else None
    try:
        report = Runner(ctx, history=history, watch=not args.no_wait, say=print).run(the_plan)
    finally:
        if history is not None:
            history.close()
    print(f"{len(report.injected)} injected, {len(report.undone)} undone, "
          f"{len(report.recovered)} recovered, {len(report.not_recovered)} not recovered, "
          f"{len(report.errors)} error(s)")
    if args.json:
        print(json.dumps(report.to_dict(), default=str))
    return 0 if report.ok else EXIT_FAILED


def _leave_in_force(ctx: Any, kind: str, names: list[str], params: dict[str, Any],
                    args: argparse.Namespace) -> int:
    """A fault with an undo, applied without ``--for``: left in force, nothing watched."""
    from .context import ChaosError
    from .faults import inject, units

    if kind in _NEEDS_FOR:
        raise ChaosError(f"{kind}: give --for S (a process paused for good helps nobody)")
    targets = tuple(names)
    for unit in units(kind, targets):
        injected = inject(ctx, kind, unit, params)
        out = injected.record.to_dict()
        print(json.dumps(out, default=str) if args.json else
              f"{kind} on {out['target']}: {out['evidence']} (left in force)")
    return 0


def _heal(ctx: Any) -> int:
    from .context import ChaosError

    done = []
    try:
        links = ctx.links()
        links.clear_all()
        done.append(f"link faults cleared on {len(links.members())} member(s)")
    except ChaosError as exc:
        done.append(f"links: {exc}")
    for name, venue in ctx.venues.items():
        try:
            venue.set_faults(reset=True)
            done.append(f"venue {name}: faults reset")
        except ChaosError as exc:
            done.append(f"venue {name}: {exc}")
    print("\n".join(done))
    return 0


def _list_faults() -> int:
    from .faults import FAULT_KINDS

    for kind in FAULT_KINDS.values():
        fields = ", ".join(f"{k}" for k in kind.params.model_fields) or "-"
        print(f"{kind.name:<28} among {'|'.join(kind.among):<19} params {fields:<28} "
              f"{kind.summary}")
    return 0
