"""Mesh benchmark: how fast the ZeroMQ heartbeat mesh declares a crashed or hung node down,
against Ray's own node-death detection in the same run; false suspicions under CPU saturation;
what a 32-agent mesh costs in CPU.

Four sections, each cleaning up every process it started (by PID), even on errors:

* ``detect`` — 5 agent processes (``python -m topology.agent``, CURVE on) per heartbeat interval
  (20, 50, 100 ms: the ``local`` preset with every timing field scaled by the same factor, so
  the cross-field rules and the detection formula of ``topology.config`` keep their shape). A
  sample SIGKILLs (crash) or SIGSTOPs (hang) one agent's process tree; its figure is the time
  from the signal to the moment the LAST of the 4 other agents declared it ``down``: each
  observer's ``down`` event carries the wall time the agent published it (``wall_s``), read
  afterwards over the control sockets. All processes share this machine's clock, so that is
  the agent's own moment of decision, free of the bench's polling pace and of the control-call
  latency under load. A crashed agent is restarted on its old endpoint (a new incarnation), a
  hung one continued (it refutes); the next sample starts once all see all alive again.
* ``ray`` — Ray's own detection (``ray.nodes()`` shows the node dead, polled every 20 ms) for
  the same faults on real raylets (``LocalCluster``: a head, one stable worker, a fresh victim
  worker per sample), with Ray's default health checks and with the tuned 1000/500/500/3 ms ones
  (``LocalCluster(tuned_health_checks=...)``, a cluster each). A mesh agent runs on every node
  (``RayMesh``, ``local`` preset) and the same signal to the victim's whole process group and
  tree (raylet, agents, workers, its mesh agent) is timed for both: the mesh figure is the last
  of the two observers' ``down`` events. Ratios are Ray's p50 over the mesh's p99 in the same
  samples (the mesh's tail against Ray's typical figure).
* ``cpu32`` — 32 agent processes (50 ms heartbeats), CURVE on and off: CPU seconds per second
  (psutil, user + system, over a fixed window) per agent and in total, frames sent per second
  against those offered (every agent to every peer: heartbeats and Views), and the fraction of
  member pairs still seeing each other alive; beside it, in the same run, one agent without
  peers (its loop's fixed cost) and an 8-agent mesh. A mesh the machine cannot carry is
  measured all the same (after ``CPU_UP_BOUND_S``) and says so (``*_all_up_before_window``).
* ``soak`` — 5 agent processes (50 ms) for ``soak_s`` seconds while CPU burners (2 per core, at
  most 4, normal priority) saturate the cores: every ``suspect`` or ``down`` event is false (no
  node is harmed). Default 600 s, 30 s with ``--quick``; ``--soak-s`` or the environment variable
  ``BASTION_BENCH_SOAK_S`` override it.

Run ``python bench/bench_mesh.py [--quick] [--soak-s S] [--sections detect,ray,cpu32,soak]``:
the last line printed is the figures as JSON.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # the bench's clusters have no token; before `import ray`

import argparse
import contextlib
import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil
import ray

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from bench.bench_supervision import _percentile, _stats, _wait_node_alive, _Watch  # noqa: E402
from cluster.local import LocalCluster, NodeConfig  # noqa: E402
from topology.agent_process import ControlClient  # noqa: E402
from topology.config import MeshConfig  # noqa: E402
from topology.keys import generate_keypair  # noqa: E402
from topology.ray_mesh import RayMesh  # noqa: E402

T = TypeVar("T")

SECTIONS = ("detect", "ray", "cpu32", "soak")   # the order they run in
FAULTS = ("crash", "hang")
SIGNALS = {"crash": signal.SIGKILL, "hang": signal.SIGSTOP}

#: The ``local`` preset's timing fields; a heartbeat interval scales all of them alike.
SCALED_FIELDS = ("heartbeat_interval_s", "acceptable_heartbeat_pause_s", "min_std_deviation_s",
                 "first_heartbeat_estimate_s", "probe_timeout_s", "suspicion_min_s",
                 "suspicion_max_s", "gossip_interval_s", "tick_interval_s")
HEARTBEATS_S = (0.02, 0.05, 0.1)
GOAL_HEARTBEAT_S = 0.05
#: Samples per fault and heartbeat interval (full run, --quick).
DETECT_SAMPLES = {0.02: (8, 3), 0.05: (20, 5), 0.1: (8, 3)}
#: Ray samples per (settings, fault): (full, quick). Default Ray takes ~13 s / ~63 s a sample.
RAY_SAMPLES = {("default", "crash"): (2, 1), ("default", "hang"): (2, 1),
               ("tuned", "crash"): (3, 1), ("tuned", "hang"): (3, 1)}
MESH_NODES = 5
CPU_AGENTS = 32
CPU_BASELINE_AGENTS = 8
CPU_WINDOW_S = (12.0, 10.0)
#: How long a CPU-section mesh may take to see itself all alive before it is measured anyway
#: (full, quick).
CPU_UP_BOUND_S = (20.0, 10.0)
CPU_WARMUP_S = 2.0
SOAK_S = (600.0, 30.0)
SOAK_ENV = "BASTION_BENCH_SOAK_S"

#: After a sample has recovered, this many heartbeat intervals (at least SETTLE_MIN_S) pass
#: before the next fault, so every detector holds some real intervals of the new incarnation.
SETTLE_BEATS = 10
SETTLE_MIN_S = 0.3
RAY_SETTLE_S = 1.0
#: A sample with an observer still not reporting ``down`` after this long counts as missed
#: (its figure is this bound).
DETECT_BOUND_S = 10.0
RAY_DETECT_BOUND_S = 150.0
RECOVER_TIMEOUT_S = 60.0
START_TIMEOUT_S = 240.0
EVENT_POLL_S = 0.05
RAY_POLL_S = 0.02
CONTROL_TIMEOUT_S = 10.0
LOAD_SAMPLE_S = 5.0

GOAL_P99_S = 0.5
GOAL_VS_DEFAULT_CRASH = 25.0
GOAL_VS_DEFAULT_HANG = 100.0
GOAL_VS_TUNED = 3.0
GOAL_SOAK_S = 600.0


def mesh_overrides(heartbeat_interval_s: float) -> dict[str, float]:
    """The ``local`` preset's timing fields scaled to ``heartbeat_interval_s`` (validated)."""
    base = MeshConfig.preset("local")
    k = heartbeat_interval_s / base.heartbeat_interval_s
    over = {f: round(getattr(base, f) * k, 6) for f in SCALED_FIELDS}
    MeshConfig.preset("local", **over)  # MeshConfigError names a field that broke a rule
    return over


