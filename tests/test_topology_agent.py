"""MeshAgent over real ZeroMQ sockets on 127.0.0.1.

Separate processes (``python -m topology.agent``) where signals are the point — a crash
(SIGKILL), a hang (SIGSTOP / SIGCONT), a clean stop (SIGTERM) and the process output checked for
secrets; in-process agents elsewhere (link faults, hostile frames, CURVE, payloads, events). All
with the ``local`` preset (50 ms heartbeats). Every wait polls a condition with a bound and
reports the last state it saw.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import wait_until
from topology.agent import MeshAgent
from topology.agent_process import ControlClient, ControlError, ControlServer
from topology.agent_types import AgentState, AgentStoppedError, MeshEvent, Peer, UnknownPeerError
from topology.clock import MonotonicClock
from topology.config import MeshConfig
from topology.frames import FRAME_VERSION, FrameError, Heartbeat, Payload, encode
from topology.keys import CurveIdentity, generate_keypair, load_identity
from topology.lease import LeaseConfig, LeaseReply, LeaseRequest, decode_lease_message
from topology.witness import LEASE_KIND, serve_lease_voter

LOCAL = MeshConfig.preset("local")
REPO = Path(__file__).resolve().parents[1]
#: Generous bound on crash / hang detection (the local preset aims at ~0.45 s).
DETECT_BOUND_S = 3.0
UP_BOUND_S = 10.0


def _site(i: int) -> str:
    return "tokyo" if i % 2 == 0 else "london"


def _all_see(observers: Callable[[], dict[str, dict[str, Any]]], node: str, state: str,
             min_incarnation: int = 0) -> dict[str, Any]:
    """Raise (for wait_until to report) unless every observer sees ``node`` in ``state``."""
    seen = observers()
    assert seen and all(m.get(node, {}).get("state") == state and
                        (m[node].get("incarnation") or 0) >= min_incarnation
                        for m in seen.values()), {o: m.get(node) for o, m in seen.items()}
    return seen


# ---------------------------------------------------------------------------------------------
# In-process meshes

@dataclass
class Mesh:
    agents: dict[str, MeshAgent]
    idents: dict[str, CurveIdentity | None]

    def __getitem__(self, node: str) -> MeshAgent:
        return self.agents[node]

    def members(self, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
        return {n: a.status()["members"] for n, a in self.agents.items() if n not in exclude}

    def wait_all_up(self, timeout_s: float = UP_BOUND_S, *, full_views: bool = True) -> None:
        """Every agent sees every other up, and (``full_views``) holds a full view from each,
        so that a fault injected next starts from a settled picture."""
        for node in self.agents:
            wait_until(lambda node=node: _all_see(lambda: self.members((node,)), node, "alive"),
                       timeout_s, f"everyone to see {node} up")

        def settled() -> bool:
            views = {n: a.status()["partition"]["views"] for n, a in self.agents.items()}
            want = {n: sorted(set(self.agents) - {n}) for n in self.agents}
            assert all(v == want for v in views.values()), views
            return True
        if full_views:
            wait_until(settled, timeout_s, "every agent to hold everyone's full view")


@pytest.fixture
def mesh_factory() -> Iterator[Callable[..., Mesh]]:
    """Builds started, fully wired in-process meshes; stops every agent afterwards and checks
    that no agent thread is left."""
    made: list[MeshAgent] = []

    def make(n: int = 3, *, curve: bool = False, prefix: str = "n",
             before_start: Callable[[MeshAgent], None] | None = None, **agent_kw: Any) -> Mesh:
        ids = [f"{prefix}{i}" for i in range(n)]
        idents = {nid: CurveIdentity.generate() if curve else None for nid in ids}
        agents = {nid: MeshAgent(nid, _site(i), "tcp://127.0.0.1:*", {}, LOCAL,
                                 curve=idents[nid], **agent_kw.get(nid, {}))
                  for i, nid in enumerate(ids)}
        for a in agents.values():
            if before_start is not None:
                before_start(a)
            a.start()
            made.append(a)
        for a in agents.values():
            for b in agents.values():
                if a is not b:
                    key = idents[b.node_id].public if curve else None
                    a.add_peer(b.node_id, Peer(b.endpoint, b.site, key))
        mesh = Mesh(agents, idents)
        mesh.wait_all_up()
        return mesh

    yield make
    for a in made:
        a.stop()
    names = {f"mesh-{a.node_id}" for a in made}
    left = [t.name for t in threading.enumerate() if t.name.split("-payloads")[0]
            .split("-events")[0] in names and t.is_alive()]
    assert not left, f"agent threads still running: {left}"


@pytest.fixture
def raw_socket() -> Iterator[Callable[..., zmq.Socket]]:
    """A hostile client: a raw DEALER connected to an agent's ROUTER (optionally with CURVE
    keys of its own)."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(endpoint: str, *, server_key: bytes | None = None,
                ident: CurveIdentity | None = None) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if server_key is not None and ident is not None:
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = \
                server_key, ident.public, ident.secret
        s.connect(endpoint)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close(linger=0)
    ctx.term()


