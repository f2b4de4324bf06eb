"""A local multi-node Ray cluster on one machine: a head and workers, each a real raylet.

Every node is one ``ray start --block`` process started in its own session, so the node's
raylet, object store, agents and actor workers are all that process's descendants and share
its process group. That gives us the two ways a node leaves:

* :meth:`LocalCluster.kill_node` — a crash: SIGKILL to the whole process tree at once.
* :meth:`LocalCluster.remove_node` — a graceful leave: SIGTERM, then SIGKILL after a grace.

The cluster writes a small state file (``cluster.json`` in its work dir) so that another
process (``bastion down`` / ``bastion status``) can find and tear it down by PID. We never run
``ray stop``: it would kill every Ray process on the machine, not only ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

#: Ray health-check settings that make Ray itself notice a crashed node in ~1.4 s
#: (see RAY_ZMQ_NOTES.md); the defaults take ~13 s.
TUNED_HEALTH_CHECK_ENV: dict[str, str] = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}

NODE_NAME_LABEL = "bastion-node"
DEFAULT_OBJECT_STORE_BYTES = 150 * 1024 * 1024
_STARTED_MARK = "Ray runtime started"


class ClusterError(RuntimeError):
    """A local cluster could not be started, found or changed; the message says which node."""


@dataclass(frozen=True)
class NodeConfig:
    """One node of a local cluster. ``labels`` carry ``site`` and ``zone``."""

    name: str
    site: str = "local"
    zone: str = "a"
    num_cpus: float = 4.0
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def all_labels(self) -> dict[str, str]:
        return {"site": self.site, "zone": self.zone, NODE_NAME_LABEL: self.name, **self.labels}


@dataclass
class NodeProcess:
    """A running node: its config and the PID of its ``ray start --block`` process."""

    config: NodeConfig
    pid: int
    head: bool
    log_path: str

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE

    def process_tree(self) -> list[psutil.Process]:
        """The node's processes: its ``ray start`` process, descendants and process group."""
        procs: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                if proc.pid not in procs and os.getpgid(proc.pid) == self.pid:
                    procs[proc.pid] = proc
        return list(procs.values())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ip_address() -> str:
    """The address Ray binds to on this machine (Ray ignores 127.0.0.1 for its node IP)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise ClusterError("the `ray` command is not installed next to this Python")
    return found


def _exited(proc: psutil.Process) -> bool:
    """Gone, or a zombie: it has exited and only its reaper has not collected it yet (for a
    detached process whose starter is gone, that is init, which may take its time)."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(psutil.Error, ChildProcessError):
        proc.wait(0)  # reap it if it is our own child
    return True