# ==================================================================== processes
def _tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(procs: Iterable[psutil.Process], sig: int, *, group: int | None = None) -> None:
    """``sig`` to a whole process group at once (when given), then to each process."""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.send_signal(sig)


def _kill_popen(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)   # a stopped process is killed all the same
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class _Agent:
    node_id: str
    proc: subprocess.Popen[str]
    control: ControlClient


class _Fleet:
    """Agent processes started by this bench, wired all-to-all. :meth:`close` leaves none
    running (every process ever started here is killed and reaped by PID)."""

    def __init__(self, work_dir: Path, overrides: Mapping[str, float], *, curve: bool) -> None:
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overrides = dict(overrides)
        self.curve = curve
        self.agents: dict[str, _Agent] = {}
        self.sites: dict[str, str] = {}
        self.endpoints: dict[str, str] = {}
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> _Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, nid: str) -> subprocess.Popen[str]:
        cfg: dict[str, Any] = {"node_id": nid, "site": self.sites[nid],
                               "bind": self.endpoints[nid], "peers": self._peers_of(nid),
                               "preset": "local", "overrides": self.overrides,
                               "log_level": "WARNING"}
        if self.curve:
            cfg["secret_key_file"] = f"keys/{nid}.key_secret"
        path = self.dir / f"{nid}.json"
        path.write_text(json.dumps(cfg))
        with open(self.dir / f"{nid}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "topology.agent", "--config",
                                     str(path)], cwd=_REPO_ROOT, stdout=subprocess.PIPE,
                                    stderr=log, stdin=subprocess.DEVNULL, text=True)
        self._procs.append(proc)
        return proc

    def _register(self, nid: str, proc: subprocess.Popen[str], deadline: float) -> None:
        info = _ready_line(proc, deadline, self.dir / f"{nid}.log")
        self.agents[nid] = _Agent(nid, proc, ControlClient(info["control"],
                                                           timeout_s=CONTROL_TIMEOUT_S))

    def _peers_of(self, nid: str) -> dict[str, dict[str, str]]:
        return {o: {"endpoint": ep, "site": self.sites[o],
                    **({"public_key_file": f"keys/{o}.key"} if self.curve else {})}
                for o, ep in self.endpoints.items() if o != nid}

    def start(self, ids: list[str]) -> None:
        """Start the agents all at once, each configured with every other as a peer (ports
        chosen beforehand), so no wiring over the control sockets is needed: wiring 32 agents
        one call at a time while the first ones already saturate the cores takes minutes."""
        self.sites = {nid: "tokyo" if i % 2 == 0 else "london" for i, nid in enumerate(ids)}
        self.endpoints = {nid: f"tcp://127.0.0.1:{port}"
                          for nid, port in zip(ids, _free_ports(len(ids)), strict=True)}
        if self.curve:
            for nid in ids:
                generate_keypair(self.dir / "keys", nid)
        spawned = {nid: self._spawn(nid) for nid in ids}
        deadline = time.monotonic() + START_TIMEOUT_S
        for nid, proc in spawned.items():
            self._register(nid, proc, deadline)

    def restart(self, nid: str) -> None:
        """Start ``nid`` again (after a crash) on its old endpoint, with its old peers."""
        old = self.agents.pop(nid)
        old.control.close()
        _kill_popen(old.proc)
        self._register(nid, self._spawn(nid), time.monotonic() + START_TIMEOUT_S)

    def status(self, nid: str) -> dict[str, Any]:
        return self.agents[nid].control.call("status")

    def events(self, nid: str, since: int) -> list[dict[str, Any]]:
        return self.agents[nid].control.call("events_since", seq=since)

    def each(self, fn: Callable[[str], T], ids: Iterable[str] | None = None) -> dict[str, T]:
        """``fn(node_id)`` for every agent (or ``ids``), one thread each: agents starved of CPU
        answer their control socket in seconds, and 32 of them one after another take minutes.
        Each agent's control client is used by one thread at a time."""
        ids = list(self.agents) if ids is None else list(ids)
        with ThreadPoolExecutor(max_workers=len(ids), thread_name_prefix="control") as pool:
            futures = {nid: pool.submit(fn, nid) for nid in ids}
            return {nid: f.result() for nid, f in futures.items()}

    def statuses(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        return self.each(self.status, ids)

    def last_seqs(self, ids: Iterable[str] | None = None) -> dict[str, int]:
        return {n: st["events"]["last_seq"] for n, st in self.statuses(ids).items()}

    def events_after(self, seqs: Mapping[str, int]) -> dict[str, list[dict[str, Any]]]:
        return self.each(lambda n: self.events(n, seqs[n]), seqs)

    def wait_alive(self, timeout_s: float, min_incarnation: Mapping[str, int] | None = None,
                   interval_s: float = EVENT_POLL_S) -> None:
        """Until every agent sees every other alive (at ``min_incarnation`` or above); raises
        TimeoutError with what it saw last."""
        floor = dict(min_incarnation or {})
        deadline = time.monotonic() + timeout_s
        bad: dict[str, Any] = {}
        while time.monotonic() < deadline:
            bad = {}
            for nid, st in self.statuses().items():
                for other in self.agents:
                    m = st["members"].get(other, {}) if other != nid else None
                    if m is not None and (m.get("state") != "alive" or
                                          (m.get("incarnation") or 0) < floor.get(other, 0)):
                        bad[f"{nid}->{other}"] = m.get("state")
            if not bad:
                return
            time.sleep(interval_s)
        shown = dict(list(bad.items())[:8])
        raise TimeoutError(f"mesh not all alive after {timeout_s:g} s: {shown}")

    def alive_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.control.close()
        for proc in self._procs:
            _kill_popen(proc)
        left = self.alive_pids()
        if left:
            raise RuntimeError(f"agent processes still running after close: {left}")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _ready_line(proc: subprocess.Popen[str], deadline: float, log_path: Path) -> dict[str, str]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("MESH_READY "):
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
        raise RuntimeError(f"agent {log_path.stem}: no MESH_READY line (got {line!r}, exit "
                           f"code {proc.poll()}); log:\n{tail}")
    return dict(kv.split("=", 1) for kv in line.split()[1:])


class _Burners:
    """CPU burner processes at this process's (normal) priority; killed by PID on exit."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       stdin=subprocess.DEVNULL) for _ in range(n)]

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


class _LoadSampler(threading.Thread):
    """The 1-minute load average every ``LOAD_SAMPLE_S``, with the time it was read."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="load-sampler")
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), os.getloadavg()[0]))
            if self.stop_event.wait(LOAD_SAMPLE_S):
                return

    def between(self, t0: float, t1: float) -> list[float]:
        return [v for t, v in self.samples if t0 <= t <= t1] or [os.getloadavg()[0]]