class FlakyClock:
    """A real clock that raises on demand: the next ``fail_next`` reads, or every read while
    ``always`` is set (a fault inside the agent's own loop)."""

    def __init__(self) -> None:
        self.base = MonotonicClock()
        self.fail_next = 0
        self.always = False

    def now_s(self) -> float:
        if self.always or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            raise RuntimeError("injected clock fault")
        return self.base.now_s()


@pytest.fixture
def flaky_clock() -> FlakyClock:
    return FlakyClock()


@pytest.fixture
def cut_links() -> Iterator[Callable[..., None]]:
    """Injects socket-level link faults (LinkFaults) and clears them afterwards."""
    touched: list[MeshAgent] = []

    def cut(agent: MeshAgent, peer: str, **faults: float) -> None:
        agent.set_link_faults(peer, **faults)
        touched.append(agent)

    yield cut
    for agent in touched:
        if agent.state is AgentState.RUNNING:
            agent.clear_link_faults()


def _events(agent: MeshAgent, node: str | None = None, kinds: tuple[str, ...] = ()) -> list:
    return [(e["kind"], e["node_id"]) for e in agent.events_since(0)
            if (node is None or e["node_id"] == node) and (not kinds or e["kind"] in kinds)]


# ---------------------------------------------------------------------------------------------
# Agent processes

@dataclass
class AgentProc:
    node_id: str
    proc: subprocess.Popen
    endpoint: str
    control: ControlClient
    log_path: Path
    ident: CurveIdentity

    def status(self) -> dict[str, Any]:
        return self.control.call("status")

    def events(self) -> list[dict[str, Any]]:
        return self.control.call("events_since", seq=0)


def _read_ready(proc: subprocess.Popen, timeout_s: float) -> dict[str, str]:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no MESH_READY line within {timeout_s} s (exit code {proc.poll()})"
    line = proc.stdout.readline()
    assert line.startswith("MESH_READY "), f"unexpected first line {line!r}"
    return dict(kv.split("=", 1) for kv in line.split()[1:])


