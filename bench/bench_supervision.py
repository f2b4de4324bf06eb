"""Supervision benchmark: how fast a supervised, stateful child is back, with its state.

Both benchmarks run in one real multi-node Ray cluster on this machine (a head with no CPUs and
worker nodes labelled by site, Ray's health checks tuned as in ``LocalCluster``), which the
benchmark starts and tears down itself; the journal is SQLite in the cluster's work dir.

* ``restart`` — SIGKILL of a stateful child's worker process until a call answers from a new
  process with the whole state restored (snapshot + journal tail). Interleaved with it, sample
  by sample, the baseline: Ray's own restart of the same counter without Bastion
  (``max_restarts=-1``) until a call answers from a new process (Ray restores no state).
  Where the time goes, per side (``*_phase_*``, p50 from the kill): the new worker process
  starts (``/proc`` start time), the child's constructor starts (Bastion), Ray's actor table
  shows the new process ALIVE (read beside the probe; a private Ray API, diagnostics only), the
  probe's last failed call, and from it to the answer.
* ``node`` — SIGKILL of a whole node's process tree (``LocalCluster.kill_node``) until every
  child that lived on it answers ``value()`` with its state from another node of the same site;
  beside it, the time until ``ray.nodes()`` shows the node dead (Ray's own detection).

A sample's clock starts right before the kill and stops when the probing driver sees the answer:
the driver re-resolves the child's name and calls it in a tight loop (``POLL_S``), so the
figures are what a client would see.

Run ``python bench/bench_supervision.py [restart|node|all] [--quick]``: the last line printed is
the figures as JSON.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # the bench's cluster has no token; before `import ray`

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from cluster.local import NODE_NAME_LABEL, LocalCluster, NodeConfig  # noqa: E402
from supervisors import ChildSpec, Placement, SupervisorSpec, Tree, start_tree  # noqa: E402
from supervisors.examples import BareCounter  # noqa: E402
from supervisors.spec import Backoff  # noqa: E402

COUNTER = "supervisors.examples:Counter"
NO_BACKOFF = Backoff(initial_s=0.0)
SNAPSHOT_EVERY_EVENTS = 100

#: The probing loop's pace: how long it waits for an answer before it looks again.
POLL_S = 0.002
#: A probe call unanswered this long is given up and issued again (a handle that went stale).
CALL_RETRY_S = 2.0
#: A sample that has not recovered after this long fails the benchmark.
SAMPLE_TIMEOUT_S = 60.0
#: Pause after each sample, so the next kill does not land on a raylet still busy with the last.
SETTLE_S = 0.2
#: Timeout of the ordinary (not measured) calls.
CALL_TIMEOUT_S = 60.0

RESTART_INITIAL_EVENTS = 500
NODE_CHILDREN = 4
NODE_EVENTS_PER_CHILD = 40

GOAL_RESTART_RATIO_P99 = 1.5
GOAL_NODE_RECOVERY_P99_S = 2.0

CLUSTER_NODES = [
    NodeConfig("head", site="tokyo", zone="a", num_cpus=0),
    NodeConfig("tokyo-1", site="tokyo", zone="a", num_cpus=2),
    NodeConfig("tokyo-2", site="tokyo", zone="b", num_cpus=2),
    NodeConfig("london-1", site="london", zone="a", num_cpus=2),
]


# ==================================================================== the cluster
@dataclass(frozen=True)
class BenchCluster:
    """The running cluster a benchmark uses, with the driver connected to it."""

    cluster: LocalCluster
    store_url: str


@contextlib.contextmanager
def bench_cluster() -> Iterator[BenchCluster]:
    """Start the cluster and connect; afterwards none of its processes is left running."""
    # A short path: Ray's Unix sockets live under it and may not exceed 107 characters.
    work_dir = Path(tempfile.mkdtemp(prefix="bsup-", dir="/tmp"))
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster.start(CLUSTER_NODES, work_dir=work_dir)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        for node in CLUSTER_NODES:
            _wait_node_alive(node.name)
        yield BenchCluster(cluster, f"sqlite://{work_dir / 'journal'}")
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)


def _node_id_of(name: str) -> str | None:
    for node in ray.nodes():
        if node["Alive"] and (node.get("Labels") or {}).get(NODE_NAME_LABEL) == name:
            return node["NodeID"]
    return None


def _wait_node_alive(name: str, timeout_s: float = CALL_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while (node_id := _node_id_of(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {name!r} not alive in ray.nodes() after {timeout_s:g} s")
        time.sleep(0.05)
    return node_id


# ==================================================================== figures
def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _stats(prefix: str, values: list[float], *, with_max: bool = True) -> dict[str, float]:
    out = {f"{prefix}_p50_s": _percentile(values, 50), f"{prefix}_p99_s": _percentile(values, 99)}
    if with_max:
        out[f"{prefix}_max_s"] = max(values)
    return out


# ==================================================================== probing
class _Probe:
    """Calls one actor until it answers from a new process (or node) with the right state.

    ``lookup`` gives the current handle (``None`` while there is none). Each round issues
    ``<ident_method>()`` then ``value()`` on that handle without blocking; a failed round
    (the old actor died, the new one is not there yet) is followed by a fresh lookup.
    """

    def __init__(self, what: str, lookup: Callable[[], Any], ident_method: str,
                 accept: Callable[[Any, Any], bool]) -> None:
        self.what = what
        self.lookup = lookup
        self.ident_method = ident_method
        self.accept = accept
        self.refs: list[Any] | None = None
        self.handle: Any = None
        self.issued_at = 0.0
        self.answered_at: float | None = None
        self.ident: Any = None
        self.value: Any = None
        self.failed_calls = 0
        self.last_failed_at: float | None = None
        self.stale_answers = 0
        self.retried_calls = 0
        self.last_error: str | None = None

    @property
    def done(self) -> bool:
        return self.answered_at is not None

    def step(self) -> bool:
        """Advance without blocking; True once answered."""
        if self.done:
            return True
        now = time.perf_counter()
        if self.refs is None:
            handle = self.lookup()
            if handle is None:
                return False
            self.handle = handle
            self.refs = [getattr(handle, self.ident_method).remote(), handle.value.remote()]
            self.issued_at = now
            return False
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        if len(ready) < len(self.refs):
            if now - self.issued_at > CALL_RETRY_S:
                self.refs = None
                self.retried_calls += 1
            return False
        refs, self.refs = self.refs, None
        try:
            ident, value = ray.get(refs, timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            self.failed_calls += 1
            self.last_failed_at = time.perf_counter()
            self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return False
        if not self.accept(ident, value):
            self.stale_answers += 1
            self.last_error = f"answer not accepted: {self.ident_method}={ident!r} value={value!r}"
            return False
        self.answered_at = time.perf_counter()
        self.ident, self.value = ident, value
        return True

    def wait_ref(self) -> Any | None:
        """The call whose answer ends this round (the later of the two), if one is out."""
        return self.refs[-1] if self.refs else None


def _poll(probes: list[_Probe], timeout_s: float = SAMPLE_TIMEOUT_S) -> None:
    """Step every probe until all have answered; wake as soon as any outstanding call ends."""
    deadline = time.perf_counter() + timeout_s
    while True:
        pending = [p for p in probes if not p.step()]
        if not pending:
            return
        if time.perf_counter() > deadline:
            detail = "; ".join(f"{p.what}: failed={p.failed_calls} stale={p.stale_answers} "
                               f"last={p.last_error}" for p in pending)
            raise TimeoutError(f"not recovered after {timeout_s:g} s: {detail}")
        refs = [r for p in pending if (r := p.wait_ref()) is not None]
        if refs:
            ray.wait(refs, num_returns=1, timeout=POLL_S)
        else:
            time.sleep(POLL_S)


class _Watch(threading.Thread):
    """Polls ``condition()`` in a thread; ``held_at`` is the perf_counter when it first held.

    A condition that raises counts as not holding (it is only ever diagnostics)."""

    def __init__(self, name: str, condition: Callable[[], bool],
                 interval_s: float = 0.005) -> None:
        super().__init__(daemon=True, name=name)
        self.condition = condition
        self.interval_s = interval_s
        self.held_at: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(Exception):
                if self.condition():
                    self.held_at = time.perf_counter()
                    return
            self.stop_event.wait(self.interval_s)

    def finish(self, timeout_s: float) -> float | None:
        """Wait up to ``timeout_s`` for the condition, then stop polling."""
        self.join(timeout=timeout_s)
        self.stop_event.set()
        self.join()
        return self.held_at


def _named(name: str, namespace: str) -> Callable[[], Any]:
    def lookup() -> Any:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:  # no actor holds the name right now
            return None
    return lookup


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _started_boottime_s(pid: int) -> float | None:
    """When a process started, in seconds of ``CLOCK_BOOTTIME`` (Linux; one tick, 10 ms)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / _CLOCK_TICKS_PER_S  # field 22 of stat(5): starttime
    except (OSError, IndexError, ValueError):
        return None