# ==================================================================== 1. detection
@dataclass(frozen=True)
class _Detection:
    last_down_s: float      # signal -> the last observer's ``down`` (the figure)
    first_down_s: float
    first_suspect_s: float | None
    missed: int             # observers without a ``down`` within DETECT_BOUND_S
    false_suspicions: int   # suspect/down events about other (live) nodes, by the observers


def _first_wall(events: Iterable[Mapping[str, Any]], kind: str, node: str) -> float | None:
    return next((e["wall_s"] for e in events if e["kind"] == kind and e["node_id"] == node),
                None)


def _detect_once(fleet: _Fleet, victim: str, fault: str) -> _Detection:
    observers = [n for n in fleet.agents if n != victim]
    seq0 = fleet.last_seqs(observers)
    incarnation = fleet.status(observers[0])["members"][victim]["incarnation"] or 0
    procs = _tree(fleet.agents[victim].proc.pid)
    t0 = time.time()
    _signal_all(procs, SIGNALS[fault])
    downs: dict[str, float] = {}
    try:
        deadline = time.monotonic() + DETECT_BOUND_S
        while len(downs) < len(observers) and time.monotonic() < deadline:
            for o in observers:
                if o not in downs and (w := _first_wall(fleet.events(o, seq0[o]), "down",
                                                        victim)) is not None:
                    downs[o] = w - t0
            time.sleep(EVENT_POLL_S)
    finally:
        if fault == "hang":
            _signal_all(procs, signal.SIGCONT)
    if fault == "crash":
        fleet.restart(victim)
    fleet.wait_alive(RECOVER_TIMEOUT_S, {victim: incarnation + 1})
    seen = fleet.events_after(seq0)
    suspects = [w - t0 for evs in seen.values()
                if (w := _first_wall(evs, "suspect", victim)) is not None]
    false = sum(1 for evs in seen.values() for e in evs
                if e["kind"] in ("suspect", "down") and e["node_id"] != victim)
    missed = len(observers) - len(downs)
    return _Detection(last_down_s=DETECT_BOUND_S if missed else max(downs.values()),
                      first_down_s=min(downs.values(), default=DETECT_BOUND_S),
                      first_suspect_s=min(suspects, default=None), missed=missed,
                      false_suspicions=false)