@pytest.fixture
def process_mesh(tmp_path: Path) -> Iterator[Callable[[int], dict[str, AgentProc]]]:
    """Starts N agent processes with CURVE keys, wires them through their control sockets and
    waits until all are up. Afterwards every process is gone (SIGCONT + SIGKILL if needed),
    checked by PID."""
    started: list[AgentProc] = []

    def start(n: int) -> dict[str, AgentProc]:
        keys = tmp_path / "keys"
        procs = {}
        for i in range(n):
            nid = f"p{i}"
            _, secret = generate_keypair(keys, nid)
            cfg = {"node_id": nid, "site": _site(i), "preset": "local",
                   "secret_key_file": f"keys/{nid}.key_secret", "log_level": "DEBUG"}
            (tmp_path / f"{nid}.json").write_text(json.dumps(cfg))
            log_path = tmp_path / f"{nid}.log"
            with open(log_path, "w") as log_file:
                procs[nid] = (subprocess.Popen(
                    [sys.executable, "-m", "topology.agent", "--config",
                     str(tmp_path / f"{nid}.json")], cwd=REPO, stdout=subprocess.PIPE,
                    stderr=log_file, text=True), log_path, load_identity(secret))
        for nid, (proc, log_path, ident) in procs.items():
            info = _read_ready(proc, 20.0)
            agent = AgentProc(nid, proc, info["endpoint"], ControlClient(info["control"]),
                              log_path, ident)
            started.append(agent)
        mesh = {a.node_id: a for a in started[-n:]}
        for a in mesh.values():
            for b in mesh.values():
                if a is not b:
                    a.control.call("add_peer", node_id=b.node_id, endpoint=b.endpoint,
                                   site=_site(int(b.node_id[1:])),
                                   public_key=b.ident.public.decode())
        for node in mesh:
            wait_until(lambda node=node: _all_see(
                lambda: {o: a.status()["members"] for o, a in mesh.items() if o != node},
                node, "alive"), UP_BOUND_S, f"everyone to see {node} up")
        return mesh

    yield start
    for a in started:
        if a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
            a.proc.kill()
        a.proc.wait(10)
        a.control.close()
        a.proc.stdout.close()
    alive = [a.proc.pid for a in started if _pid_alive(a.proc.pid)]
    assert not alive, f"agent processes left behind: {alive}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _detections(observers: dict[str, AgentProc], node: str, kind: str, since_wall_s: float,
                timeout_s: float) -> dict[str, float]:
    """Seconds from ``since_wall_s`` to each observer's first ``kind`` event about ``node``."""
    def check() -> dict[str, float]:
        found = {}
        for o, a in observers.items():
            ev = next((e for e in a.events() if e["kind"] == kind and e["node_id"] == node
                       and e["wall_s"] >= since_wall_s), None)
            if ev is not None:
                found[o] = round(ev["wall_s"] - since_wall_s, 3)
        assert len(found) == len(observers), f"{kind} of {node} seen by {found} so far"
        return found
    return wait_until(check, timeout_s, f"every observer to see {node} {kind}")


def test_start_when_five_processes_with_curve_then_all_up_sigterm_leaves_and_no_secret_leaks(
        process_mesh):
    mesh = process_mesh(5)
    statuses = {n: a.status() for n, a in mesh.items()}
    for n, st in statuses.items():
        assert st["curve"] and st["public_key"] == mesh[n].ident.public.decode()
        assert {m for m, v in st["members"].items() if v["state"] == "alive"} == set(mesh) - {n}
        assert st["errors"] == {}
    # Wired one by one, some agents dialled a peer before it allow-listed their key: each
    # refusal is counted by the server, and the client re-made that link after a back-off.
    assert sum(sum(st["dropped"]["unauthenticated"].values()) for st in statuses.values()) == \
        sum(st["relinks"] for st in statuses.values())
    quitter = mesh.pop("p4")
    t0 = time.time()
    quitter.proc.send_signal(signal.SIGTERM)
    assert quitter.proc.wait(10) == 0
    left_s = _detections(mesh, "p4", "left", t0, DETECT_BOUND_S)
    assert all(k != ("down", "p4") for a in mesh.values()
               for k in ((e["kind"], e["node_id"]) for e in a.events())), "left, not down"
    for a in mesh.values():
        a.proc.send_signal(signal.SIGTERM)
    assert [a.proc.wait(10) for a in mesh.values()] == [0, 0, 0, 0]
    everything = "".join(a.log_path.read_text() + a.proc.stdout.read() for a in
                         [*mesh.values(), quitter]) + json.dumps(statuses)
    for a in [*mesh.values(), quitter]:
        assert a.ident.secret.decode() not in everything, f"{a.node_id}'s secret key leaked"
        assert a.ident.public.decode() in a.log_path.read_text()   # the logs were captured
    print(f"graceful leave seen after {left_s} s")


