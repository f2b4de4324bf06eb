"""Real partitions between network namespaces (cluster.chaos.netns) and the TCP delay proxy.

A module-scoped lab of three nodes a, b, c runs one probe process per node
(tests/netns_probe.py: a UDP counter and a TCP echo server, driven through its stdin/stdout, so
the test never sends anything to the lab's addresses itself). Positive checks poll until the
exchange works; a blocked TCP path must time out (SYNs are dropped, not refused); a blocked UDP
path must deliver nothing once the datagrams sent are all accounted for: the receiver's probe counts what arrived and the receiver's nft drop
counters what was dropped, and the two must add up to exactly what was sent.

Skipped with the reason where namespaces cannot be made (not root, no nft...), and failed
instead under BASTION_REQUIRE_NETNS=1 (CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import permutations
from pathlib import Path
from typing import Any

import pytest

from cluster.chaos.delay_proxy import DelayProxyConfig, ThreadedDelayProxy
from cluster.chaos.netns import REQUIRE_NETNS_ENV, RUN_DIR, NetLab, NetLabError
from tests.netns_probe import serve_echo, tcp_echo

PROBE = Path(__file__).with_name("netns_probe.py")
REPO = Path(__file__).resolve().parents[1]
UDP_PORT, TCP_PORT, PROXY_PORT = 9001, 9002, 9003
NODES = ("a", "b", "c")
#: A blocked TCP connect must still be pending after this long (it is dropped, never refused).
BLOCKED_TIMEOUT_S = 0.4


def wait_for(fn: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float,
             what: str, interval_s: float = 0.02) -> Any:
    """Poll ``fn`` until ``done(value)``; fail naming the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = fn()
        if done(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                 f"last seen {last!r}")
        time.sleep(interval_s)


def _require_netns() -> None:
    ok, reason = NetLab.available()
    if not ok:
        if os.environ.get(REQUIRE_NETNS_ENV) == "1":
            pytest.fail(f"{REQUIRE_NETNS_ENV}=1 but no network namespace lab here: {reason}")
        pytest.skip(reason)