def run_detection(quick: bool, work_dir: Path) -> dict[str, Any]:
    """Crash and hang detection of one agent process among 5, per heartbeat interval."""
    out: dict[str, Any] = {"detect_agents": MESH_NODES, "detect_curve": True}
    ids = [f"a{i}" for i in range(MESH_NODES)]
    for hb in HEARTBEATS_S:
        tag = f"hb{round(hb * 1000)}ms"
        n = DETECT_SAMPLES[hb][1 if quick else 0]
        settle_s = max(SETTLE_MIN_S, SETTLE_BEATS * hb)
        samples: dict[str, list[_Detection]] = {f: [] for f in FAULTS}
        with _Fleet(work_dir / tag, mesh_overrides(hb), curve=True) as fleet:
            fleet.start(ids)
            fleet.wait_alive(RECOVER_TIMEOUT_S)
            time.sleep(settle_s)
            for j in range(2 * n):   # faults alternate; victims rotate over all nodes
                fault = FAULTS[j % 2]
                samples[fault].append(_detect_once(fleet, ids[j % len(ids)], fault))
                time.sleep(settle_s)
        _log(f"detect {tag}: " + ", ".join(
            f"{f} max {max(d.last_down_s for d in g):.3f} s" for f, g in samples.items()))
        for fault, got in samples.items():
            key = f"{tag}_{fault}"
            out.update(_stats(key, [d.last_down_s for d in got]))
            out[f"{key}_p99_beats"] = out[f"{key}_p99_s"] / hb
            out[f"{key}_first_observer_p50_s"] = _percentile([d.first_down_s for d in got], 50)
            suspect = [d.first_suspect_s for d in got if d.first_suspect_s is not None]
            if suspect:
                out[f"{key}_first_suspect_p50_s"] = _percentile(suspect, 50)
            out[f"{key}_missed"] = sum(d.missed for d in got)
        out[f"{tag}_samples_per_fault"] = n
        out[f"{tag}_false_suspicions"] = sum(d.false_suspicions for g in samples.values()
                                             for d in g)
    return out


