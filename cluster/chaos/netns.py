"""Real network partitions: Linux network namespaces, one bridge, and nftables drop rules (root).

    with NetLab(["a", "b", "c"]) as lab:
        proc = lab.run("a", ["python", "-m", "something", "--bind", lab.address("a")])
        lab.partition([{"a", "b"}, {"c"}])      # a<->b works, a<->c and b<->c are dropped
        lab.heal()

Layout (every name carries a per-lab run id, e.g. ``bst-3f9a0c-a``, so parallel labs never meet):

* one namespace per node, holding ``eth0`` with an address on a private /24 (default
  ``10.213.X.0/24``, X from the run id) and ``lo``; the only route is the connected /24 — there
  is no default route, so nothing can leave the lab;
* one more namespace, ``<prefix><run id>-_bridge``, holding the Linux bridge and the bridge-side
  end of every node's veth pair. The bridge lives there rather than in the root namespace so that
  the root namespace gets no device, no address and no route at all: other processes on this
  machine (Ray clusters of other runs) see nothing change. Each veth pair is created directly
  inside the bridge namespace with its peer created directly inside the node's namespace;
* IPv6 is switched off in the lab's namespaces, so link-local IPv6 cannot bypass the IPv4 rules.

Faults are a model (directed blocked pairs plus per-direction loss) rendered into one ``inet``
table owned by the lab in each node's namespace and replaced atomically (one ``nft -f``
transaction per node) whenever the model changes. A blocked or lossy ``src -> dst`` direction
is dropped in ``dst``'s *input* hook (``ip saddr SRC drop``; loss adds ``numgen random mod
1000000 < p * 1000000``), so the sender sees nothing, as when a real network loses a packet —
dropping in the sender's output hook instead would fail its ``sendto``/``connect`` at once with
EPERM, which no real partition does. Every rule counts what it drops (:meth:`NetLab.dropped`,
read on the receiving node). Faults accumulate until :meth:`NetLab.heal` / :meth:`NetLab.heal_link`.

Teardown (:meth:`NetLab.close`, the ``with`` block, or a finalizer that also runs at interpreter
exit) kills the processes started in the lab, deletes the tables and the namespaces (which takes
the veth pairs and the bridge with them) and the owner record, even after a failure halfway
through building. A lab whose owner died without tearing down (SIGKILL) is removed by
:meth:`NetLab.cleanup_stale`, which knows a lab is stale from its owner record in
``/run/bastion-netlab`` (owner PID and start time).

:meth:`NetLab.available` says up front whether this machine can do all this (root, ``ip``,
``nft``, a namespace with a veth, a bridge and an nftables table); tests skip with its reason, or
fail when ``BASTION_REQUIRE_NETNS=1`` (CI) is set.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import weakref
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

#: Set to ``1`` (CI does) to make a machine that cannot run a lab a test failure, not a skip.
REQUIRE_NETNS_ENV = "BASTION_REQUIRE_NETNS"
DEFAULT_PREFIX = "bst-"
#: Owner records of live labs, read by :meth:`NetLab.cleanup_stale`.
RUN_DIR = Path("/run/bastion-netlab")
#: First two octets of the default lab subnet; the third comes from the run id.
DEFAULT_SUBNET_BASE = "10.213"

_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
_BRIDGE_SUFFIX = "_bridge"  # not a valid node name, so it never collides with a node's namespace
_RUN_ID_HEX = 6
_COMMAND_TIMEOUT_S = 15.0
_TERM_GRACE_S = 2.0
_KILL_WAIT_S = 5.0
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_LOSS_SCALE = 1_000_000  # numgen modulus: loss probabilities resolve to 1e-6


class NetLabError(RuntimeError):
    """Raised when a lab cannot be built, changed or torn down, or when an argument names an
    unknown node or a bad value; the message names the command or the field and the value."""


@functools.cache
def _tool(name: str) -> str | None:
    """Absolute path of ``ip`` / ``nft``, also where ``/usr/sbin`` is not on PATH."""
    found = shutil.which(name)
    if found is None:
        found = next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                      if p.is_file() and os.access(p, os.X_OK)), None)
    return found


def _resolved(argv: Sequence[str]) -> list[str]:
    head = argv[0]
    return [(_tool(head) or head) if head in ("ip", "nft") else head, *argv[1:]]


def _cmd(argv: Sequence[str], *, input_text: str | None = None, check: bool = True,
         timeout_s: float = _COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    argv = _resolved(argv)
    proc = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if check and proc.returncode != 0:
        raise NetLabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return [*_resolved(["ip", "netns", "exec", ns]), *_resolved(argv)]


def _list_namespaces() -> list[str]:
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _namespace_pids(ns: str) -> list[int]:
    proc = _cmd(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _disable_ipv6(ns: str) -> None:
    for scope in ("default", "all"):
        knob = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
        # /proc/sys/net is per network namespace: write it from inside the namespace.
        _cmd(_ns_exec(ns, ["sh", "-c", f"test ! -e {knob} || echo 1 > {knob}"]))


# --------------------------------------------------------------------------- ownership/teardown

@dataclass
class _Owned:
    """What a lab owns, kept apart from the lab so the finalizer needs no reference to it."""

    run_id: str
    table: str
    node_namespaces: list[str] = field(default_factory=list)
    bridge_namespace: str | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    record: Path | None = None


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # started in its own session (the default of NetLab.run)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _stop_proc(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=_TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_KILL_WAIT_S)


def _kill_namespace_pids(namespaces: Iterable[str]) -> None:
    """SIGKILL whatever still runs inside the lab's namespaces (all started by the lab: the
    namespaces are unique to it) and wait for it, so deleting a namespace really frees it."""
    victims: list[psutil.Process] = []
    for ns in namespaces:
        for pid in _namespace_pids(ns):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.kill()
                victims.append(proc)
    psutil.wait_procs(victims, timeout=_KILL_WAIT_S)


def _teardown(owned: _Owned) -> list[str]:
    """Undo everything ``owned`` lists; go on past errors and return them."""
    problems: list[str] = []
    for proc in owned.procs:
        try:
            _stop_proc(proc)
        except Exception as exc:  # noqa: BLE001 - teardown goes on; reported below
            problems.append(f"stop pid {proc.pid}: {exc!r}")
    owned.procs.clear()
    namespaces = [*owned.node_namespaces,
                  *([owned.bridge_namespace] if owned.bridge_namespace else [])]
    try:
        present = set(_list_namespaces())
        namespaces = [ns for ns in namespaces if ns in present]
        _kill_namespace_pids(namespaces)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"kill processes in namespaces: {exc!r}")
    for ns in namespaces:
        try:
            if ns in owned.node_namespaces:  # the table lives in node namespaces only
                _cmd(_ns_exec(ns, ["nft", "delete", "table", "inet", owned.table]), check=False)
            _cmd(["ip", "netns", "delete", ns])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"delete {ns}: {exc!r}")
    owned.node_namespaces.clear()
    owned.bridge_namespace = None
    if owned.record is not None:
        with contextlib.suppress(FileNotFoundError):
            owned.record.unlink()
        owned.record = None
    for problem in problems:
        log.warning("netlab %s teardown: %s", owned.run_id, problem)
    return problems


def _owner_alive(record: Path) -> bool:
    try:
        data = json.loads(record.read_text())
        proc = psutil.Process(int(data["pid"]))
        return abs(proc.create_time() - float(data["create_time"])) < 1.0
    except (OSError, ValueError, KeyError, psutil.Error):
        return False


# --------------------------------------------------------------------------- capability probe

@functools.cache
def _probe() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, f"network namespaces need root (euid is {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if _tool(tool) is None:
            return False, f"`{tool}` not found (apt-get install -y {package})"
    ns = f"{DEFAULT_PREFIX}probe{secrets.token_hex(3)}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "add", "pv0", "type", "veth", "peer", "name", "pv1"],
        ["ip", "-n", ns, "link", "add", "pbr", "type", "bridge"],
        ["ip", "-n", ns, "link", "set", "pv0", "master", "pbr"],
        _ns_exec(ns, ["nft", "add", "table", "inet", "probe"]),
    ]
    try:
        for argv in steps:
            _cmd(argv)
    except (NetLabError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot build a network namespace lab here: {exc}"
    finally:
        _cmd(["ip", "netns", "delete", ns], check=False)
    return True, "root, ip and nft present; namespace, veth, bridge and nftables work"


# --------------------------------------------------------------------------- the lab

class NetLab:
    """N nodes, each in its own network namespace on one private bridge, with real faults.

    Built on construction (a failure halfway tears down what was made and raises
    :class:`NetLabError`); torn down by :meth:`close`, the ``with`` block, or at the latest by a
    finalizer at interpreter exit.
    """

    def __init__(self, nodes: Sequence[str], *, subnet: str | None = None,
                 prefix: str = DEFAULT_PREFIX) -> None:
        nodes = list(nodes)
        if not nodes:
            raise NetLabError("NetLab.nodes must name at least one node, got []")
        for node in nodes:
            if not isinstance(node, str) or not _NODE_NAME.match(node):
                raise NetLabError(f"NetLab.nodes: node name must match {_NODE_NAME.pattern}, "
                                  f"got {node!r}")
        if len(set(nodes)) != len(nodes):
            raise NetLabError(f"NetLab.nodes must be distinct, got {nodes!r}")
        if not _PREFIX.match(prefix):
            raise NetLabError(f"NetLab.prefix must match {_PREFIX.pattern}, got {prefix!r}")
        self.run_id = secrets.token_hex(_RUN_ID_HEX // 2)
        self.prefix = prefix
        if subnet is None:
            subnet = f"{DEFAULT_SUBNET_BASE}.{int(self.run_id[:2], 16)}.0/24"
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise NetLabError(f"NetLab.subnet must be an IPv4 network, got {subnet!r}") from exc
        if not any(net.subnet_of(block) for block in _RFC1918) or net.num_addresses - 2 < len(nodes):
            raise NetLabError(f"NetLab.subnet must be an RFC 1918 network with room for "
                              f"{len(nodes)} hosts, got {subnet!r}")
        self.subnet = net
        self.nodes: tuple[str, ...] = tuple(nodes)
        hosts = net.hosts()
        self._addresses = {node: str(next(hosts)) for node in nodes}
        self._table = f"bastion_{self.run_id}"
        self._blocked: set[tuple[str, str]] = set()
        self._loss: dict[tuple[str, str], float] = {}
        self._applied: dict[str, str] = {}
        self._owned = _Owned(run_id=self.run_id, table=self._table)
        self._finalizer = weakref.finalize(self, _teardown, self._owned)
        try:
            self._build()
        except BaseException as exc:
            self._finalizer()
            if isinstance(exc, OSError | subprocess.SubprocessError):
                raise NetLabError(f"NetLab {self.run_id}: build failed: {exc!r}") from exc
            raise

    # -- names and addresses
    def namespace(self, node: str) -> str:
        """The network namespace of ``node``, e.g. ``bst-3f9a0c-a``."""
        self._check_node(node, "node")
        return f"{self.prefix}{self.run_id}-{node}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.prefix}{self.run_id}-{_BRIDGE_SUFFIX}"

    @property
    def table(self) -> str:
        """Name of the lab's ``inet`` table in every node namespace."""
        return self._table

    def address(self, node: str) -> str:
        """The IPv4 address of ``node`` inside the lab."""
        self._check_node(node, "node")
        return self._addresses[node]

    def bridge_device(self) -> str:
        return f"bsw{self.run_id}"

    def _veth(self, index: int) -> str:
        return f"bv{self.run_id}-{index}"  # <= 15 characters for up to 100000 nodes

    def _check_node(self, node: str, what: str) -> None:
        if node not in self._addresses:
            raise NetLabError(f"NetLab: {what} must be one of {list(self.nodes)}, got {node!r}")

    # -- build / teardown
    def _build(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        record = RUN_DIR / f"{self.run_id}.json"
        me = psutil.Process()
        record.write_text(json.dumps({
            "run_id": self.run_id, "prefix": self.prefix, "pid": me.pid,
            "create_time": me.create_time(), "nodes": list(self.nodes),
            "subnet": str(self.subnet)}))
        self._owned.record = record
        br_ns, sw = self.bridge_namespace, self.bridge_device()
        _cmd(["ip", "netns", "add", br_ns])
        self._owned.bridge_namespace = br_ns
        _disable_ipv6(br_ns)
        _cmd(["ip", "-n", br_ns, "link", "add", sw, "type", "bridge"])
        _cmd(["ip", "-n", br_ns, "link", "set", sw, "up"])
        plen = str(self.subnet.prefixlen)
        for index, node in enumerate(self.nodes):
            ns, veth = self.namespace(node), self._veth(index)
            _cmd(["ip", "netns", "add", ns])
            self._owned.node_namespaces.append(ns)
            _disable_ipv6(ns)
            _cmd(["ip", "-n", br_ns, "link", "add", veth, "type", "veth",
                  "peer", "name", "eth0", "netns", ns])
            _cmd(["ip", "-n", br_ns, "link", "set", veth, "master", sw, "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self._addresses[node]}/{plen}", "dev", "eth0"])
            _cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._apply(force=True)

    def close(self) -> None:
        """Tear the lab down (idempotent): processes, tables, namespaces, links, owner record."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._blocked)} blocked, {len(self._loss)} lossy"
        return f"NetLab({self.prefix}{self.run_id}, nodes={list(self.nodes)}, {state})"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this machine can run a lab, and why not (probed once per process)."""
        return _probe()

    @classmethod
    def cleanup_stale(cls, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """Delete the namespaces (and their links, tables and processes) of labs named with
        ``prefix`` whose owner process is gone; labs of live owners are left alone. Returns
        the namespaces deleted."""
        pattern = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{{_RUN_ID_HEX}}})-(.+)$")
        by_run: dict[str, list[str]] = {}
        for ns in _list_namespaces():
            match = pattern.match(ns)
            if match:
                by_run.setdefault(match.group(1), []).append(ns)
        removed: list[str] = []
        for run_id, namespaces in sorted(by_run.items()):
            record = RUN_DIR / f"{run_id}.json"
            if _owner_alive(record):
                continue
            bridge = [ns for ns in namespaces if ns.endswith(f"-{_BRIDGE_SUFFIX}")]
            owned = _Owned(run_id=run_id, table=f"bastion_{run_id}",
                           node_namespaces=[ns for ns in namespaces if ns not in bridge],
                           bridge_namespace=bridge[0] if bridge else None,
                           record=record)
            _teardown(owned)
            removed.extend(namespaces)
        if RUN_DIR.is_dir():  # records of dead owners whose namespaces are already gone
            for record in RUN_DIR.glob("*.json"):
                if record.stem not in by_run and not _owner_alive(record):
                    with contextlib.suppress(FileNotFoundError):
                        record.unlink()
        return removed

    # -- processes
    def run(self, node: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``node``'s namespace (``ip netns exec``). The process starts in
        its own session unless ``start_new_session`` is given, and is stopped (SIGTERM to its
        group, SIGKILL after a grace) when the lab is torn down."""
        if self.closed:
            raise NetLabError(f"{self!r}: cannot run a process in a closed lab")
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(_ns_exec(self.namespace(node), argv), **popen_kw)
        self._owned.procs.append(proc)
        return proc

    def check_output(self, node: str, argv: Sequence[str],
                     timeout_s: float = _COMMAND_TIMEOUT_S) -> str:
        """Run a short command inside ``node``'s namespace and return its stdout."""
        return _cmd(_ns_exec(self.namespace(node), argv), timeout_s=timeout_s).stdout

    # -- faults
    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Drop all traffic, both ways, between nodes of different groups. Groups must be
        disjoint; a node in no group keeps all its links."""
        sets = [set(group) for group in groups]
        if len(sets) < 2:
            raise NetLabError(f"NetLab.partition: groups must hold at least two groups, got {groups!r}")
        seen: set[str] = set()
        for group in sets:
            for node in group:
                self._check_node(node, "partition group member")
            if seen & group:
                raise NetLabError(f"NetLab.partition: groups must be disjoint, {sorted(seen & group)} "
                                  f"appear twice in {groups!r}")
            seen |= group
        for i, left in enumerate(sets):
            for right in sets[i + 1:]:
                self._block_between(left, right)
        self._apply()

    def isolate(self, node: str) -> None:
        """Cut ``node`` off from every other node, both ways."""
        self._check_node(node, "isolate node")
        self.partition([{node}, set(self.nodes) - {node}])

    def bridge(self, a_group: Collection[str], b_group: Collection[str], bridge_node: str) -> None:
        """``a_group`` and ``b_group`` cannot talk to each other; both still reach
        ``bridge_node`` (and it them)."""
        a, b = set(a_group), set(b_group)
        for node in a | b:
            self._check_node(node, "bridge group member")
        self._check_node(bridge_node, "bridge_node")
        if a & b or bridge_node in a | b or not a or not b:
            raise NetLabError(f"NetLab.bridge: a_group {sorted(a)} and b_group {sorted(b)} must be "
                              f"non-empty, disjoint and not hold bridge_node {bridge_node!r}")
        self._block_between(a, b)
        self._apply()

    def one_way(self, src: str, dst: str) -> None:
        """Drop packets from ``src`` to ``dst``; packets from ``dst`` to ``src`` still pass (so a
        TCP connection fails both ways — its handshake needs both — but datagrams show it)."""
        self._check_pair(src, dst)
        self._blocked.add((src, dst))
        self._apply()

    def loss(self, src: str, dst: str, probability: float) -> None:
        """Drop each packet from ``src`` to ``dst`` with ``probability`` (0 removes the loss)."""
        self._check_pair(src, dst)
        if not 0.0 <= probability <= 1.0:
            raise NetLabError(f"NetLab.loss: probability must be in [0, 1], got {probability!r}")
        if probability == 0.0:
            self._loss.pop((src, dst), None)
        else:
            self._loss[(src, dst)] = float(probability)
        self._apply()

    def heal(self) -> None:
        """Remove every fault: all nodes reach all nodes again."""
        self._blocked.clear()
        self._loss.clear()
        self._apply()

    def heal_link(self, a: str, b: str) -> None:
        """Remove blocks and loss between ``a`` and ``b``, both directions."""
        self._check_pair(a, b)
        for pair in ((a, b), (b, a)):
            self._blocked.discard(pair)
            self._loss.pop(pair, None)
        self._apply()

    def faults(self) -> dict[str, Any]:
        """The current fault model: blocked directed pairs and lossy directed pairs."""
        return {"blocked": sorted(self._blocked),
                "loss": {f"{s}->{d}": p for (s, d), p in sorted(self._loss.items())}}

    def dropped(self, node: str) -> dict[str, int]:
        """Packets dropped so far by each rule of ``node``'s table, keyed by the rule's comment
        (``block a->node`` or ``loss a->node``: drops happen at the receiver). Counters start
        from zero whenever the node's rules change."""
        out = self.check_output(node, ["nft", "-j", "list", "table", "inet", self._table])
        counts: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            packets = sum(expr["counter"]["packets"] for expr in rule.get("expr", [])
                          if isinstance(expr, dict) and "counter" in expr)
            counts[rule["comment"]] = counts.get(rule["comment"], 0) + packets
        return counts

    def _check_pair(self, src: str, dst: str) -> None:
        self._check_node(src, "src")
        self._check_node(dst, "dst")
        if src == dst:
            raise NetLabError(f"NetLab: src and dst must differ, got {src!r} twice")

    def _block_between(self, left: set[str], right: set[str]) -> None:
        for x in left:
            for y in right:
                self._blocked.update({(x, y), (y, x)})

    def _render(self, node: str) -> str:
        rules = []
        for src, dst in sorted(self._blocked):
            if dst == node:
                rules.append(f'ip saddr {self._addresses[src]} counter drop '
                             f'comment "block {src}->{dst}"')
        for (src, dst), probability in sorted(self._loss.items()):
            if dst == node:
                threshold = round(probability * _LOSS_SCALE)
                rules.append(f'ip saddr {self._addresses[src]} numgen random mod {_LOSS_SCALE} '
                             f'< {threshold} counter drop comment "loss {src}->{dst}"')
        body = "".join(f"    {rule}\n" for rule in rules)
        table = f"inet {self._table}"
        # add + delete + define in one transaction: an atomic replacement of the whole table.
        return (f"add table {table}\ndelete table {table}\ntable {table} {{\n"
                f"  chain input {{\n    type filter hook input priority -10; policy accept;\n"
                f"{body}  }}\n}}\n")

    def _apply(self, force: bool = False) -> None:
        if self.closed:
            raise NetLabError(f"{self!r}: cannot change faults of a closed lab")
        for node in self.nodes:
            script = self._render(node)
            if force or self._applied.get(node) != script:
                _cmd(_ns_exec(self.namespace(node), ["nft", "-f", "-"]), input_text=script)
                self._applied[node] = script