# ==================================================================== 1. restart
@dataclass(frozen=True)
class _RestartSample:
    elapsed_s: float  # kill -> a call answered by the new process (with the state, for Bastion)
    fresh_process: bool  # the new actor runs in a process that did not exist at the kill
    to_process_s: float | None  # kill -> the new worker process started (fresh ones only)
    to_init_s: float | None  # kill -> the child's constructor started (Bastion only)
    to_last_failure_s: float | None  # kill -> the probe's last failed call (None: none failed)
    to_gcs_alive_s: float | None  # kill -> Ray's actor table shows the new process ALIVE
    failed_calls: int
    retried_calls: int
    replayed_events: int = 0
    state_restored: bool = False


@dataclass(frozen=True)
class _Kill:
    """The moment of a kill on three clocks (taken back to back) and the processes then."""

    perf: float
    wall: float
    boot: float
    pids: frozenset[int]


def _kill(pid: int) -> _Kill:
    pids = frozenset(psutil.pids())
    kill = _Kill(perf=time.perf_counter(), wall=time.time(),
                 boot=time.clock_gettime(time.CLOCK_BOOTTIME), pids=pids)
    os.kill(pid, signal.SIGKILL)
    return kill


def _restart_sample(probe: _Probe, kill: _Kill, *, init_wall: float | None = None,
                    replayed: int = 0, restored: bool = False,
                    gcs_alive_at: float | None = None) -> _RestartSample:
    assert probe.answered_at is not None
    fresh = probe.ident not in kill.pids
    started = _started_boottime_s(probe.ident) if fresh else None
    return _RestartSample(
        elapsed_s=probe.answered_at - kill.perf, fresh_process=fresh,
        to_process_s=started - kill.boot if started is not None else None,
        to_init_s=init_wall - kill.wall if init_wall is not None else None,
        to_last_failure_s=(probe.last_failed_at - kill.perf
                           if probe.last_failed_at is not None else None),
        to_gcs_alive_s=gcs_alive_at - kill.perf if gcs_alive_at is not None else None,
        failed_calls=probe.failed_calls, retried_calls=probe.retried_calls,
        replayed_events=replayed, state_restored=restored)