# ==================================================================== 2. Ray beside the mesh
@dataclass(frozen=True)
class _RayEnv:
    cluster: LocalCluster
    stable: RayMesh
    namespace: str
    config: MeshConfig


@dataclass(frozen=True)
class _RaySample:
    ray_s: float            # signal -> ray.nodes() shows the node dead
    mesh_s: float           # signal -> the last observer agent's ``down``
    signal_spread_s: float  # how long sending the signals took (group + each process)


@contextlib.contextmanager
def _ray_env(tuned: bool) -> Iterator[_RayEnv]:
    """A head and one stable worker with a mesh agent each; nothing left running after."""
    work_dir = Path(tempfile.mkdtemp(prefix="bmr-", dir="/tmp"))  # short: Ray's socket paths
    cluster: LocalCluster | None = None
    stable: RayMesh | None = None
    config = MeshConfig.preset("local", **mesh_overrides(GOAL_HEARTBEAT_S))
    try:
        cluster = LocalCluster.start([NodeConfig("head", site="tokyo", num_cpus=0),
                                      NodeConfig("w1", site="tokyo", num_cpus=1)],
                                     work_dir=work_dir, tuned_health_checks=tuned)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        nodes = [_wait_node_alive(n) for n in ("head", "w1")]
        namespace = f"bench-mesh-{uuid.uuid4().hex[:8]}"
        stable = RayMesh.start(namespace=namespace, site="tokyo", config=config, nodes=nodes)
        stable.wait_all_up(60)
        yield _RayEnv(cluster, stable, namespace, config)
    finally:
        if stable is not None:
            with contextlib.suppress(Exception):
                stable.stop()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)


def _ray_sample(env: _RayEnv, fault: str, index: int) -> _RaySample:
    name = f"v{index}-{uuid.uuid4().hex[:4]}"
    env.cluster.add_node(NodeConfig(name, site="tokyo", zone="v", num_cpus=1))
    victim: RayMesh | None = None
    try:
        node_id = _wait_node_alive(name)
        victim = RayMesh.start(namespace=env.namespace, site="tokyo", config=env.config,
                               nodes=[node_id])
        mesh = RayMesh(env.namespace, {**env.stable.handles, **victim.handles})
        mesh.connect({})   # the stable agents drop the last victim and add this one
        mesh.wait_all_up(60)
        time.sleep(RAY_SETTLE_S)
        observers = env.stable.handles
        seq0 = {nid: max((e["seq"] for e in ray.get(h.events_since.remote(0), timeout=30)),
                         default=0) for nid, h in observers.items()}
        node = env.cluster.nodes[name]
        procs = node.process_tree()
        group = node.pid if os.getpgid(node.pid) == node.pid else None
        watch = _Watch("ray-node-death", lambda: not any(
            n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), interval_s=RAY_POLL_S)
        watch.start()
        t0_wall, t0 = time.time(), time.perf_counter()
        _signal_all(procs, SIGNALS[fault], group=group)
        spread_s = time.perf_counter() - t0
        detected_at = watch.finish(RAY_DETECT_BOUND_S)
        if detected_at is None:
            raise TimeoutError(f"Ray still shows {name} alive {RAY_DETECT_BOUND_S:g} s after "
                               f"the {fault}")
        downs = [_first_wall(ray.get(h.events_since.remote(seq0[nid]), timeout=30), "down",
                             node_id) for nid, h in observers.items()]
        mesh_s = max(w - t0_wall for w in downs) if None not in downs else RAY_DETECT_BOUND_S
        _log(f"ray sample {index} ({fault}): Ray {detected_at - t0:.2f} s, mesh {mesh_s:.3f} s")
        return _RaySample(ray_s=detected_at - t0, mesh_s=mesh_s, signal_spread_s=spread_s)
    finally:
        with contextlib.suppress(Exception):
            env.cluster.kill_node(name)   # SIGKILL ends a stopped tree too
        if victim is not None:
            for h in victim.handles.values():
                with contextlib.suppress(Exception):
                    ray.kill(h)
            for nid in victim.handles:
                env.stable.handles.pop(nid, None)


