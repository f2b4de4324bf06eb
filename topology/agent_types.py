"""Value types of the mesh agent: peers, injected link faults, events, the agent's lifecycle
table and the errors its methods raise. Plain data, no sockets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from topology.keys import check_public_key
from topology.partition import PartitionPicture

__all__ = ["ENDPOINT_SCHEMES", "LIFECYCLE", "LIFECYCLE_EVENTS", "AgentState", "AgentStoppedError",
           "LinkFaults", "MeshEvent", "Peer", "UnknownPeerError", "check_name", "picture_to_dict"]

ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


class UnknownPeerError(LookupError):
    """Raised when a method names a node that is not a configured peer of this agent."""


class AgentStoppedError(RuntimeError):
    """Raised by methods that need the running loop (payloads, leave) when it is not running,
    and by :meth:`MeshAgent.start` on an agent that was stopped."""


def check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ValueError(f"{what} = {value!r:.80}: must be a string of 1..255 characters")
    return value


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a peer listens, its site, and (with CURVE) its Z85 public key."""

    endpoint: str
    site: str
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(ENDPOINT_SCHEMES):
            raise ValueError(f"peer.endpoint = {self.endpoint!r}: must start with one of "
                             f"{', '.join(ENDPOINT_SCHEMES)}")
        check_name("peer.site", self.site)
        if self.public_key is not None:
            object.__setattr__(self, "public_key",
                               check_public_key(self.public_key, "peer.public_key"))


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """Injected faults on the link to one peer, applied by this agent only: ``drop_out`` and
    ``drop_in`` are probabilities of dropping a frame to / from the peer (1.0 cuts that
    direction), ``delay_s`` holds every outgoing frame that long in the loop's delay queue."""

    drop_out: float = 0.0
    drop_in: float = 0.0
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop_out", "drop_in"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"link_faults.{name} = {p!r}: must be a probability in [0, 1]")
        d = self.delay_s
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 60.0:
            raise ValueError(f"link_faults.delay_s = {d!r}: must be in [0, 60] seconds")

    @property
    def active(self) -> bool:
        return bool(self.drop_out or self.drop_in or self.delay_s)


@dataclass(frozen=True, slots=True)
class MeshEvent:
    """One event, numbered in the order the agent saw it (``seq`` from 1).

    ``kind``: membership — ``up`` / ``suspect`` / ``down`` / ``left`` / ``reaped`` about
    ``node_id``, and ``refuted`` when this agent raised its own incarnation to refute a claim;
    partition — ``partitioned`` / ``healed`` (``picture`` set, ``node_id`` None); the agent's
    own life — ``started`` / ``failed`` / ``stopped``. ``ts_s`` is the agent's clock,
    ``wall_s`` wall time (for reports across processes only)."""

    seq: int
    kind: str
    node_id: str | None
    site: str | None
    incarnation: int | None
    ts_s: float
    wall_s: float
    reason: str
    picture: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "node_id": self.node_id, "site": self.site,
                "incarnation": self.incarnation, "ts_s": self.ts_s, "wall_s": self.wall_s,
                "reason": self.reason, "picture": self.picture}


def picture_to_dict(p: PartitionPicture) -> dict[str, Any]:
    """A partition picture as JSON-able data."""
    return {
        "partitioned": p.partitioned, "summary": p.summary(),
        "groups": [{"nodes": list(g.nodes), "sites": list(g.sites),
                    "witnesses": list(g.witnesses)} for g in p.groups],
        "bridges": [{"node": b.node, "groups": list(b.groups)} for b in p.bridges],
        "isolated": list(p.isolated), "asymmetric": [list(a) for a in p.asymmetric],
        "stale": list(p.stale), "unknown": list(p.unknown), "down": list(p.down),
        "majority": p.majority, "total_votes": p.total_votes, "unheld": list(p.unheld),
    }


class AgentState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    FAILED = "failed"     # the loop fail-stopped; sockets closed
    STOPPED = "stopped"


#: The agent's life: ``(state, trigger) -> state``; anything else is refused (ignored).
LIFECYCLE: Mapping[tuple[AgentState, str], AgentState] = {
    (AgentState.NEW, "start"): AgentState.RUNNING,
    (AgentState.NEW, "stop"): AgentState.STOPPED,
    (AgentState.RUNNING, "fail"): AgentState.FAILED,
    (AgentState.RUNNING, "stop"): AgentState.STOPPED,
    (AgentState.FAILED, "stop"): AgentState.STOPPED,
}
LIFECYCLE_EVENTS = {AgentState.RUNNING: "started", AgentState.FAILED: "failed",
                    AgentState.STOPPED: "stopped"}