def _bastion_sample(tree: Tree, path: str, expected_total: int) -> _RestartSample:
    old = tree.actor(path)
    old_pid = ray.get(old.pid.remote(), timeout=CALL_TIMEOUT_S)
    lookup = _named(path, tree.namespace)
    probe = _Probe(path, lookup, "pid",
                   lambda pid, v: pid != old_pid and v["total"] == expected_total
                   and v["count"] == expected_total)
    # The same diagnostics as for the Ray baseline (and the same polling load beside the probe).
    old_id = old._actor_id.hex()

    def new_actor_alive() -> bool:
        handle = lookup()
        new_id = handle._actor_id.hex() if handle is not None else old_id
        return new_id != old_id and _actor_alive_elsewhere(new_id, old_pid)

    alive = _Watch("gcs-alive", new_actor_alive)
    kill = _kill(old_pid)
    alive.start()
    try:
        _poll([probe])
    finally:
        alive_at = alive.finish(0.0)
    info = ray.get(probe.handle.__bastion_info__.remote(), timeout=CALL_TIMEOUT_S)
    recovery = ray.get(probe.handle.recovery.remote(), timeout=CALL_TIMEOUT_S)
    return _restart_sample(probe, kill, init_wall=info.get("started_at"),
                           replayed=int(recovery.get("replayed", 0)), restored=True,
                           gcs_alive_at=alive_at)


