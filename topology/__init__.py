"""Generic cluster topology: the ZeroMQ heartbeat mesh, failure detection, partitions and
site failover (issue 4). Knows nothing of trading.

The pure core (clock, config, phi, frames, membership, partition, lease, replication) is
imported eagerly; the socket layer (agent, keys, witness: they load ZeroMQ) on first use of one
of its names, so that the core stays light and ``python -m topology.agent`` does not import
itself twice.
"""

import importlib
from typing import Any

from topology.clock import Clock, ManualClock, MonotonicClock, SkewedClock
from topology.config import LAN, LOCAL, WAN, MeshConfig, MeshConfigError
from topology.frames import (
    FRAME_VERSION,
    Ack,
    Alive,
    Claim,
    Dead,
    Frame,
    FrameError,
    Heartbeat,
    Left,
    Payload,
    PingReq,
    ReplayGuard,
    Suspect,
    View,
    decode,
    encode,
    view_digest,
)
from topology.lease import (
    EpochFence,
    FilePromiseStore,
    HolderState,
    LeaseConfig,
    LeaseHolder,
    LeaseVoter,
    Outgoing,
    decode_lease_message,
)
from topology.membership import (
    Action,
    Broadcast,
    EventQueue,
    MemberInfo,
    Membership,
    MembershipEvent,
    MemberState,
    MemberTrigger,
    Send,
    Transition,
    initial_incarnation,
)
from topology.partition import (
    Bridge,
    Group,
    PartitionEvent,
    PartitionPicture,
    PartitionTracker,
    Voters,
    analyze,
)
from topology.phi import PhiAccrualDetector, phi_many
from topology.replication import (
    Lag,
    ReplicationConfig,
    ReplicationReceiver,
    ReplicationSender,
    decode_replication_message,
)

#: Names of the socket layer, imported from their module on first use.
_LAZY = {
    **dict.fromkeys(("AgentState", "AgentStoppedError", "LinkFaults", "MeshEvent", "Peer",
                     "UnknownPeerError"), "topology.agent_types"),
    "MeshAgent": "topology.agent",
    "SocketOptions": "topology.agent_transport",
    **dict.fromkeys(("CurveIdentity", "KeyFileError", "generate_keypair", "load_allow_list",
                     "load_identity", "load_public_keys"), "topology.keys"),
    **dict.fromkeys(("LEASE_KIND", "LeaseVoterService", "serve_lease_voter"), "topology.witness"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'topology' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [  # the lazy names resolve through __getattr__
    "FRAME_VERSION", "LAN", "LOCAL", "WAN", "Ack", "Action", "Alive", "Bridge", "Broadcast",
    "Claim", "Clock", "Dead", "EpochFence", "EventQueue", "FilePromiseStore", "Frame",
    "FrameError", "Group", "Heartbeat", "HolderState", "Lag", "LeaseConfig", "LeaseHolder",
    "LeaseVoter", "Left", "ManualClock", "MemberInfo", "MemberState", "MemberTrigger",
    "Membership", "MembershipEvent", "MeshConfig", "MeshConfigError", "MonotonicClock",
    "Outgoing", "PartitionEvent", "PartitionPicture", "PartitionTracker", "Payload",
    "PhiAccrualDetector", "PingReq", "ReplayGuard", "ReplicationConfig", "ReplicationReceiver",
    "ReplicationSender", "Send", "SkewedClock", "Suspect", "Transition", "View", "Voters",
    "analyze", "decode", "decode_lease_message", "decode_replication_message", "encode",
    "initial_incarnation", "phi_many", "view_digest", *sorted(_LAZY),
]
