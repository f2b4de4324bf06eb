"""Generic cluster topology: the ZeroMQ heartbeat mesh, failure detection, partitions and
site failover (issue 4). Knows nothing of trading."""

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

__all__ = [
    "FRAME_VERSION", "LAN", "LOCAL", "WAN", "Ack", "Action", "Alive", "Bridge", "Broadcast",
    "Claim", "Clock", "Dead", "EventQueue", "Frame", "FrameError", "Group", "Heartbeat", "Left",
    "ManualClock", "MemberInfo", "MemberState", "MemberTrigger", "Membership", "MembershipEvent",
    "MeshConfig", "MeshConfigError", "MonotonicClock", "PartitionEvent", "PartitionPicture",
    "PartitionTracker", "Payload", "PhiAccrualDetector", "PingReq", "ReplayGuard", "Send",
    "SkewedClock", "Suspect", "Transition", "View", "Voters", "analyze", "decode", "encode",
    "initial_incarnation", "phi_many", "view_digest",
]