def test_sigkill_when_agent_process_crashes_then_every_peer_declares_it_down_quickly(
        process_mesh, record_property):
    mesh = process_mesh(5)
    victim = mesh.pop("p2")
    t0 = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    down_s = _detections(mesh, "p2", "down", t0, DETECT_BOUND_S + 2)
    record_property("crash_detection_s", down_s)
    print(f"SIGKILL -> down after {down_s} s")
    assert max(down_s.values()) <= DETECT_BOUND_S, f"crash detection took {down_s} s"
    for a in mesh.values():
        kinds = [k for k, n in ((e["kind"], e["node_id"]) for e in a.events()) if n == "p2"]
        assert kinds == ["up", "suspect", "down"] or kinds == ["up", "down"], kinds


def test_sigstop_when_agent_hangs_then_down_and_after_sigcont_it_refutes_and_is_up_again(
        process_mesh, record_property):
    mesh = process_mesh(5)
    victim = mesh["p3"]
    observers = {n: a for n, a in mesh.items() if n != "p3"}
    before = observers["p0"].status()["members"]["p3"]["incarnation"]
    t0 = time.time()
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        down_s = _detections(observers, "p3", "down", t0, DETECT_BOUND_S + 2)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    record_property("hang_detection_s", down_s)
    print(f"SIGSTOP -> down after {down_s} s")
    assert max(down_s.values()) <= DETECT_BOUND_S, f"hang detection took {down_s} s"
    wait_until(lambda: _all_see(lambda: {o: a.status()["members"] for o, a in observers.items()},
                                "p3", "alive", before + 1), UP_BOUND_S, "p3 up again, refuted")
    refuted = [e for e in victim.events() if e["kind"] == "refuted"]
    assert refuted and refuted[-1]["incarnation"] > before
    assert victim.status()["late_ticks"] >= 1   # it noticed it had been frozen
    for node in mesh:
        wait_until(lambda node=node: _all_see(
            lambda: {o: a.status()["members"] for o, a in mesh.items() if o != node},
            node, "alive"), UP_BOUND_S, f"everyone to see {node} up again")