def run_ray(quick: bool) -> dict[str, Any]:
    """Ray's node-death detection (default and tuned health checks) beside the mesh's, same
    signals to the same nodes."""
    leaked = sorted(k for k in os.environ if k.startswith("RAY_health_check_"))
    if leaked:
        raise RuntimeError(f"{leaked} set in this environment: the 'default' cluster would not "
                           "run Ray's defaults")
    out: dict[str, Any] = {}
    index = 0
    for settings in ("default", "tuned"):
        counts = {f: RAY_SAMPLES[(settings, f)][1 if quick else 0] for f in FAULTS}
        order = [f for i in range(max(counts.values())) for f in FAULTS if i < counts[f]]
        samples: dict[str, list[_RaySample]] = {f: [] for f in FAULTS}
        with _ray_env(tuned=settings == "tuned") as env:
            for fault in order:
                samples[fault].append(_ray_sample(env, fault, index))
                index += 1
        for fault, got in samples.items():
            key = f"ray_{settings}_{fault}"
            ray_s, mesh_s = [s.ray_s for s in got], [s.mesh_s for s in got]
            out.update(_stats(key, ray_s))
            out.update(_stats(f"{key}_mesh", mesh_s))
            out[f"ratio_{settings}_{fault}"] = out[f"{key}_p50_s"] / out[f"{key}_mesh_p99_s"]
            out[f"ratio_{settings}_{fault}_p50"] = out[f"{key}_p50_s"] / out[f"{key}_mesh_p50_s"]
            out[f"{key}_samples"] = len(got)
            out[f"{key}_signal_spread_max_s"] = max(s.signal_spread_s for s in got)
    return out


# ==================================================================== 3. soak
def run_soak(soak_s: float, work_dir: Path) -> dict[str, Any]:
    """5 agents at 50 ms for ``soak_s`` with the cores saturated: every suspicion is false."""
    n_burners = min(4, 2 * (os.cpu_count() or 1))
    ids = [f"s{i}" for i in range(MESH_NODES)]
    burners: _Burners | None = None
    with _Fleet(work_dir / "soak", mesh_overrides(GOAL_HEARTBEAT_S), curve=True) as fleet:
        fleet.start(ids)
        fleet.wait_alive(RECOVER_TIMEOUT_S)
        before = fleet.statuses()
        seq0 = {n: st["events"]["last_seq"] for n, st in before.items()}
        late0 = sum(st["late_ticks"] for st in before.values())
        try:
            t0 = time.monotonic()
            burners = _Burners(n_burners)
            while (left := soak_s - (time.monotonic() - t0)) > 0:
                time.sleep(min(LOAD_SAMPLE_S, left))
                dead = [n for n, a in fleet.agents.items() if a.proc.poll() is not None]
                if dead:
                    raise RuntimeError(f"agents {dead} exited during the soak")
            elapsed_s = time.monotonic() - t0
            burner_cpu_s = burners.cpu_s()
        finally:
            if burners is not None:
                burners.close()
        events = [e for evs in fleet.events_after(seq0).values() for e in evs]
        late = sum(st["late_ticks"] for st in fleet.statuses().values()) - late0
        fleet.wait_alive(RECOVER_TIMEOUT_S)   # all still alive and in agreement at the end
    suspects = sum(1 for e in events if e["kind"] == "suspect")
    downs = sum(1 for e in events if e["kind"] == "down")
    return {"soak_s": elapsed_s, "soak_agents": MESH_NODES, "soak_heartbeat_s": GOAL_HEARTBEAT_S,
            "soak_burners": n_burners, "soak_burner_cpu_s_per_s": burner_cpu_s / elapsed_s,
            "soak_false_suspicions": suspects + downs, "soak_false_suspects": suspects,
            "soak_false_downs": downs,
            "soak_refutations": sum(1 for e in events if e["kind"] == "refuted"),
            "soak_late_ticks": late}


