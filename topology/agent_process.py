"""One mesh agent as a process, driven over a loopback control socket.

    python -m topology.agent --config node.json

``node.json`` (:class:`AgentProcessConfig`)::

    {"node_id": "tokyo-1", "site": "tokyo", "bind": "tcp://127.0.0.1:7101",
     "peers": {"tokyo-2": {"endpoint": "tcp://127.0.0.1:7102", "site": "tokyo",
                           "public_key_file": "keys/tokyo-2.key"}},
     "preset": "local", "overrides": {"heartbeat_interval_s": 0.05},
     "secret_key_file": "keys/tokyo-1.key_secret", "allow_dir": "keys",
     "control": "tcp://127.0.0.1:*"}

It prints one line once the agent runs — ``MESH_READY node=<id> endpoint=<bound endpoint>
control=<control endpoint> pid=<pid> priority=<realtime|nice|inherit>`` — then serves the control socket (a REP socket on loopback
only; one JSON request, one JSON reply ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": "..."}``): ``status``, ``events_since {seq}``, ``set_link_faults {peer, drop_out,
drop_in, delay_s}``, ``clear_link_faults {peer?}``, ``add_peer {node_id, endpoint, site,
public_key?}``, ``remove_peer {node_id}``, ``leave``. SIGTERM or SIGINT stops it cleanly
(a graceful leave first, unless ``leave_on_stop`` is false) and it exits 0; 1 if the agent
fail-stopped, 2 on a bad config.

The control socket is plaintext and unauthenticated, hence loopback only: it is for tests and
chaos tools on the node itself (:class:`ControlClient`), and can be turned off (``"control":
null``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from topology.agent import MeshAgent
from topology.agent_types import AgentState, Peer
from topology.config import MeshConfig
from topology.keys import load_allow_list, load_identity, load_public_key
from topology.priority import raise_priority

__all__ = ["AgentProcessConfig", "ControlClient", "ControlError", "ControlServer",
           "build_agent", "main"]

log = logging.getLogger(__name__)

_LOOPBACK = ("tcp://127.0.0.1:", "tcp://[::1]:", "ipc://")


class PeerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str
    site: str
    public_key: str | None = None
    public_key_file: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> PeerSpec:
        if self.public_key is not None and self.public_key_file is not None:
            raise ValueError("give public_key or public_key_file, not both")
        return self


class AgentProcessConfig(BaseModel):
    """What one agent process runs. Key files are read at start; paths are relative to the
    config file's directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_id: str
    site: str
    bind: str = "tcp://127.0.0.1:*"
    peers: dict[str, PeerSpec] = Field(default_factory=dict)
    preset: str = "local"
    overrides: dict[str, Any] = Field(default_factory=dict)
    secret_key_file: str | None = None
    allow_dir: str | None = None
    control: str | None = "tcp://127.0.0.1:*"
    incarnation: int | None = None
    voter_only: bool = False
    leave_on_stop: bool = True
    log_level: str = "INFO"
    #: CPU priority of the agent's threads (``topology.priority``): real-time SCHED_RR when
    #: permitted (falls back to nice 0), so a saturated machine does not look dead.
    priority: Literal["realtime", "nice", "inherit"] = "realtime"
    #: A lease voter served over the mesh (``topology.witness``): ``{"store": "promises.json",
    #: "preset": "local", "overrides": {...}}``. Required when ``voter_only``.
    lease_voter: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> AgentProcessConfig:
        if self.control is not None and not self.control.startswith(_LOOPBACK):
            raise ValueError(f"control = {self.control!r}: the control socket is "
                             "unauthenticated and must be on loopback (tcp://127.0.0.1:PORT "
                             "or ipc://)")
        if self.allow_dir is not None and self.secret_key_file is None:
            raise ValueError("allow_dir needs secret_key_file (CURVE)")
        if self.voter_only and self.lease_voter is None:
            raise ValueError("voter_only needs lease_voter (a witness only votes)")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[AgentProcessConfig, Path]:
        """The config in ``path`` and the directory its relative paths are relative to.

        Raises:
            ValueError: unreadable, not JSON, or invalid (the message names the field).
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as exc:
            raise ValueError(f"{p}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not JSON: {exc}") from None
        try:
            return cls.model_validate(data), p.resolve().parent
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"{p}: {problems}") from None


def build_agent(cfg: AgentProcessConfig, base: Path) -> MeshAgent:
    """The agent ``cfg`` describes (keys loaded, mesh config validated), not started.

    Raises:
        MeshConfigError, KeyFileError, ValueError: as the parts they come from.
    """
    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else base / p

    mesh = MeshConfig.preset(cfg.preset, **cfg.overrides)
    curve = load_identity(path(cfg.secret_key_file)) if cfg.secret_key_file else None
    allow = load_allow_list(path(cfg.allow_dir)) if cfg.allow_dir else None
    peers = {nid: _peer(spec, path) for nid, spec in cfg.peers.items()}
    return MeshAgent(cfg.node_id, cfg.site, cfg.bind, peers, mesh, curve=curve, allow=allow,
                     incarnation=cfg.incarnation, voter_only=cfg.voter_only)


def _peer(spec: PeerSpec, path: Callable[[str], Path]) -> Peer:
    key = spec.public_key.encode() if spec.public_key else None
    if spec.public_key_file:
        key = load_public_key(path(spec.public_key_file))
    return Peer(spec.endpoint, spec.site, key)


# ---------------------------------------------------------------------------------------------
# Control socket

class ControlError(RuntimeError):
    """Raised by :class:`ControlClient` when the agent answers with an error or not at all."""


class ControlServer:
    """The REP socket serving one agent's control requests (see the module docstring)."""

    POLL_S = 0.05

    def __init__(self, agent: MeshAgent, endpoint: str) -> None:
        self.agent = agent
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ops: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "status": lambda a: agent.status(),
            "events_since": lambda a: agent.events_since(int(a.get("seq", 0))),
            "set_link_faults": lambda a: _faults(agent, a),
            "clear_link_faults": lambda a: agent.clear_link_faults(a.get("peer")),
            "add_peer": lambda a: agent.add_peer(a["node_id"], Peer(
                a["endpoint"], a["site"], a.get("public_key") or None)),
            "remove_peer": lambda a: agent.remove_peer(a["node_id"]),
            "leave": lambda a: agent.leave(),
        }

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until ``stop`` is set or the agent fail-stops."""
        while not stop.is_set() and self.agent.state is AgentState.RUNNING:
            if self._sock.poll(round(self.POLL_S * 1000)):
                self._sock.send(self._answer(self._sock.recv()))

    def _answer(self, raw: bytes) -> bytes:
        try:
            req = json.loads(raw)
            op = req.get("op") if isinstance(req, dict) else None
            if op not in self._ops:
                raise ValueError(f"op = {op!r}: unknown (known: {sorted(self._ops)})")
            reply = {"ok": True, "result": self._ops[op](req)}
        except Exception as exc:  # every request gets an answer; the error is the answer
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return json.dumps(reply, default=str).encode()

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


def _faults(agent: MeshAgent, a: Mapping[str, Any]) -> dict[str, float]:
    f = agent.set_link_faults(a["peer"], drop_out=float(a.get("drop_out", 0.0)),
                              drop_in=float(a.get("drop_in", 0.0)),
                              delay_s=float(a.get("delay_s", 0.0)))
    return {"drop_out": f.drop_out, "drop_in": f.drop_in, "delay_s": f.delay_s}


class ControlClient:
    """Talks to an agent process's control socket (tests, chaos tools). Not thread-safe."""

    def __init__(self, endpoint: str, *, timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None

    def call(self, op: str, **args: Any) -> Any:
        """The result of ``op``.

        Raises:
            ControlError: the agent answered with an error, or not within ``timeout_s``.
        """
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        self._sock.send(json.dumps({"op": op, **args}).encode())
        if not self._sock.poll(round(self.timeout_s * 1000)):
            self._sock.close(linger=0)   # a REQ that got no reply cannot send again
            self._sock = None
            raise ControlError(f"{self.endpoint}: no answer to {op!r} within "
                               f"{self.timeout_s:g} s")
        reply = json.loads(self._sock.recv())
        if not reply.get("ok"):
            raise ControlError(f"{self.endpoint}: {op}: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Entry point

def main(argv: list[str] | None = None, *, voter_only: bool = False) -> int:
    """Run one agent process (``python -m topology.agent``; ``topology.witness`` passes
    ``voter_only``). Returns the exit status."""
    prog = "python -m topology." + ("witness" if voter_only else "agent")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the agent's JSON config file")
    args = parser.parse_args(argv)
    try:
        cfg, base = AgentProcessConfig.load(args.config)
        if voter_only and not cfg.voter_only:
            cfg = cfg.model_copy(update={"voter_only": True})
            AgentProcessConfig.model_validate(cfg.model_dump())
        logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        applied = raise_priority(cfg.priority)  # before any agent or ZeroMQ thread starts
        agent = build_agent(cfg, base)
    except (ValueError, ValidationError) as exc:   # MeshConfigError, KeyFileError included
        print(f"topology.agent: config error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    control: ControlServer | None = None
    voter = None
    try:
        agent.start()
        if cfg.lease_voter is not None:
            from topology.witness import serve_lease_voter

            voter = serve_lease_voter(agent, cfg.lease_voter, base)
        if cfg.control is not None:
            control = ControlServer(agent, cfg.control)
        print(f"MESH_READY node={agent.node_id} endpoint={agent.endpoint} "
              f"control={control.endpoint if control else '-'} pid={os.getpid()} "
              f"priority={applied}", flush=True)
        if control is not None:
            control.serve(stop)
        else:
            while not stop.wait(0.1) and agent.state is AgentState.RUNNING:
                pass
    finally:
        failed = agent.state is AgentState.FAILED
        agent.stop(leave=cfg.leave_on_stop and not failed)
        if control is not None:
            with contextlib.suppress(Exception):
                control.close()
        log.info("%s: stopped (%s)%s", agent.node_id, "fail-stop" if failed else "signal",
                 f", voter {voter!r}" if voter is not None else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