def test_config_when_control_not_on_loopback_then_exit_2_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"node_id": "x", "site": "s", "control": "tcp://0.0.0.0:7000"}))
    out = subprocess.run([sys.executable, "-m", "topology.agent", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "control" in out.stderr and "loopback" in out.stderr
    cfg.write_text(json.dumps({"node_id": "x", "site": "s",
                               "overrides": {"heartbeat_interval_s": -1}}))
    out = subprocess.run([sys.executable, "-m", "topology.agent", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "mesh.heartbeat_interval_s = -1" in out.stderr


def test_witness_process_when_started_then_voter_only_and_sigterm_exits_0(tmp_path):
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"node_id": "w", "site": "witness"}))
    out = subprocess.run([sys.executable, "-m", "topology.witness", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "voter_only needs lease_voter" in out.stderr
    cfg.write_text(json.dumps({"node_id": "w", "site": "witness",
                               "lease_voter": {"store": "promises.json"}}))
    proc = subprocess.Popen([sys.executable, "-m", "topology.witness", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        with ControlClient(_read_ready(proc, 20.0)["control"]) as control:
            status = control.call("status")
        assert status["voter_only"] is True and status["site"] == "witness"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# Link faults (in-process)

def test_broken_link_when_cut_both_ways_then_nobody_declares_it_down_and_one_way_is_asymmetric(
        mesh_factory, cut_links):
    mesh = mesh_factory(5)
    a = mesh["n0"]
    cut_links(a, "n1", drop_out=1.0, drop_in=1.0)
    hold_until = time.monotonic() + 3.0
    while time.monotonic() < hold_until:   # an invariant over a window, checked throughout
        downs = {n: _events(agent, kinds=("down",)) for n, agent in mesh.agents.items()}
        assert not any(downs.values()), f"a broken link was taken for a dead node: {downs}"
        time.sleep(0.05)
    mesh.wait_all_up(2.0, full_views=False)   # a suspicion under load is refuted by now
    faults = a.status()["dropped"]["faults"]
    assert faults["drop_out"] > 0 and faults["drop_in"] > 0
    views = mesh["n2"].status()["partition"]["views"]
    assert "n1" not in views["n0"] and "n0" not in views["n1"], views
    picture = mesh["n2"].status()["partition"]["current"]
    assert not picture["partitioned"] and picture["asymmetric"] == [], picture
    cut_links(a, "n1", drop_out=1.0)   # now one way: n1 no longer hears n0, n0 hears n1

    def one_way() -> dict[str, Any]:
        p = mesh["n2"].status()["partition"]["current"]
        assert p["asymmetric"] == [["n0", "n1"]] and not p["partitioned"], p
        return p
    wait_until(one_way, 5.0, "the one-way link to show in the picture")
    assert not any(_events(agent, kinds=("down",)) for agent in mesh.agents.values())


def test_bridge_when_two_pairs_reach_each_other_only_through_one_node_then_partitioned_event(
        mesh_factory, cut_links):
    mesh = mesh_factory(5)
    for near in ("n0", "n1"):
        for far in ("n3", "n4"):
            cut_links(mesh[near], far, drop_out=1.0, drop_in=1.0)

    def published() -> dict[str, Any]:
        p = mesh["n2"].status()["partition"]["published"]
        assert p and p["bridges"], p
        return p
    picture = wait_until(published, 5.0, "the bridge to be published")
    assert [b["node"] for b in picture["bridges"]] == ["n2"], picture
    assert sorted(g["nodes"] for g in picture["groups"]) == [["n0", "n1"], ["n3", "n4"]]
    assert ("partitioned", None) in _events(mesh["n2"])
    assert not any(_events(agent, kinds=("down",)) for agent in mesh.agents.values())
    mesh["n0"].clear_link_faults()
    mesh["n1"].clear_link_faults()
    wait_until(lambda: ("healed", None) in _events(mesh["n2"]), 5.0, "healed")


def test_delay_when_outgoing_frames_held_then_payload_arrives_late_and_delays_are_counted(
        mesh_factory, cut_links):
    mesh = mesh_factory(3)
    arrived: list[float] = []
    mesh["n1"].on_payload("ping", lambda frm, body: arrived.append(time.monotonic()))
    cut_links(mesh["n0"], "n1", delay_s=0.3)
    sent = time.monotonic()
    mesh["n0"].send_payload("n1", "ping", {})
    wait_until(lambda: arrived, 5.0, "the delayed payload")
    assert arrived[0] - sent >= 0.3
    assert mesh["n0"].status()["dropped"]["faults"]["delayed"] > 0
    assert mesh["n0"].status()["members"]["n1"]["faults"]["delay_s"] == 0.3
    with pytest.raises(ValueError, match="drop_out"):
        mesh["n0"].set_link_faults("n1", drop_out=1.5)
    with pytest.raises(UnknownPeerError):
        mesh["n0"].set_link_faults("nobody", drop_in=1.0)


# ---------------------------------------------------------------------------------------------
# Hostile input and CURVE

def test_hostile_frames_when_garbage_oversize_replayed_or_spoofed_then_dropped_by_reason(
        mesh_factory, raw_socket):
    mesh = mesh_factory(3)
    target = mesh["n0"]
    inc = target.status()["members"]["n1"]["incarnation"]
    raw = raw_socket(target.endpoint)
    hb = Heartbeat("n1", _site(1), inc, 1, 0.0, 0)
    raw.send_multipart([b"only one part"])
    raw.send_multipart([b"n1", b"\xc1 not msgpack"])
    raw.send_multipart([b"n1", b"\x00" * (LOCAL.max_frame_bytes + 10)])
    raw.send_multipart([b"n1", encode(hb).replace(b"\xa2hb", b"\xa2xx")])   # unknown type
    raw.send_multipart([b"stranger", encode(Heartbeat("stranger", "s", 1, 1, 0.0, 0))])
    raw.send_multipart([b"n2", encode(hb)])                                  # n2 speaking as n1
    raw.send_multipart([b"n1", encode(Heartbeat("n1", _site(1), inc - 1, 10**6, 0.0, 0))])
    for _ in range(2000):                                                    # a flood
        raw.send_multipart([b"n1", b"\xc1"])
    # Seq 1 at the current incarnation, once n1 is more than a replay window (32) past it:
    # n1 counts one send per peer, so 2 x 40 sends = 40 heartbeats.
    wait_until(lambda: mesh["n1"].status()["frames"]["sent"].get("hb", 0) > 2 * 40, 10.0,
               "n1 to be a replay window past its first heartbeat")
    raw.send_multipart([b"n1", encode(hb)])
    want = {"malformed": {"not_msgpack": 2001, "oversize": 1, "unknown_type": 1},
            "rejected": {"bad_envelope": 1, "unknown_sender": 1, "spoofed_sender": 1},
            "replayed": {"stale_incarnation": 1, "too_old": 1}}

    def dropped() -> dict[str, Any]:
        d = target.status()["dropped"]
        assert {k: d[k] for k in want} == want, d
        return d
    wait_until(dropped, 10.0, "every hostile frame counted by reason")
    sent_before = target.status()["frames"]["sent"]["hb"]
    wait_until(lambda: target.status()["frames"]["sent"]["hb"] > sent_before + 5, 5.0,
               "the target to keep heartbeating")
    mesh.wait_all_up(2.0)
    assert not any(_events(a, kinds=("suspect", "down")) for a in mesh.agents.values())
    assert target.status()["errors"] == {}
    assert FRAME_VERSION == 1   # the frames above were built for this version


def test_curve_when_unknown_key_or_plaintext_client_then_counted_and_nothing_delivered(
        mesh_factory, raw_socket, caplog):
    caplog.set_level("DEBUG")
    mesh = mesh_factory(3, curve=True)
    target, server_key = mesh["n0"], mesh.idents["n0"].public
    got: list[tuple[str, Any]] = []
    target.on_payload("probe", lambda frm, body: got.append((frm, dict(body))))
    data = encode(Payload("probe", {"from": "intruder"}))
    raw_socket(target.endpoint, server_key=server_key,
               ident=CurveIdentity.generate()).send_multipart([b"n1", data])
    raw_socket(target.endpoint).send_multipart([b"n1", data])
    n1_key = raw_socket(target.endpoint, server_key=server_key, ident=mesh.idents["n1"])
    n1_key.send_multipart([b"n2", data])     # an admitted key speaking for another node

    def counted() -> dict[str, Any]:
        d = target.status()["dropped"]
        refused = d["unauthenticated"]
        # libzmq reports a plaintext client as PROTOCOL, or NO_DETAIL when the connection
        # drops mid-greeting: both are a refused handshake, and nothing was delivered
        assert refused.get("handshake_failed_auth", 0) >= 1 and \
            refused.get("handshake_failed_protocol", 0) + \
            refused.get("handshake_failed_no_detail", 0) >= 1 and \
            d["rejected"].get("spoofed_sender") == 1, d
        return d
    wait_until(counted, 10.0, "the unknown key, the plaintext client and the spoof counted")
    n1_key.send_multipart([b"n1", encode(Payload("probe", {"from": "n1's key"}))])
    wait_until(lambda: got, 5.0, "the control payload from an admitted key")
    assert got == [("n1", {"from": "n1's key"})], "only the admitted, honest frame got through"
    mesh.wait_all_up(2.0)
    text = caplog.text + json.dumps([a.status() for a in mesh.agents.values()]) + \
        "".join(repr(a) for a in mesh.agents.values())
    for nid, ident in mesh.idents.items():
        assert ident.secret.decode() not in text, f"{nid}'s secret key leaked"
    assert mesh.idents["n0"].public.decode() in repr(target)


# ---------------------------------------------------------------------------------------------
# Payloads, events, scale-out, the loop's own faults

def test_payload_when_sent_between_agents_then_round_trip_in_order_and_broadcast_reaches_all(
        mesh_factory):
    mesh = mesh_factory(3)
    replies: list[int] = []
    seen: dict[str, list] = {"n1": [], "n2": []}

    def echo(frm: str, body: Any) -> None:
        if body["n"] == 3:
            raise RuntimeError("a failing handler is counted, delivery goes on")
        mesh["n1"].send_payload(frm, "echo.reply", {"n": body["n"]})
    mesh["n1"].on_payload("echo", echo)
    mesh["n0"].on_payload("echo.reply", lambda frm, body: replies.append(body["n"]))
    for nid in seen:
        mesh[nid].on_payload("hello", lambda frm, body, nid=nid: seen[nid].append((frm, body)))
    for i in range(20):
        mesh["n0"].send_payload("n1", "echo", {"n": i, "blob": b"\x00\xff"})
    mesh["n0"].broadcast_payload("hello", {"x": 1.5})
    mesh["n0"].send_payload("n2", "no.handler", {})
    wait_until(lambda: len(replies) == 19 and all(seen.values()), 5.0, "replies and broadcast")
    assert replies == [i for i in range(20) if i != 3]
    assert seen == {"n1": [("n0", {"x": 1.5})], "n2": [("n0", {"x": 1.5})]}
    assert mesh["n1"].status()["errors"] == {"payload_handler": 1}
    wait_until(lambda: mesh["n2"].status()["payloads"].get("no_handler") == 1, 5.0, "no_handler")
    with pytest.raises(UnknownPeerError):
        mesh["n0"].send_payload("nobody", "echo", {})
    with pytest.raises(FrameError, match="oversize"):
        mesh["n0"].send_payload("n1", "echo", {"blob": b"x" * LOCAL.max_frame_bytes})
    with pytest.raises(ValueError, match="already registered"):
        mesh["n1"].on_payload("echo", echo)


def test_subscribe_when_a_node_crashes_then_events_in_order_one_at_a_time_despite_a_bad_one(
        mesh_factory):
    got: list[MeshEvent] = []
    busy = threading.Lock()
    overlaps: list[int] = []
    threads: set[str] = set()

    def record(ev: MeshEvent) -> None:
        if not busy.acquire(blocking=False):
            overlaps.append(ev.seq)
            return
        try:
            threads.add(threading.current_thread().name)
            time.sleep(0.002)   # widen the window in which a second delivery would overlap
            got.append(ev)
        finally:
            busy.release()

    def fail(ev: MeshEvent) -> None:
        raise RuntimeError("a bad subscriber")

    def hook(agent: MeshAgent) -> None:
        if agent.node_id == "n0":
            agent.subscribe(fail)
            agent.subscribe(record)
    mesh = mesh_factory(4, before_start=hook)
    observer = mesh["n0"]
    mesh["n3"].stop()   # stops heartbeating without a farewell: a crash as seen from outside
    wait_until(lambda: ("down", "n3") in [(e.kind, e.node_id) for e in got], 5.0, "n3 down")
    events = observer.events_since(0)
    assert [e.seq for e in got] == [e["seq"] for e in events[:len(got)]] == \
        list(range(1, len(got) + 1))
    kinds = [(e.kind, e.node_id) for e in got]
    assert kinds[0] == ("started", "n0")
    assert kinds.index(("up", "n3")) < kinds.index(("down", "n3"))
    assert overlaps == [] and threads == {"mesh-n0-events"}
    assert observer.status()["errors"]["subscriber"] >= len(got)
    assert observer.events_since(events[-1]["seq"]) == []


def test_add_peer_when_agent_joins_then_up_and_leave_or_remove_peer_marks_it_left(
        mesh_factory):
    mesh = mesh_factory(3)
    late = MeshAgent("n9", "tokyo", "tcp://127.0.0.1:*", {}, LOCAL)
    late.start()
    try:
        for a in mesh.agents.values():
            a.add_peer("n9", Peer(late.endpoint, "tokyo"))
            late.add_peer(a.node_id, Peer(a.endpoint, a.site))
        wait_until(lambda: _all_see(lambda: mesh.members(), "n9", "alive"), UP_BOUND_S, "n9 up")
        late.stop(leave=True)
        wait_until(lambda: _all_see(lambda: mesh.members(), "n9", "left"), 5.0, "n9 left")
        assert not any(("down", "n9") in _events(a) for a in mesh.agents.values())
    finally:
        late.stop()
    mesh["n0"].remove_peer("n2")   # local: n0 forgets n2, the others keep it
    assert mesh["n0"].member_state("n2") == "left" and "n2" not in mesh["n0"].peers()
    wait_until(lambda: mesh["n0"].status()["dropped"]["rejected"].get("unknown_sender", 0) > 3,
               5.0, "n2's frames refused by n0")
    assert mesh["n1"].member_state("n2") == "alive" and mesh["n2"].member_state("n0") == "alive"
    with pytest.raises(ValueError, match="own id"):
        mesh["n0"].add_peer("n0", Peer("tcp://127.0.0.1:1", "s"))


def test_loop_when_its_clock_fails_then_counted_and_goes_on_and_persistent_failure_fail_stops(
        mesh_factory, flaky_clock):
    mesh = mesh_factory(3, n0={"clock": flaky_clock})
    agent = mesh["n0"]
    flaky_clock.fail_next = 5
    wait_until(lambda: sum(agent.status()["errors"].values()) >= 1, 5.0, "the errors counted")
    sent = agent.status()["frames"]["sent"]["hb"]
    wait_until(lambda: agent.status()["frames"]["sent"]["hb"] > sent + 5, 5.0, "heartbeats")
    assert agent.state is AgentState.RUNNING
    flaky_clock.always = True
    wait_until(lambda: agent.state is AgentState.FAILED, 10.0, "fail-stop")
    assert ("failed", "n0") in _events(agent)
    wait_until(lambda: _all_see(lambda: mesh.members(("n0",)), "n0", "dead"), 5.0, "n0 down")
    flaky_clock.always = False
    agent.stop()
    agent.stop()   # idempotent
    assert agent.state is AgentState.STOPPED
    with pytest.raises(AgentStoppedError):
        agent.start()
    with pytest.raises(AgentStoppedError):
        agent.send_payload("n1", "x", {})


def test_control_socket_when_driven_by_json_then_every_op_answers_and_errors_are_replies(
        mesh_factory):
    mesh = mesh_factory(2)
    server = ControlServer(mesh["n0"], "tcp://127.0.0.1:*")
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop,), name="control-test")
    t.start()
    try:
        with ControlClient(server.endpoint) as c:
            assert c.call("status")["members"]["n1"]["state"] == "alive"
            assert c.call("set_link_faults", peer="n1", drop_in=0.5) == \
                {"drop_out": 0.0, "drop_in": 0.5, "delay_s": 0.0}
            c.call("clear_link_faults")
            assert [e["kind"] for e in c.call("events_since", seq=0)][:2] == ["started", "up"]
            c.call("add_peer", node_id="n7", endpoint="tcp://127.0.0.1:9", site="x")
            assert "n7" in mesh["n0"].peers()
            c.call("remove_peer", node_id="n7")
            with pytest.raises(ControlError, match="UnknownPeerError"):
                c.call("set_link_faults", peer="nobody", drop_in=1.0)
            with pytest.raises(ControlError, match="unknown"):
                c.call("reboot")
            assert c.call("status")["state"] == "running"   # still answering after errors
    finally:
        stop.set()
        t.join(5)
        server.close()


def test_witness_when_lease_request_rides_the_mesh_then_voter_grants_and_replies(
        mesh_factory, tmp_path):
    voters = {}
    mesh = mesh_factory(2, n1={"voter_only": True},
                        before_start=lambda a: a.node_id == "n1" and voters.update(
                            n1=serve_lease_voter(a, {"store": "w.json"}, tmp_path)))
    replies: list[LeaseReply] = []
    mesh["n0"].on_payload(LEASE_KIND, lambda frm, body: replies.append(decode_lease_message(body)))
    request = LeaseRequest("venue-x", "tokyo/agent#1", 1, 1, LeaseConfig.preset("local").lease_s)
    mesh["n0"].send_payload("n1", LEASE_KIND, request.to_body())
    mesh["n0"].send_payload("n1", LEASE_KIND, {"type": "lease_request", "epoch": "x"})
    wait_until(lambda: replies, 5.0, "the voter's reply")
    assert replies[0].granted and replies[0].voter == "n1" and replies[0].epoch == 1
    assert (tmp_path / "w.json").exists()          # promised before it replied
    wait_until(lambda: voters["n1"].counts["malformed"] == 1, 5.0, "the malformed one counted")
    assert mesh["n1"].status()["voter_only"] is True