def _ray_sample(handle: Any, lost_total: int) -> _RestartSample:
    old_pid = ray.get(handle.pid.remote(), timeout=CALL_TIMEOUT_S)
    probe = _Probe("bare-book", lambda: handle, "pid", lambda pid, v: pid != old_pid)
    # Diagnostics only: when Ray's actor table shows the actor ALIVE again in a new process,
    # i.e. Ray's restart itself, without the wait its clients go through (see the report keys).
    actor_id = handle._actor_id.hex()
    alive = _Watch("gcs-alive", lambda: _actor_alive_elsewhere(actor_id, old_pid))
    kill = _kill(old_pid)
    alive.start()
    try:
        _poll([probe])
    finally:
        alive_at = alive.finish(0.0)
    return _restart_sample(probe, kill, restored=probe.value == lost_total,
                           gcs_alive_at=alive_at)


def _actor_alive_elsewhere(actor_id: str, old_pid: int) -> bool:
    """Ray's actor table (a private API; ``ray.util.state`` would need the dashboard)."""
    from ray._private import state

    info = state.actors(actor_id=actor_id)
    return info.get("State") == "ALIVE" and info.get("Pid") not in (None, 0, old_pid)


def run_restart(quick: bool = False, env: BenchCluster | None = None) -> dict[str, Any]:
    """SIGKILL of a stateful child -> a call answered by the new process with the state restored,
    against Ray's own actor restart (no state). Flat dict of figures, units in the key names."""
    if env is None:
        with bench_cluster() as own:
            return run_restart(quick, own)
    samples = 10 if quick else 50
    namespace = f"bench-restart-{uuid.uuid4().hex[:8]}"
    spec = SupervisorSpec(id="root", intensity=10_000, period_s=1.0, children=[
        ChildSpec(id="book", cls=COUNTER, kwargs={"snapshot_every": SNAPSHOT_EVERY_EVENTS},
                  backoff=NO_BACKOFF),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=env.store_url)
    bare: Any = None
    try:
        node_id = tree.child("root/book").node_id
        # The baseline lives on the same node, so both restarts draw on the same raylet.
        bare_cls = ray.remote(max_restarts=-1, max_task_retries=0)(BareCounter)
        bare = bare_cls.options(
            name="bare-book", namespace=namespace, lifetime="detached", num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote()
        book = tree.actor("root/book")
        acks = ray.get([book.add.remote(1) for _ in range(RESTART_INITIAL_EVENTS)],
                       timeout=CALL_TIMEOUT_S)
        expected = acks[-1]
        ray.get(bare.pid.remote(), timeout=CALL_TIMEOUT_S)
        bastion: list[_RestartSample] = []
        baseline: list[_RestartSample] = []
        for i in range(samples):
            # Alternate which goes first, so neither always follows the other's aftermath.
            for which in (("bastion", "ray") if i % 2 == 0 else ("ray", "bastion")):
                if which == "bastion":
                    # One more acknowledged event each round: the journal tail keeps changing.
                    expected = ray.get(tree.actor("root/book").add.remote(1),
                                       timeout=CALL_TIMEOUT_S)
                    bastion.append(_bastion_sample(tree, "root/book", expected))
                else:
                    lost = ray.get(bare.add.remote(1), timeout=CALL_TIMEOUT_S)
                    baseline.append(_ray_sample(bare, lost))
                time.sleep(SETTLE_S)
        restarts = tree.child("root/book").restarts
    finally:
        if bare is not None:
            ray.kill(bare, no_restart=True)
        tree.stop()
    return _restart_figures(bastion, baseline, restarts, expected)


def _restart_figures(bastion: list[_RestartSample], baseline: list[_RestartSample],
                     restarts: int, final_events: int) -> dict[str, Any]:
    b = [s.elapsed_s for s in bastion]
    r = [s.elapsed_s for s in baseline]
    out: dict[str, Any] = {
        **_stats("bastion_restart", b),
        **_stats("ray_restart", r),
        "ratio_p50": _percentile(b, 50) / _percentile(r, 50),
        "ratio_p99": _percentile(b, 99) / _percentile(r, 99),
        "samples": len(b),
        "ray_samples": len(r),
        "bastion_restarts_counted": restarts,
        "bastion_events_at_end": final_events,
        "bastion_replayed_events_max": max(s.replayed_events for s in bastion),
        "ray_state_restored_samples": sum(s.state_restored for s in baseline),
    }
    # Where the time goes (p50 of each phase, measured from the kill).
    for label, group in (("bastion", bastion), ("ray", baseline)):
        out[f"{label}_fresh_process_samples"] = sum(s.fresh_process for s in group)
        out[f"{label}_failed_probe_calls"] = sum(s.failed_calls for s in group)
        # Calls abandoned after CALL_RETRY_S: non-zero means the probe itself added delay.
        out[f"{label}_retried_probe_calls"] = sum(s.retried_calls for s in group)
        phases = {
            "kill_to_process_start": [s.to_process_s for s in group],
            "kill_to_init": [s.to_init_s for s in group],
            "kill_to_actor_table_alive": [s.to_gcs_alive_s for s in group],
            "kill_to_last_failed_call": [s.to_last_failure_s for s in group],
            "last_failed_call_to_answer": [s.elapsed_s - s.to_last_failure_s for s in group
                                           if s.to_last_failure_s is not None],
        }
        for phase, values in phases.items():
            known = [v for v in values if v is not None]
            if known:
                out[f"{label}_phase_{phase}_p50_s"] = _percentile(known, 50)
    # Ray's restart as its actor table sees it, without the wait its callers go through.
    b_alive = out.get("bastion_phase_kill_to_actor_table_alive_p50_s")
    r_alive = out.get("ray_phase_kill_to_actor_table_alive_p50_s")
    if b_alive and r_alive:
        out["ratio_actor_table_alive_p50"] = b_alive / r_alive
    out["goal_restart_ratio_p99_max"] = GOAL_RESTART_RATIO_P99
    out["goal_restart_met"] = out["ratio_p99"] <= GOAL_RESTART_RATIO_P99
    return out


# ==================================================================== 2. node crash
class _NodeKiller(threading.Thread):
    """Runs ``LocalCluster.kill_node`` in a thread; the clock starts right before the call."""

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        super().__init__(daemon=True, name="node-killer")
        self.cluster = cluster
        self.node_name = name
        self.started = threading.Event()
        self.called_at = 0.0
        self.returned_at: float | None = None
        self.error: BaseException | None = None

    def start_and_mark(self) -> float:
        """Start the thread; returns the perf_counter taken right before ``kill_node``."""
        self.start()
        self.started.wait()
        return self.called_at

    def run(self) -> None:
        self.called_at = time.perf_counter()
        self.started.set()
        try:
            self.cluster.kill_node(self.node_name)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        self.returned_at = time.perf_counter()


@dataclass(frozen=True)
class _NodeSample:
    recovery_s: float  # kill -> the last of the node's children answered with its state
    first_child_s: float  # kill -> the first one answered
    detect_s: float  # kill -> ray.nodes() shows the node dead
    kill_call_s: float  # how long kill_node() took (finds the tree, kills, waits it gone)
    failed_calls: int
    retried_calls: int


def _node_sample(env: BenchCluster, tree: Tree, index: int) -> _NodeSample:
    name = f"tokyo-c{index}-{uuid.uuid4().hex[:4]}"
    env.cluster.add_node(NodeConfig(name, site="tokyo", zone="c", num_cpus=2))
    node_id = _wait_node_alive(name)
    expected: dict[str, tuple[int, int]] = {}
    try:
        for j in range(NODE_CHILDREN):
            cid = f"n{index}-c{j}"
            info = tree.start_child("root", ChildSpec(
                id=cid, cls=COUNTER, kwargs={"snapshot_every": SNAPSHOT_EVERY_EVENTS},
                backoff=NO_BACKOFF, placement=Placement(site="tokyo", preferred_nodes=(name,))))
            if info.node_id != node_id:
                raise RuntimeError(f"root/{cid} was placed on {info.node_id}, not on {name}")
            handle = tree.actor(f"root/{cid}")
            events = NODE_EVENTS_PER_CHILD + 10 * j
            ray.get([handle.add.remote(j + 1) for _ in range(events)], timeout=CALL_TIMEOUT_S)
            expected[cid] = (events * (j + 1), events)

        def accept_for(cid: str) -> Callable[[Any, Any], bool]:
            total, count = expected[cid]
            return lambda node, v: node != node_id and v["total"] == total and v["count"] == count

        probes = [_Probe(f"root/{cid}", _named(f"root/{cid}", tree.namespace), "node_id",
                         accept_for(cid)) for cid in expected]
        watch = _Watch("node-death", lambda: not any(
            n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()))
        watch.start()
        # kill_node() sends the SIGKILLs at once but then waits for the processes to be gone
        # (seconds): run it beside the probes, so they see the children as soon as they are back.
        killer = _NodeKiller(env.cluster, name)
        t0 = killer.start_and_mark()
        try:
            _poll(probes)
        finally:
            detected_at = watch.finish(SAMPLE_TIMEOUT_S)
            killer.join(timeout=SAMPLE_TIMEOUT_S)
        if killer.error is not None:
            raise killer.error
        kill_call_s = killer.returned_at - t0 if killer.returned_at else SAMPLE_TIMEOUT_S
        if detected_at is None:
            raise TimeoutError(f"ray.nodes() still shows {name} alive after {SAMPLE_TIMEOUT_S} s")
        sites = {n["NodeID"]: (n.get("Labels") or {}).get("site") for n in ray.nodes()}
        wrong = [p.what for p in probes if sites.get(p.ident) != "tokyo"]
        if wrong:
            raise RuntimeError(f"children moved out of site tokyo: {wrong}")
        answered = [p.answered_at - t0 for p in probes if p.answered_at is not None]
        return _NodeSample(recovery_s=max(answered), first_child_s=min(answered),
                           detect_s=detected_at - t0, kill_call_s=kill_call_s,
                           failed_calls=sum(p.failed_calls for p in probes),
                           retried_calls=sum(p.retried_calls for p in probes))
    finally:
        for cid in expected:
            with contextlib.suppress(Exception):
                tree.terminate_child(f"root/{cid}")


def run_node_crash(quick: bool = False, env: BenchCluster | None = None) -> dict[str, Any]:
    """A node's crash -> every child it held answering with its state on another node of the
    site, against Ray's own detection of the dead node. Flat dict, units in the key names."""
    if env is None:
        with bench_cluster() as own:
            return run_node_crash(quick, own)
    samples = 2 if quick else 6
    namespace = f"bench-node-{uuid.uuid4().hex[:8]}"
    tree = start_tree(SupervisorSpec(id="root", intensity=10_000, period_s=1.0),
                      namespace=namespace, store_url=env.store_url)
    try:
        results = []
        for i in range(samples):
            results.append(_node_sample(env, tree, i))
            time.sleep(SETTLE_S)
    finally:
        tree.stop()
    recovery = [s.recovery_s for s in results]
    out: dict[str, Any] = {
        **_stats("node_recovery", recovery),
        **_stats("ray_detect", [s.detect_s for s in results], with_max=False),
        **_stats("node_first_child", [s.first_child_s for s in results], with_max=False),
        **_stats("node_after_detect", [s.recovery_s - s.detect_s for s in results],
                 with_max=False),
        "node_kill_call_max_s": max(s.kill_call_s for s in results),
        "node_failed_probe_calls": sum(s.failed_calls for s in results),
        "node_retried_probe_calls": sum(s.retried_calls for s in results),
        "children_per_node": NODE_CHILDREN,
        "samples": len(results),
        "goal_node_recovery_p99_max_s": GOAL_NODE_RECOVERY_P99_S,
    }
    out["goal_node_met"] = out["node_recovery_p99_s"] <= GOAL_NODE_RECOVERY_P99_S
    return out


# ==================================================================== entry points
def run(quick: bool = False, which: str = "all") -> dict[str, Any]:
    """Run ``restart``, ``node`` or ``all`` in one cluster; one flat dict (``samples`` is
    prefixed with the benchmark's name when both run)."""
    results: dict[str, Any] = {"cpu_count": os.cpu_count() or 0,
                               "cluster_nodes": len(CLUSTER_NODES)}
    t0 = time.perf_counter()
    with bench_cluster() as env:
        if which in ("restart", "all"):
            part = run_restart(quick, env)
            if which == "all":
                part["restart_samples"] = part.pop("samples")
            results.update(part)
        if which in ("node", "all"):
            part = run_node_crash(quick, env)
            if which == "all":
                part["node_samples"] = part.pop("samples")
            results.update(part)
    results["bench_wall_s"] = time.perf_counter() - t0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=("restart", "node", "all"))
    parser.add_argument("--quick", action="store_true", help="fewer samples (10 and 2)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, which=args.which)))


if __name__ == "__main__":
    main()