# ==================================================================== 4. CPU of 32 agents
def _frames_sent(status: Mapping[str, Any]) -> int:
    return sum(status["frames"]["sent"].values())


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _offered_frames_per_s(n: int, hb_s: float) -> float:
    """Heartbeats and Views every agent sends every peer (``local`` preset, scaled)."""
    gossip_s = mesh_overrides(hb_s)["gossip_interval_s"]
    return n * (n - 1) * (1 / hb_s + 1 / gossip_s)


def _cpu_fleet(n: int, curve: bool, window_s: float, up_bound_s: float,
               work_dir: Path) -> dict[str, Any]:
    """CPU and frames of an ``n``-agent mesh over ``window_s``, measured whether or not the
    mesh keeps up: ``alive_fraction`` says how much of it still sees itself alive."""
    ids = [f"c{i:02d}" for i in range(n)]
    tag = f"cpu{n}_curve_{'on' if curve else 'off'}"
    with _Fleet(work_dir / tag, mesh_overrides(GOAL_HEARTBEAT_S), curve=curve) as fleet:
        t_start = time.monotonic()
        fleet.start(ids)
        start_s = time.monotonic() - t_start
        try:
            fleet.wait_alive(up_bound_s, interval_s=1.0)
            all_up = True
        except TimeoutError:
            all_up = False   # this machine cannot carry it: measure what it costs anyway
        time.sleep(CPU_WARMUP_S)
        stamped = fleet.each(lambda k: (fleet.status(k), time.monotonic()))
        seq0 = {k: st["events"]["last_seq"] for k, (st, _) in stamped.items()}
        sent0 = {k: (ts, _frames_sent(st)) for k, (st, ts) in stamped.items()}
        pids = {k: a.proc.pid for k, a in fleet.agents.items()}
        cpu0, t0 = {k: _cpu_s(p) for k, p in pids.items()}, time.monotonic()
        time.sleep(window_s)
        cpu1, t1 = {k: _cpu_s(p) for k, p in pids.items()}, time.monotonic()
        stamped = fleet.each(lambda k: (fleet.status(k), time.monotonic()))
        statuses = {k: st for k, (st, _) in stamped.items()}
        sent1 = {k: (ts, _frames_sent(st)) for k, (st, ts) in stamped.items()}
        events = [e for evs in fleet.events_after(seq0).values() for e in evs]
    per_agent = [(cpu1[k] - cpu0[k]) / (t1 - t0) for k in ids]
    frames = sum((sent1[k][1] - sent0[k][1]) / (sent1[k][0] - sent0[k][0]) for k in ids)
    pairs = sum(1 for k, st in statuses.items() for o, m in st["members"].items()
                if o != k and m["state"] == "alive")
    return {
        f"{tag}_cpu_s_per_s": sum(per_agent),
        f"{tag}_per_agent_cpu_s_per_s": sum(per_agent) / n,
        f"{tag}_per_agent_max_cpu_s_per_s": max(per_agent),
        f"{tag}_frames_sent_per_s": frames,
        f"{tag}_frames_offered_per_s": _offered_frames_per_s(n, GOAL_HEARTBEAT_S),
        f"{tag}_cpu_us_per_frame": sum(per_agent) / frames * 1e6 if frames else None,
        # What the offered traffic would cost at the per-frame cost just measured.
        f"{tag}_offered_at_measured_cost_cpu_s_per_s": (
            sum(per_agent) / frames * _offered_frames_per_s(n, GOAL_HEARTBEAT_S)
            if frames else None),
        f"{tag}_all_up_before_window": all_up,
        f"{tag}_start_s": start_s,
        f"{tag}_alive_fraction": pairs / (n * (n - 1)) if n > 1 else 1.0,
        f"{tag}_suspicions": sum(1 for e in events if e["kind"] in ("suspect", "down")),
    }


def run_cpu(quick: bool, work_dir: Path) -> dict[str, Any]:
    """CPU seconds per second of a 32-agent mesh at 50 ms, CURVE on and off; beside it, in the
    same run, one agent without peers (the fixed cost of its loop) and an 8-agent mesh."""
    window_s, up_bound_s = CPU_WINDOW_S[1 if quick else 0], CPU_UP_BOUND_S[1 if quick else 0]
    out: dict[str, Any] = {"cpu_heartbeat_s": GOAL_HEARTBEAT_S, "cpu_window_s": window_s}
    idle = _cpu_fleet(1, True, window_s / 2, up_bound_s, work_dir)
    out["cpu1_idle_cpu_s_per_s"] = idle["cpu1_curve_on_cpu_s_per_s"]
    baselines = [(CPU_BASELINE_AGENTS, True)] + ([] if quick else [(CPU_BASELINE_AGENTS, False)])
    for n, curve in [*baselines, (CPU_AGENTS, True), (CPU_AGENTS, False)]:
        out.update(_cpu_fleet(n, curve, window_s, up_bound_s, work_dir))
    return out