def wait_exited(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every one of ``procs`` has exited (gone or a zombie); returns those still
    running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if not _exited(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _exited(p)]
    return alive


def stop_process(pid: int, grace_s: float = 10.0, *, cmdline_has: str | None = None) -> bool:
    """SIGTERM ``pid``, SIGKILL it if it still runs after ``grace_s``; returns whether it was
    running. ``cmdline_has``: only if its command line contains this (a pid from a state file
    may have been reused by another program)."""
    try:
        proc = psutil.Process(pid)
        if _exited(proc) or (cmdline_has is not None
                             and cmdline_has not in " ".join(proc.cmdline())):
            return False
        proc.send_signal(signal.SIGTERM)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if wait_exited([proc], grace_s):
        _sigkill_all([proc])
    return True


def _sigkill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    wait_exited(procs, timeout_s=10.0)


class LocalCluster:
    """Start, grow, crash and tear down a Ray cluster of real raylets on this machine.

    >>> cluster = LocalCluster.start([NodeConfig("head", site="tokyo"),
    ...                               NodeConfig("tokyo-1", site="tokyo")])
    >>> ray.init(address=cluster.address)          # doctest: +SKIP
    >>> cluster.kill_node("tokyo-1")               # SIGKILL its process tree
    >>> cluster.shutdown()                         # nothing left running
    """

    def __init__(
        self,
        work_dir: Path,
        address: str,
        dashboard_port: int | None,
        nodes: dict[str, NodeProcess],
        auth_mode: str,
    ) -> None:
        self.work_dir = work_dir
        self.address = address
        self.dashboard_port = dashboard_port
        self.nodes = nodes
        self.auth_mode = auth_mode

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(
        cls,
        nodes: list[NodeConfig],
        *,
        work_dir: Path | str | None = None,
        include_dashboard: bool = False,
        tuned_health_checks: bool = True,
        auth_mode: str = "disabled",
        object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
        start_timeout_s: float = 60.0,
    ) -> LocalCluster:
        """Start ``nodes[0]`` as the head and the rest as workers; returns when all are up."""
        if not nodes:
            raise ClusterError("a cluster needs at least one node (the head)")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ClusterError(f"node names must be unique, got {names}")
        if auth_mode not in ("disabled", "token"):
            raise ClusterError(f"auth_mode must be 'disabled' or 'token', got {auth_mode!r}")
        if auth_mode == "token":
            ensure_auth_token()
        wd = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bastion-"))
        wd.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        dashboard_port = _free_port() if include_dashboard else None
        cluster = cls(wd, f"{node_ip_address()}:{port}", dashboard_port, {}, auth_mode)
        cluster._object_store_bytes = object_store_bytes
        cluster._tuned = tuned_health_checks
        try:
            cluster._spawn(nodes[0], head=True, port=port, include_dashboard=include_dashboard)
            cluster._wait_started(nodes[0].name, start_timeout_s)
            # One at a time: raylets starting at the same moment on one machine race for
            # ports and one dies with "Address already in use".
            for node in nodes[1:]:
                cluster._spawn(node, head=False)
                cluster._wait_started(node.name, start_timeout_s)
        except BaseException:
            cluster.shutdown()
            raise
        cluster._save()
        return cluster

    def add_node(self, node: NodeConfig, *, start_timeout_s: float = 60.0) -> NodeProcess:
        """Start one more worker node and wait until its raylet has started."""
        if node.name in self.nodes and self.nodes[node.name].alive():
            raise ClusterError(f"node {node.name!r} is already running")
        proc = self._spawn(node, head=False)
        self._wait_started(node.name, start_timeout_s)
        self._save()
        return proc

    def kill_node(self, name: str) -> list[int]:
        """Crash a node: SIGKILL its raylet and every process under it, all at once."""
        node = self._node(name)
        procs = node.process_tree()
        _sigkill_all(procs)
        self._save()
        return [p.pid for p in procs]

    def remove_node(self, name: str, *, grace_s: float = 10.0) -> None:
        """Stop a node gracefully (SIGTERM to ``ray start``), SIGKILL what remains after ``grace_s``."""
        node = self._node(name)
        procs = node.process_tree()
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        _sigkill_all(alive)
        del self.nodes[name]
        self._save()

    def shutdown(self) -> None:
        """Tear the whole cluster down; afterwards none of its processes is running."""
        procs: list[psutil.Process] = []
        for node in self.nodes.values():
            procs.extend(node.process_tree())
        for node in self.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGTERM)
        _sigkill_all(wait_exited(procs, timeout_s=5.0))
        # Anything Ray re-parented away from the tree is still tagged with our temp dir.
        _sigkill_all(self._stray_processes())
        self.nodes.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.work_dir / "cluster.json").unlink()
        if not os.environ.get("BASTION_KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ queries
    def pids(self) -> set[int]:
        """Every process of this cluster: the nodes' trees and process groups, and strays
        that name its temp dir."""
        found = {p.pid for node in self.nodes.values() for p in node.process_tree()}
        return found | {p.pid for p in self._stray_processes()}

    def node_names(self) -> list[str]:
        return list(self.nodes)

    @property
    def temp_dir(self) -> Path:
        """Ray's session dir root: short, because Ray's unix socket paths must fit 107 bytes."""
        digest = hashlib.sha1(str(self.work_dir.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"bray-{digest}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard_port else None

    def env(self) -> dict[str, str]:
        """Environment a driver needs to connect (token auth must be set before `import ray`)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": self.auth_mode}

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load(cls, work_dir: Path | str) -> LocalCluster:
        """Find a cluster started by another process from its state file."""
        path = Path(work_dir) / "cluster.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no local cluster recorded in {path}") from None
        nodes = {
            name: NodeProcess(
                config=NodeConfig(**{**n["config"]}),
                pid=n["pid"],
                head=n["head"],
                log_path=n["log_path"],
            )
            for name, n in state["nodes"].items()
        }
        cluster = cls(Path(work_dir), state["address"], state["dashboard_port"], nodes,
                      state.get("auth_mode", "disabled"))
        cluster._object_store_bytes = state.get("object_store_bytes", DEFAULT_OBJECT_STORE_BYTES)
        cluster._tuned = state.get("tuned", True)
        return cluster

    def _save(self) -> None:
        state = {
            "address": self.address,
            "dashboard_port": self.dashboard_port,
            "auth_mode": self.auth_mode,
            "object_store_bytes": self._object_store_bytes,
            "tuned": self._tuned,
            "nodes": {
                name: {
                    "config": {**asdict(n.config), "resources": dict(n.config.resources),
                               "labels": dict(n.config.labels)},
                    "pid": n.pid, "head": n.head, "log_path": n.log_path,
                }
                for name, n in self.nodes.items()
            },
        }
        tmp = self.work_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.work_dir / "cluster.json")

    # ------------------------------------------------------------------ internals
    _object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES
    _tuned: bool = True

    def _node(self, name: str) -> NodeProcess:
        try:
            return self.nodes[name]
        except KeyError:
            raise ClusterError(f"unknown node {name!r}; nodes are {sorted(self.nodes)}") from None

    def _spawn(
        self, node: NodeConfig, *, head: bool, port: int | None = None,
        include_dashboard: bool = False,
    ) -> NodeProcess:
        labels = ",".join(f"{k}={v}" for k, v in node.all_labels().items())
        cmd = [
            _ray_executable(), "start", "--block",
            f"--num-cpus={node.num_cpus:g}",
            f"--object-store-memory={self._object_store_bytes}",
            f"--labels={labels}",
            "--disable-usage-stats",
        ]
        # Explicit ports, so that two clusters on one machine never share one.
        for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                     "runtime-env-agent-port"):
            cmd.append(f"--{flag}={_free_port()}")
        if node.resources:
            cmd.append(f"--resources={json.dumps(dict(node.resources))}")
        if head:
            cmd += [
                "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={_free_port()}",
                f"--include-dashboard={'true' if include_dashboard else 'false'}",
            ]
            if include_dashboard:
                cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += [f"--address={self.address}"]
        env = {**os.environ, "RAY_AUTH_MODE": self.auth_mode, "RAY_USAGE_STATS_ENABLED": "0"}
        if self._tuned:
            env.update(TUNED_HEALTH_CHECK_ENV)
        log_path = self.work_dir / f"node-{node.name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        proc = NodeProcess(config=node, pid=popen.pid, head=head, log_path=str(log_path))
        self.nodes[node.name] = proc
        return proc

    def _wait_started(self, name: str, timeout_s: float) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout_s
        log = Path(node.log_path)
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if _STARTED_MARK in text:
                return
            if not node.alive():
                raise ClusterError(f"node {name!r} exited while starting; log {log}:\n{text[-2000:]}")
            time.sleep(0.05)
        raise ClusterError(f"node {name!r} did not start within {timeout_s:g} s; log {log}")

    def _stray_processes(self) -> list[psutil.Process]:
        """Processes whose command line names this cluster's temp dir (e.g. a `log_monitor`)."""
        marker = str(self.temp_dir)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                cmdline = proc.info.get("cmdline") or []
                if any(marker in part for part in cmdline) and proc.pid != os.getpid():
                    found.append(proc)
        return found


def ensure_auth_token() -> Path | None:
    """Make sure Ray's token authentication has a token: ``RAY_AUTH_TOKEN`` or an existing
    ``RAY_AUTH_TOKEN_PATH`` file are used as they are; otherwise ``~/.ray/auth_token`` (Ray's
    default, which every later driver and ``ray`` command finds by itself), created 0600 with
    Ray's own generator if missing — ``ray start --head`` does not create it. Returns the file
    (None when the token comes from the environment)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given and Path(given).is_file():
        return Path(given)
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(generate_new_authentication_token())
    return path


def iter_descendants(pid: int) -> Iterator[int]:
    """PIDs below ``pid`` (for leak checks in tests)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children(recursive=True):
            yield child.pid