class ProbeClient:
    """Drives one tests/netns_probe.py inside a lab node over its stdin/stdout."""

    def __init__(self, lab: NetLab, node: str) -> None:
        self.node = node
        self.proc = lab.run(node, [sys.executable, "-u", str(PROBE), "--udp-port", str(UDP_PORT),
                                   "--tcp-port", str(TCP_PORT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self._next(20.0)
        assert ready == {"ready": True}, ready

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout_s: float) -> dict[str, Any]:
        line = self._lines.get(timeout=max(0.0, timeout_s))
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"probe on {self.node} exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, op: str, reply_timeout_s: float = 15.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request_id = uuid.uuid4().hex
        self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + reply_timeout_s
        while True:
            reply = self._next(deadline - time.monotonic())
            if reply.get("id") == request_id:
                return reply


class Net:
    """The module's lab and its probes, with reachability checks."""

    def __init__(self, lab: NetLab, probes: dict[str, ProbeClient]) -> None:
        self.lab, self.probes = lab, probes

    def tcp(self, src: str, dst: str, timeout_s: float = 1.0, port: int = TCP_PORT,
            rounds: int = 1) -> dict[str, Any]:
        return self.probes[src].call("tcp_echo", to=self.lab.address(dst), port=port,
                                     timeout_s=timeout_s, rounds=rounds)

    def assert_reaches(self, src: str, dst: str) -> None:
        wait_for(lambda: self.tcp(src, dst), lambda r: r["ok"], 10.0, f"tcp echo {src}->{dst}")

    def assert_blocked(self, src: str, dst: str) -> None:
        result = self.tcp(src, dst, timeout_s=BLOCKED_TIMEOUT_S)
        assert result["ok"] is False and result["error"] == "timeout", (src, dst, result)

    def udp_count(self, dst: str, tag: str, src: str) -> int:
        return self.probes[dst].call("udp_counts", tag=tag)["counts"].get(self.lab.address(src), 0)

    def dropped_at(self, dst: str, src: str) -> int:
        """Packets from ``src`` that ``dst``'s rules dropped (block and loss rules)."""
        return sum(n for rule, n in self.lab.dropped(dst).items() if rule.endswith(f" {src}->{dst}"))

    def udp_delivered(self, src: str, dst: str, n: int) -> int:
        """Send ``n`` datagrams src->dst; once every one is accounted for at ``dst`` (received by
        the probe, or counted by a drop rule since just before sending), return how many were
        received. Nothing else runs between the nodes meanwhile, so the two add up exactly."""
        tag = uuid.uuid4().hex[:12]
        dropped_before = self.dropped_at(dst, src)
        self.probes[src].call("udp_send", to=self.lab.address(dst), n=n, tag=tag)
        received, dropped = wait_for(
            lambda: (self.udp_count(dst, tag, src), self.dropped_at(dst, src) - dropped_before),
            lambda seen: sum(seen) >= n, 10.0,
            f"{n} datagrams {src}->{dst} received or dropped (received, dropped)")
        assert received + dropped == n, (received, dropped)
        return received

    def assert_udp_all_arrive(self, src: str, dst: str, n: int) -> None:
        tag = uuid.uuid4().hex[:12]
        self.probes[src].call("udp_send", to=self.lab.address(dst), n=n, tag=tag)
        wait_for(lambda: self.udp_count(dst, tag, src), lambda c: c == n, 10.0,
                 f"{n} datagrams {src}->{dst}")

    def assert_matrix(self, blocked: set[tuple[str, str]]) -> None:
        """Every directed pair in ``blocked`` times out; every other pair echoes."""
        for src, dst in permutations(NODES, 2):
            if (src, dst) in blocked:
                self.assert_blocked(src, dst)
            else:
                self.assert_reaches(src, dst)


def both_ways(*pairs: tuple[str, str]) -> set[tuple[str, str]]:
    return {p for a, b in pairs for p in ((a, b), (b, a))}


@pytest.fixture(scope="module")
def lab_net() -> Iterator[Net]:
    _require_netns()
    NetLab.cleanup_stale()  # labs of earlier runs that were SIGKILLed
    with NetLab(NODES) as lab:
        yield Net(lab, {node: ProbeClient(lab, node) for node in NODES})


@pytest.fixture
def net(lab_net: Net) -> Iterator[Net]:
    lab_net.lab.heal()
    yield lab_net
    lab_net.lab.heal()


# --------------------------------------------------------------------------- faults

def test_reach_when_no_fault_then_every_pair_echoes_and_nothing_routes_out(net: Net) -> None:
    net.assert_matrix(blocked=set())
    subnet = str(net.lab.subnet)
    for node in NODES:
        routes = net.lab.check_output(node, ["ip", "-4", "route", "show"]).split("\n")
        assert [r.split()[0] for r in routes if r.strip()] == [subnet], (node, routes)
        assert net.lab.check_output(node, ["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]
                                    ).strip() == "1", node  # no IPv6 path around the rules
    root_addrs = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                                text=True, check=True).stdout
    assert subnet.rsplit(".", 1)[0] + "." not in root_addrs  # the lab's addresses live only inside


def test_partition_when_halves_then_inside_reach_and_across_blocked_both_ways(net: Net) -> None:
    net.lab.partition([{"a", "b"}, {"c"}])
    net.assert_matrix(blocked=both_ways(("a", "c"), ("b", "c")))
    assert net.udp_delivered("a", "c", 50) == 0
    assert net.udp_delivered("c", "b", 50) == 0
    net.assert_udp_all_arrive("a", "b", 50)


def test_isolate_when_one_node_then_it_reaches_no_one_and_the_rest_still_talk(net: Net) -> None:
    net.lab.isolate("b")
    net.assert_matrix(blocked=both_ways(("a", "b"), ("b", "c")))


def test_bridge_when_set_then_sides_cut_and_both_reach_the_bridge_node(net: Net) -> None:
    net.lab.bridge({"a"}, {"c"}, bridge_node="b")
    net.assert_matrix(blocked=both_ways(("a", "c")))
    assert net.udp_delivered("a", "c", 30) == 0
    assert net.udp_delivered("c", "a", 30) == 0


def test_one_way_when_src_to_dst_dropped_then_datagrams_pass_only_backwards(net: Net) -> None:
    net.lab.one_way("a", "b")
    n = 100
    assert net.udp_delivered("a", "b", n) == 0
    net.assert_udp_all_arrive("b", "a", n)
    assert net.lab.dropped("b") == {"block a->b": n}  # dropped on arrival, every one
    assert net.lab.dropped("a") == {}
    # TCP needs both directions for its handshake, so it fails from either end.
    net.assert_blocked("a", "b")
    net.assert_blocked("b", "a")
    net.assert_reaches("a", "c")


def test_loss_when_half_then_about_half_of_400_datagrams_arrive(net: Net) -> None:
    n = 400
    assert net.udp_delivered("a", "b", n) == n  # baseline: the probe loses nothing
    net.lab.loss("a", "b", 0.5)
    arrived = net.udp_delivered("a", "b", n)  # received + dropped == n is checked inside
    assert 120 <= arrived <= 280, arrived  # binomial(400, 0.5): sd 10, so this is ~8 sd
    assert net.udp_delivered("b", "a", 50) == 50  # the reverse is untouched
    net.lab.loss("a", "b", 0.0)
    assert net.udp_delivered("a", "b", n) == n


def test_heal_when_partitioned_then_every_pair_reaches_again(net: Net) -> None:
    net.lab.partition([{"a"}, {"b"}, {"c"}])
    net.assert_blocked("a", "b")
    net.lab.heal()
    assert net.lab.faults() == {"blocked": [], "loss": {}}
    net.assert_matrix(blocked=set())


def test_heal_link_when_halves_then_only_that_link_comes_back(net: Net) -> None:
    net.lab.partition([{"a", "b"}, {"c"}])
    net.lab.heal_link("a", "c")
    net.assert_matrix(blocked=both_ways(("b", "c")))


def test_faults_when_bad_arguments_then_errors_name_the_value(net: Net) -> None:
    with pytest.raises(NetLabError, match="'zz'"):
        net.lab.isolate("zz")
    with pytest.raises(NetLabError, match="disjoint"):
        net.lab.partition([{"a", "b"}, {"b", "c"}])
    with pytest.raises(NetLabError, match="1.5"):
        net.lab.loss("a", "b", 1.5)
    with pytest.raises(NetLabError, match="bridge_node"):
        net.lab.bridge({"a"}, {"b"}, bridge_node="a")
    assert net.lab.faults() == {"blocked": [], "loss": {}}


# --------------------------------------------------------------------------- teardown

def _lab_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                          check=True).stdout


def test_teardown_when_block_fails_then_no_namespace_link_table_or_process_left() -> None:
    _require_netns()
    with pytest.raises(RuntimeError, match="boom"), NetLab(["x", "y"], prefix="bstdown-") as lab:
        lab.partition([{"x"}, {"y"}])
        assert lab.table in lab.check_output("x", ["nft", "list", "tables"])
        sleeper = lab.run("x", ["sleep", "600"])
        run_id, names = lab.run_id, [lab.namespace("x"), lab.namespace("y"), lab.bridge_namespace]
        assert sorted(_lab_namespaces(f"bstdown-{run_id}")) == sorted(names)
        raise RuntimeError("boom")
    assert lab.closed
    assert _lab_namespaces(f"bstdown-{run_id}") == []
    assert run_id not in _root_links()  # no bridge or veth device, neither during nor after
    assert sleeper.poll() is not None
    assert not (RUN_DIR / f"{run_id}.json").exists()
    lab.close()  # idempotent


def test_build_when_a_step_fails_then_what_was_made_is_removed(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    _require_netns()
    import cluster.chaos.netns as netns

    real_cmd = netns._cmd
    made: list[str] = []

    def failing(argv: list[str], **kw: Any) -> Any:
        if argv[:3] == ["ip", "netns", "add"]:
            made.append(argv[3])
        if "addr" in argv and any(tok.endswith("-y") for tok in argv):
            raise NetLabError("planted failure adding y's address")
        return real_cmd(argv, **kw)

    monkeypatch.setattr(netns, "_cmd", failing)
    with pytest.raises(NetLabError, match="planted"):
        NetLab(["x", "y"], prefix="bstfail-")
    assert len(made) == 3  # bridge, x, y: all made before the failure...
    assert set(made).isdisjoint(_lab_namespaces("bstfail-"))  # ...and all removed


def test_cleanup_stale_when_owner_was_killed_then_its_lab_is_removed_and_live_ones_kept() -> None:
    _require_netns()
    script = ("import sys; from cluster.chaos.netns import NetLab\n"
              "lab = NetLab(['s1', 's2'], prefix='bststale-'); print(lab.run_id, flush=True)\n"
              "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()
        assert len(_lab_namespaces(f"bststale-{run_id}")) == 3
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no finalizer: the lab is left behind
        owner.wait(10.0)
    with NetLab(["live"], prefix="bststale-") as live:
        left_behind = _lab_namespaces(f"bststale-{run_id}")
        assert len(left_behind) == 3  # still there after its owner died
        removed = NetLab.cleanup_stale("bststale-")
        assert set(left_behind) <= set(removed), (left_behind, removed)
        assert _lab_namespaces(f"bststale-{run_id}") == []
        assert not (RUN_DIR / f"{run_id}.json").exists()
        assert sorted(_lab_namespaces(f"bststale-{live.run_id}")) == sorted(
            [live.namespace("live"), live.bridge_namespace])  # a live owner's lab is kept
    assert _lab_namespaces(f"bststale-{live.run_id}") == []


# --------------------------------------------------------------------------- delay proxy

class EchoServer:
    """A loopback TCP echo server on a thread (for the proxy tests that need no root)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=serve_echo, args=(self.sock,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _round_trips(port: int, rounds: int) -> list[float]:
    result = tcp_echo("127.0.0.1", port, timeout_s=5.0, rounds=rounds)
    assert result["ok"], result
    return result["rtts_s"]


def test_delay_proxy_when_delay_set_then_round_trip_is_twice_the_delay() -> None:
    echo = EchoServer()
    delay_s, rounds = 0.05, 8
    try:
        direct = statistics.median(_round_trips(echo.port, rounds))
        with ThreadedDelayProxy(DelayProxyConfig(target_port=echo.port, delay_s=delay_s)) as proxy:
            assert proxy.address is not None
            rtts = _round_trips(proxy.address[1], rounds)
            counters = wait_for(proxy.counters, lambda c: c["active"] == 0, 5.0,
                                "the proxied connection to close")
            proxy.set_faults(delay_s=0.0)
            undelayed = statistics.median(_round_trips(proxy.address[1], rounds))
    finally:
        echo.close()
    assert min(rtts) >= 2 * delay_s - 0.002, rtts  # each direction is held >= delay_s
    assert statistics.median(rtts) <= 2 * delay_s + 0.1, rtts  # generous: 2 shared cores
    assert direct < 0.02 and undelayed < 0.04, (direct, undelayed)
    assert counters["bytes_up"] == counters["bytes_down"] == rounds * 32  # tcp_echo's payload
    assert counters["accepted"] == 1 and counters["cut"] == 0


def test_delay_proxy_when_cut_probability_one_then_connection_is_cut() -> None:
    echo = EchoServer()
    try:
        config = DelayProxyConfig(target_port=echo.port, cut_probability=1.0, seed=1)
        with ThreadedDelayProxy(config) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.address[1]), timeout=5.0) as conn:
            conn.sendall(b"hello")
            assert conn.recv(64) == b""  # closed without forwarding anything
            counters = wait_for(proxy.counters, lambda c: c["cut"] == 1, 5.0, "a cut")
    finally:
        echo.close()
    assert counters["bytes_up"] == 0


def test_delay_proxy_when_target_stops_reading_then_buffer_stays_bounded() -> None:
    sink = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    max_buffer_bytes = 64 << 10
    config = DelayProxyConfig(target_port=sink.getsockname()[1], max_buffer_bytes=max_buffer_bytes,
                              read_chunk_bytes=16 << 10)
    try:
        with ThreadedDelayProxy(config) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.address[1]), timeout=20.0) as conn:
            def flood() -> None:
                with contextlib.suppress(OSError):  # ends when the test shuts the socket
                    conn.sendall(b"z" * (256 << 20))  # far more than all kernel buffers hold

            threading.Thread(target=flood, daemon=True).start()
            counters = wait_for(proxy.counters, lambda c: c["backpressure_waits"] >= 1, 20.0,
                                "the proxy to stop reading from a client it cannot forward")
            conn.shutdown(socket.SHUT_RDWR)
    finally:
        sink.close()
    assert counters["buffered_high_water"] <= max_buffer_bytes, counters


def test_delay_proxy_when_run_as_process_in_lab_then_cross_namespace_rtt_is_delayed(
        net: Net) -> None:
    delay_s = 0.04
    proxy = net.lab.run("b", [sys.executable, "-m", "cluster.chaos.delay_proxy",
                              "--listen", f"{net.lab.address('b')}:{PROXY_PORT}",
                              "--target", f"{net.lab.address('c')}:{TCP_PORT}",
                              "--delay-s", str(delay_s)],
                        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        assert "listening" in json.loads(proxy.stdout.readline())
        direct = net.tcp("a", "c", rounds=5)
        via = net.tcp("a", "b", port=PROXY_PORT, rounds=5)
        assert direct["ok"] and via["ok"], (direct, via)
        assert min(via["rtts_s"]) >= 2 * delay_s - 0.002, via
        assert statistics.median(via["rtts_s"]) <= 2 * delay_s + 0.1, via
        assert statistics.median(direct["rtts_s"]) < 0.02, direct
    finally:
        proxy.send_signal(signal.SIGTERM)
        out, _ = proxy.communicate(timeout=10.0)
    assert json.loads(out)["counters"]["chunks_up"] == 5