# ==================================================================== entry points
def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} bench_mesh: {msg}", file=sys.stderr, flush=True)


def _soak_s(quick: bool, soak_s: float | None) -> float:
    if soak_s is None and os.environ.get(SOAK_ENV):
        soak_s = float(os.environ[SOAK_ENV])
    if soak_s is None:
        soak_s = SOAK_S[1 if quick else 0]
    if not soak_s > 0:
        raise ValueError(f"soak_s = {soak_s!r}: must be > 0 seconds")
    return soak_s


def _goals(r: Mapping[str, Any]) -> dict[str, Any]:
    """``goal_*_met`` from the figures that were measured (a section not run sets none)."""
    out: dict[str, Any] = {}
    hb = f"hb{round(GOAL_HEARTBEAT_S * 1000)}ms"
    for fault in FAULTS:
        if f"{hb}_{fault}_p99_s" in r:
            out[f"goal_{fault}_p99_met"] = (r[f"{hb}_{fault}_p99_s"] <= GOAL_P99_S
                                            and r[f"{hb}_{fault}_missed"] == 0)
    if "ratio_default_crash" in r:
        out["goal_vs_default_crash_met"] = r["ratio_default_crash"] >= GOAL_VS_DEFAULT_CRASH
        out["goal_vs_default_hang_met"] = r["ratio_default_hang"] >= GOAL_VS_DEFAULT_HANG
        out["goal_vs_tuned_met"] = min(r["ratio_tuned_crash"],
                                       r["ratio_tuned_hang"]) >= GOAL_VS_TUNED
    if "soak_false_suspicions" in r:
        out["goal_soak_met"] = r["soak_false_suspicions"] == 0 and r["soak_s"] >= GOAL_SOAK_S
    return out


def run(quick: bool = False, soak_s: float | None = None,
        sections: Iterable[str] = SECTIONS) -> dict[str, Any]:
    """The sections asked for, in order detect, ray, cpu32, soak; one flat dict, units in the
    key names, ``<section>_load1_*`` the machine's 1-minute load average during each."""
    wanted = set(sections)
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections = {sorted(unknown)}: unknown (known: {list(SECTIONS)})")
    soak = _soak_s(quick, soak_s)
    work = Path(tempfile.mkdtemp(prefix="bmesh-", dir="/tmp"))
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("detect", lambda: run_detection(quick, work)), ("ray", lambda: run_ray(quick)),
        ("cpu32", lambda: run_cpu(quick, work)), ("soak", lambda: run_soak(soak, work))]
    results: dict[str, Any] = {"cpu_count": os.cpu_count() or 0, "quick": quick}
    load = _LoadSampler()
    load.start()
    t_start = time.monotonic()
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every section's cleanup runs.
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if on_main else None
    try:
        for name, step in steps:
            if name not in wanted:
                continue
            t0 = time.monotonic()
            _log(f"section {name}: start (load {os.getloadavg()[0]:.1f})")
            try:
                part = step()
            except Exception as exc:  # noqa: BLE001 - reported; the other sections still run
                traceback.print_exc(file=sys.stderr)
                part = {f"{name}_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            results.update(part)
            _log(f"section {name}: {json.dumps(part, default=str)}")
            t1 = time.monotonic()
            seen = load.between(t0, t1)
            results.update({f"{name}_wall_s": t1 - t0, f"{name}_load1_mean": sum(seen) / len(seen),
                            f"{name}_load1_max": max(seen)})
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        load.stop_event.set()
        shutil.rmtree(work, ignore_errors=True)
    results["bench_wall_s"] = time.monotonic() - t_start
    results.update(_goals(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples, a 30 s soak, a 10 s CPU window")
    parser.add_argument("--soak-s", type=float, default=None,
                        help=f"soak length in seconds (default 600, 30 with --quick; "
                             f"or ${SOAK_ENV})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, soak_s=args.soak_s,
                         sections=args.sections.split(","))))


if __name__ == "__main__":
    main()
