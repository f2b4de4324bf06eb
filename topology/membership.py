"""SWIM / Lifeguard membership as one node sees it: who is ALIVE, SUSPECT, DEAD or LEFT.

Pure: no sockets, no clock. The I/O agent feeds it decoded frames with the time they arrived
(``on_heartbeat``, ``on_claim``, ``on_ping_req``, ``on_ack``, or ``on_frame`` for any of them),
calls ``tick(now_s)`` every ``tick_interval_s``, sends the :class:`Send` / :class:`Broadcast`
actions every call returns, and delivers ``events`` (an ordered :class:`EventQueue`) to
subscribers one at a time.

How a peer goes from heard to dead::

    heartbeats ──► phi-accrual detector ──phi >= threshold──► indirect probe: PingReq to k helpers
      helper: Ack(ok) on a heartbeat from the target heard after (or one interval before) the
      request; Ack(ok=False) after 0.8 * probe_timeout_s without one
    any ok Ack, or a direct heartbeat, within probe_timeout_s ──► still ALIVE (one broken link
      is not a dead node: other peers vouch for it)
    otherwise ──► SUSPECT, broadcast Suspect(node, incarnation, by=me)
    suspicion_timeout(confirmations) without a refutation ──► DEAD, broadcast Dead(...)

Incarnations order every claim (memberlist): a claim about incarnation n is dropped if we know a
higher one (counted in ``dropped["stale_claim"]``), a Suspect/Dead is overridden by alive
evidence (a heartbeat or an Alive claim) at n' > n, and a node that hears a Suspect or Dead
about itself at its current incarnation refutes it by bumping its incarnation and broadcasting
Alive. Only the node itself can clear a suspicion — hearing it at the suspected incarnation is
not enough — so a node that is told "you are suspected" by a peer that still hears it at the
old incarnation gets that claim sent back to it directly (rate-limited), and refutes.

Suspicion timeout (Lifeguard, as memberlist's ``suspicion.go``)::

    timeout(C) = max(min_s, max_s - (max_s - min_s) * log(C + 1) / log(K + 1))   (K >= 1)
    timeout    = min_s                                                           (K = 0)

C counts distinct other nodes whose independent Suspect claims at the same incarnation we have
seen; K = min(suspicion_confirmations, alive members other than us, the suspect and the first
suspecter). Local health (Lifeguard's multiplier, 0..max_local_health) scales our probe and
suspicion timeouts by (1 + score): +1 when a probe got no answer at all from some helper we
believed alive (our own links or CPU are likely the problem), +1 when we had to refute a
suspicion of ourselves; -1 when every helper answered, and -1 per suspicion_max_s without an
increase.

Every state change goes through :meth:`Membership._transition`, driven by :data:`TRANSITIONS`
— one ``(state, trigger) -> state`` table; a pair not in it is ignored and counted.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

import numpy as np

from topology.config import MeshConfig
from topology.frames import (
    Ack,
    Alive,
    Claim,
    Dead,
    Frame,
    Heartbeat,
    Left,
    PingReq,
    Suspect,
    View,
    view_digest,
)
from topology.phi import PhiAccrualDetector, phi_many

__all__ = [
    "EVENT_KINDS", "TRANSITIONS", "Action", "Broadcast", "EventQueue", "MemberInfo",
    "MemberState", "MemberTrigger", "Membership", "MembershipEvent", "Send", "Transition",
    "initial_incarnation",
]

log = logging.getLogger(__name__)


class MemberState(StrEnum):
    UNKNOWN = "unknown"  # never heard from, or reaped: not in the table
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class MemberTrigger(StrEnum):
    HEARD = "heard"                          # first heartbeat from a member
    REFUTED = "refuted"                      # alive evidence at a higher incarnation
    PROBE_FAILED = "probe_failed"            # our probe: no direct heartbeat, no helper ack
    SUSPECT_CLAIM = "suspect_claim"          # another node's Suspect at >= known incarnation
    SUSPICION_EXPIRED = "suspicion_expired"  # suspicion timeout passed without refutation
    DEAD_CLAIM = "dead_claim"                # another node's Dead at >= known incarnation
    LEFT_CLAIM = "left_claim"                # the node announced it is leaving
    REAPED = "reaped"                        # dead or left for dead_node_reap_s: forgotten


S, T = MemberState, MemberTrigger
#: The whole membership state machine. Anything else is ignored (``dropped["ignored:..."]``).
TRANSITIONS: Mapping[tuple[MemberState, MemberTrigger], MemberState] = {
    (S.UNKNOWN, T.HEARD): S.ALIVE,
    (S.ALIVE, T.PROBE_FAILED): S.SUSPECT,
    (S.ALIVE, T.SUSPECT_CLAIM): S.SUSPECT,
    (S.ALIVE, T.DEAD_CLAIM): S.DEAD,
    (S.ALIVE, T.LEFT_CLAIM): S.LEFT,
    (S.SUSPECT, T.REFUTED): S.ALIVE,
    (S.SUSPECT, T.SUSPICION_EXPIRED): S.DEAD,
    (S.SUSPECT, T.DEAD_CLAIM): S.DEAD,
    (S.SUSPECT, T.LEFT_CLAIM): S.LEFT,
    (S.DEAD, T.REFUTED): S.ALIVE,
    (S.DEAD, T.LEFT_CLAIM): S.LEFT,
    (S.DEAD, T.REAPED): S.UNKNOWN,
    (S.LEFT, T.REFUTED): S.ALIVE,
    (S.LEFT, T.REAPED): S.UNKNOWN,
}
#: Event kind published on entering each state.
EVENT_KINDS: Mapping[MemberState, str] = {S.ALIVE: "up", S.SUSPECT: "suspect", S.DEAD: "down",
                                    S.LEFT: "left", S.UNKNOWN: "reaped"}
_CLAIM_FOR: Mapping[MemberState, type[Claim]] = {
    S.ALIVE: Alive, S.SUSPECT: Suspect, S.DEAD: Dead, S.LEFT: Left}


def initial_incarnation(wall_s: float) -> int:
    """A starting incarnation for a freshly started agent: wall-clock milliseconds. It exceeds
    any incarnation of the node's previous life unless that life refuted more than 1000
    suspicions per second of uptime, so peers never drop a restarted node as stale."""
    return max(0, int(wall_s * 1000))


# ---------------------------------------------------------------------------------------------
# What goes out: actions for the I/O layer, events for subscribers

@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` to the one node ``to``."""

    to: str
    frame: Frame


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send ``frame`` to every peer."""

    frame: Frame


Action = Send | Broadcast


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """``kind`` is ``up`` / ``suspect`` / ``down`` / ``left`` / ``reaped``."""

    kind: str
    node_id: str
    site: str
    incarnation: int
    ts_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Transition:
    ts_s: float
    node_id: str
    from_state: MemberState
    to_state: MemberState
    trigger: MemberTrigger
    reason: str


E = TypeVar("E")


class EventQueue(Generic[E]):
    """Events in the order they happened, delivered one at a time.

    The producer ``put``s; the I/O loop either ``drain()``s the list itself or calls
    ``deliver()``, which hands each event to every subscriber in subscription order before the
    next event. A subscriber that raises is logged and counted (``listener_errors``) and does not
    stop delivery to the others.
    """

    def __init__(self) -> None:
        self._queue: deque[E] = deque()
        self._listeners: list[Callable[[E], None]] = []
        self.listener_errors = 0
        self.delivered = 0

    def put(self, event: E) -> None:
        self._queue.append(event)

    def subscribe(self, listener: Callable[[E], None]) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def drain(self) -> list[E]:
        """All pending events, oldest first, removed from the queue."""
        out = list(self._queue)
        self._queue.clear()
        return out

    def deliver(self, max_events: int | None = None) -> int:
        """Hand pending events to the subscribers in order; returns how many were delivered."""
        n = 0
        while self._queue and (max_events is None or n < max_events):
            event = self._queue.popleft()
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    self.listener_errors += 1
                    log.exception("membership event subscriber %r failed on %r", listener, event)
            n += 1
        self.delivered += n
        return n

    def __len__(self) -> int:
        return len(self._queue)


# ---------------------------------------------------------------------------------------------
# Internal records

@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A read-only snapshot of one member."""

    node_id: str
    site: str
    state: MemberState
    incarnation: int
    since_s: float
    phi: float
    last_heartbeat_s: float | None


@dataclass(slots=True)
class _Suspicion:
    incarnation: int
    started_s: float
    first: str
    confirmers: set[str]
    expected: int      # K
    scale: float       # 1 + local health when it started

    def deadline_s(self, cfg: MeshConfig) -> float:
        lo, hi = cfg.suspicion_min_s, cfg.suspicion_max_s
        if self.expected < 1:
            timeout = lo
        else:
            confirmations = len(self.confirmers - {self.first})
            frac = math.log(confirmations + 1) / math.log(self.expected + 1)
            timeout = max(lo, hi - (hi - lo) * frac)
        return self.started_s + timeout * self.scale


@dataclass(slots=True)
class _Member:
    node_id: str
    site: str
    detector: PhiAccrualDetector
    state: MemberState = MemberState.UNKNOWN
    incarnation: int = 0
    detector_incarnation: int = -1
    since_s: float = 0.0
    suspicion: _Suspicion | None = None
    next_probe_s: float = -math.inf
    last_nudge_s: float = -math.inf


@dataclass(slots=True)
class _Probe:
    target: str
    incarnation: int
    nonce: int
    deadline_s: float
    helpers: tuple[str, ...]
    answered: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Relay:
    requester: str
    nonce: int
    deadline_s: float


class Membership:
    """One node's membership view. See the module docstring for the protocol.

    ``incarnation`` should come from :func:`initial_incarnation` for a real agent; ``seed``
    makes helper choice reproducible.
    """

    MAX_RELAYS = 4096
    HISTORY = 1000

    def __init__(self, node_id: str, site: str, config: MeshConfig, *, incarnation: int = 0,
                 seed: int = 0) -> None:
        self.node_id = node_id
        self.site = site
        self.config = config
        self._incarnation = incarnation
        self._rng = random.Random(seed)
        self._members: dict[str, _Member] = {}
        self._probes: dict[int, _Probe] = {}             # nonce -> probe we started
        self._probing: dict[str, int] = {}               # target -> nonce
        self._relays: dict[str, list[_Relay]] = {}       # target -> PingReqs we help with
        self._relay_count = 0
        self._next_nonce = 1
        self._hb_seq = 0
        self._view_seq = 0
        self._next_heartbeat_s = -math.inf
        self._next_view_s = -math.inf
        self._last_view_s = -math.inf
        self._view_digest: int | None = None
        self._local_health = 0
        self._health_changed_s = 0.0
        self._left = False
        #: Events in order (up / suspect / down / left / reaped); deliver or drain them.
        self.events: EventQueue[MembershipEvent] = EventQueue()
        #: Every transition, newest last (bounded).
        self.history: deque[Transition] = deque(maxlen=self.HISTORY)
        #: Frames and claims ignored, by reason.
        self.dropped: Counter[str] = Counter()

    # -- reading --------------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def local_health(self) -> int:
        return self._local_health

    def state_of(self, node_id: str) -> MemberState:
        m = self._members.get(node_id)
        return m.state if m else MemberState.UNKNOWN

    def member(self, node_id: str, now_s: float | None = None) -> MemberInfo | None:
        m = self._members.get(node_id)
        if m is None:
            return None
        phi = m.detector.phi(now_s) if now_s is not None else math.nan
        return MemberInfo(m.node_id, m.site, m.state, m.incarnation, m.since_s, phi,
                          m.detector.last_heartbeat_s)

    def members(self, now_s: float | None = None) -> list[MemberInfo]:
        """Snapshots of every member, by node id (phi NaN unless ``now_s`` is given)."""
        infos = (self.member(n, now_s) for n in sorted(self._members))
        return [i for i in infos if i is not None]

    def phis(self, now_s: float) -> dict[str, float]:
        """Phi of every member at ``now_s``, computed in one vectorized call."""
        ids = sorted(self._members)
        dets = [self._members[n].detector for n in ids]
        last = np.array([d.last_heartbeat_s if d.last_heartbeat_s is not None else np.nan
                         for d in dets])
        mean = np.array([d.mean_s if d.sample_count else 1.0 for d in dets])
        std = np.array([d.std_s if d.sample_count else 1.0 for d in dets])
        return dict(zip(ids, phi_many(now_s - last, mean, std).tolist(), strict=True))

    def reachable(self, now_s: float) -> dict[str, bool]:
        """Whom we hear directly now (phi below threshold), for our View: every member but
        those that left. DEAD, SUSPECT-and-silent and never-heard members are False."""
        return {n: self._hears(m, now_s) for n, m in sorted(self._members.items())
                if m.state is not MemberState.LEFT}

    def _hears(self, m: _Member, now_s: float) -> bool:
        return (m.state in (MemberState.ALIVE, MemberState.SUSPECT)
                and m.detector.last_heartbeat_s is not None and m.detector.is_available(now_s))

    # -- input ----------------------------------------------------------------------------------

    def on_frame(self, frame: Frame, now_s: float) -> list[Action]:
        """Dispatch any membership frame; Views and Payloads are not membership's (no-op)."""
        if isinstance(frame, Heartbeat):
            return self.on_heartbeat(frame, now_s)
        if isinstance(frame, Claim):
            return self.on_claim(frame, now_s)
        if isinstance(frame, PingReq):
            return self.on_ping_req(frame, now_s)
        if isinstance(frame, Ack):
            return self.on_ack(frame, now_s)
        return []

    def on_heartbeat(self, hb: Heartbeat, now_s: float) -> list[Action]:
        """A heartbeat arrived at ``now_s``."""
        if hb.node_id == self.node_id:
            return self._drop("own_frame")
        m = self._members.get(hb.node_id)
        if m is None:
            m = self._members[hb.node_id] = _Member(
                hb.node_id, hb.site, PhiAccrualDetector.from_config(self.config),
                incarnation=hb.incarnation, since_s=now_s)
        if hb.incarnation < m.incarnation:
            return self._drop("stale_heartbeat")
        m.site = hb.site
        if hb.incarnation != m.detector_incarnation:  # a restart or a refutation: fresh history
            m.detector.reset()
            m.detector_incarnation = hb.incarnation
        m.detector.heartbeat(now_s)
        actions: list[Action] = []
        if m.state is MemberState.UNKNOWN:
            self._transition(m, MemberTrigger.HEARD, now_s,
                             f"first heartbeat at incarnation {hb.incarnation}")
        elif hb.incarnation > m.incarnation:
            old = m.incarnation
            m.incarnation = hb.incarnation
            if m.state is not MemberState.ALIVE:
                self._transition(m, MemberTrigger.REFUTED, now_s,
                                 f"heartbeat at incarnation {hb.incarnation} > {old}")
        elif m.state in (MemberState.SUSPECT, MemberState.DEAD) and now_s - m.last_nudge_s >= \
                self.config.probe_timeout_s:
            # It talks at the incarnation we hold against it: tell it, so it refutes.
            m.last_nudge_s = now_s
            actions.append(Send(m.node_id, _CLAIM_FOR[m.state](m.node_id, m.incarnation,
                                                               self.node_id)))
        # We are a helper for this target: a fresh heartbeat vouches for it.
        for relay in self._relays.pop(m.node_id, []):
            self._relay_count -= 1
            actions.append(Send(relay.requester, Ack(self.node_id, m.node_id, relay.nonce,
                                                     m.incarnation, True)))
        nonce = self._probing.get(m.node_id)
        if nonce is not None and m.detector.is_available(now_s):
            self._probe_succeeded(self._probes[nonce], now_s, "direct heartbeat")
        return actions

    def on_claim(self, claim: Claim, now_s: float) -> list[Action]:
        """A Suspect / Alive / Dead / Left claim arrived (from its author or relayed)."""
        if claim.node == self.node_id:
            return self._claim_about_me(claim, now_s)
        m = self._members.get(claim.node)
        if m is None:
            return self._drop("unknown_node")
        if claim.incarnation < m.incarnation:
            return self._drop("stale_claim")
        relay: list[Action] = [Broadcast(claim)]
        why = f"{claim.KIND} by {claim.by} at incarnation {claim.incarnation}"
        if isinstance(claim, Alive):
            if claim.incarnation == m.incarnation:
                return self._drop("duplicate_claim")
            m.incarnation = claim.incarnation
            if m.state is not MemberState.ALIVE:
                self._transition(m, MemberTrigger.REFUTED, now_s, why)
            return relay
        s = m.suspicion
        if isinstance(claim, Suspect) and m.state is MemberState.SUSPECT and s is not None:
            if claim.incarnation == s.incarnation:
                if claim.by in s.confirmers:
                    return self._drop("duplicate_claim")
                s.confirmers.add(claim.by)  # an independent confirmation: not relayed
                return []
            m.incarnation = claim.incarnation  # suspected again, at a newer incarnation
            self._start_suspicion(m, claim.by, now_s)
            return relay
        trigger = {Suspect: MemberTrigger.SUSPECT_CLAIM, Dead: MemberTrigger.DEAD_CLAIM,
                   Left: MemberTrigger.LEFT_CLAIM}[type(claim)]
        if claim.incarnation == m.incarnation and m.state is MemberState(claim.KIND):
            return self._drop("duplicate_claim")
        if (m.state, trigger) not in TRANSITIONS:  # e.g. a Suspect about a DEAD member
            self.dropped[f"ignored:{trigger}@{m.state}"] += 1
            return []
        m.incarnation = claim.incarnation
        self._transition(m, trigger, now_s, why)
        if trigger is MemberTrigger.SUSPECT_CLAIM:
            self._start_suspicion(m, claim.by, now_s)
        return relay

    def on_ping_req(self, req: PingReq, now_s: float) -> list[Action]:
        """``req.by`` asks us to vouch for ``req.target``."""
        if req.by == self.node_id:
            return self._drop("own_frame")
        if req.target == self.node_id:
            return [Send(req.by, Ack(self.node_id, self.node_id, req.nonce, self._incarnation,
                                     True))]
        m = self._members.get(req.target)
        if m is None or m.state in (MemberState.DEAD, MemberState.LEFT):
            return [Send(req.by, Ack(self.node_id, req.target, req.nonce,
                                     m.incarnation if m else 0, False))]
        last = m.detector.last_heartbeat_s
        if last is not None and now_s - last <= self.config.heartbeat_interval_s:
            return [Send(req.by, Ack(self.node_id, m.node_id, req.nonce, m.incarnation, True))]
        if self._relay_count >= self.MAX_RELAYS:
            return self._drop("relay_overflow")
        self._relays.setdefault(m.node_id, []).append(
            _Relay(req.by, req.nonce, now_s + 0.8 * self.config.probe_timeout_s))
        self._relay_count += 1
        return []

    def on_ack(self, ack: Ack, now_s: float) -> list[Action]:
        """A helper's answer to one of our PingReqs."""
        probe = self._probes.get(ack.nonce)
        if probe is None:
            return self._drop("unknown_nonce")  # late, replayed, or never ours
        if ack.by not in probe.helpers or ack.target != probe.target:
            return self._drop("unexpected_ack")
        probe.answered.add(ack.by)
        if ack.ok:
            self._probe_succeeded(probe, now_s, f"{ack.by} vouched for it")
        return []

    def leave(self, now_s: float) -> list[Action]:
        """Leave on purpose: announce it; from now on ``tick`` sends nothing."""
        if self._left:
            return []
        self._left = True
        return [Broadcast(Left(self.node_id, self._incarnation, self.node_id))]

    # -- time -----------------------------------------------------------------------------------

    def tick(self, now_s: float) -> list[Action]:
        """Advance every timer to ``now_s``; returns what to send."""
        if self._left:
            return []
        actions: list[Action] = []
        cfg = self.config
        reach = self.reachable(now_s)
        digest = view_digest(reach)
        if now_s >= self._next_heartbeat_s:
            self._hb_seq += 1
            actions.append(Broadcast(Heartbeat(self.node_id, self.site, self._incarnation,
                                               self._hb_seq, now_s, digest)))
            self._next_heartbeat_s += cfg.heartbeat_interval_s
            if self._next_heartbeat_s <= now_s:  # fell behind by more than an interval
                self._next_heartbeat_s = now_s + cfg.heartbeat_interval_s
        # A changed view goes out at once, but at most every half heartbeat interval, so a
        # peer whose phi hovers at the threshold cannot make us flood Views.
        changed = digest != self._view_digest and \
            now_s - self._last_view_s >= cfg.heartbeat_interval_s / 2
        if changed or now_s >= self._next_view_s:
            self._view_seq += 1
            actions.append(Broadcast(View(self.node_id, self._incarnation, self._view_seq,
                                          reach, digest)))
            self._view_digest = digest
            self._last_view_s = now_s
            self._next_view_s = now_s + cfg.gossip_interval_s
        for m in list(self._members.values()):
            if self._should_probe(m, now_s):
                actions.extend(self._start_probe(m, now_s))
        for probe in [p for p in self._probes.values() if now_s >= p.deadline_s]:
            actions.extend(self._probe_failed(probe, now_s))
        for target, relays in list(self._relays.items()):
            keep = []
            for relay in relays:
                if now_s >= relay.deadline_s:
                    inc = self._members[target].incarnation if target in self._members else 0
                    actions.append(Send(relay.requester,
                                        Ack(self.node_id, target, relay.nonce, inc, False)))
                    self._relay_count -= 1
                else:
                    keep.append(relay)
            if keep:
                self._relays[target] = keep
            else:
                del self._relays[target]
        for m in list(self._members.values()):
            s = m.suspicion
            if m.state is MemberState.SUSPECT and s is not None and now_s >= s.deadline_s(cfg):
                confirmations = len(s.confirmers - {s.first})
                self._transition(m, MemberTrigger.SUSPICION_EXPIRED, now_s,
                                 f"suspected for {now_s - s.started_s:.3f} s at incarnation "
                                 f"{m.incarnation} ({confirmations} confirmations), "
                                 "not refuted")
                actions.append(Broadcast(Dead(m.node_id, m.incarnation, self.node_id)))
            elif m.state in (MemberState.DEAD, MemberState.LEFT) and \
                    now_s - m.since_s >= cfg.dead_node_reap_s:
                self._transition(m, MemberTrigger.REAPED, now_s,
                                 f"{m.state} for {now_s - m.since_s:.1f} s")
                del self._members[m.node_id]
        if self._local_health and now_s - self._health_changed_s >= cfg.suspicion_max_s:
            self._local_health -= 1
            self._health_changed_s = now_s
        return actions

    # -- probing --------------------------------------------------------------------------------

    def _should_probe(self, m: _Member, now_s: float) -> bool:
        if m.state not in (MemberState.ALIVE, MemberState.SUSPECT) or m.node_id in self._probing:
            return False
        if m.suspicion is not None and self.node_id in m.suspicion.confirmers:
            return False  # we already confirmed this suspicion
        return (now_s >= m.next_probe_s and m.detector.last_heartbeat_s is not None
                and not m.detector.is_available(now_s))

    def _start_probe(self, m: _Member, now_s: float) -> list[Action]:
        candidates = sorted(n for n, p in self._members.items() if n != m.node_id
                            and p.state is MemberState.ALIVE and self._hears(p, now_s))
        k = min(self.config.indirect_probes, len(candidates))
        helpers = tuple(self._rng.sample(candidates, k)) if k else ()
        nonce = self._next_nonce
        self._next_nonce += 1
        timeout = self.config.probe_timeout_s * (1 + self._local_health)
        self._probes[nonce] = _Probe(m.node_id, m.incarnation, nonce, now_s + timeout, helpers)
        self._probing[m.node_id] = nonce
        return [Send(h, PingReq(self.node_id, m.node_id, nonce)) for h in helpers]

    def _end_probe(self, probe: _Probe, now_s: float) -> _Member | None:
        del self._probes[probe.nonce]
        del self._probing[probe.target]
        m = self._members.get(probe.target)
        if m is not None:
            m.next_probe_s = now_s + self.config.probe_timeout_s
        return m

    def _probe_succeeded(self, probe: _Probe, now_s: float, why: str) -> None:
        log.debug("%s: probe of %s succeeded: %s", self.node_id, probe.target, why)
        self._end_probe(probe, now_s)
        self._health(-1, now_s)

    def _probe_failed(self, probe: _Probe, now_s: float) -> list[Action]:
        m = self._end_probe(probe, now_s)
        silent = [h for h in probe.helpers if h not in probe.answered]
        if silent:
            self._health(+1, now_s)   # a helper we hear did not answer: likely our problem
        elif probe.helpers:
            self._health(-1, now_s)   # every helper answered "cannot hear it": we are fine
        if m is None or m.incarnation != probe.incarnation:
            return []
        if m.state is MemberState.ALIVE:
            last = m.detector.last_heartbeat_s or now_s
            why = (f"silent for {now_s - last:.3f} s (phi {m.detector.phi(now_s):.1f}); "
                   f"{len(probe.helpers)} helpers, none heard it")
            self._transition(m, MemberTrigger.PROBE_FAILED, now_s, why)
            self._start_suspicion(m, self.node_id, now_s)
        elif m.state is MemberState.SUSPECT and m.suspicion is not None:
            m.suspicion.confirmers.add(self.node_id)  # our own, independent confirmation
        else:
            return []
        return [Broadcast(Suspect(m.node_id, m.incarnation, self.node_id))]

    def _start_suspicion(self, m: _Member, first: str, now_s: float) -> None:
        others = sum(1 for n, p in self._members.items()
                     if p.state is MemberState.ALIVE and n not in (m.node_id, first))
        if first != self.node_id:
            others += 1  # we can confirm too
        m.suspicion = _Suspicion(m.incarnation, now_s, first, {first},
                                 min(self.config.suspicion_confirmations, others),
                                 1.0 + self._local_health)

    # -- claims about ourselves -----------------------------------------------------------------

    def _claim_about_me(self, claim: Claim, now_s: float) -> list[Action]:
        if self._left:
            return self._drop("claim_after_leave")
        if claim.incarnation < self._incarnation:
            return self._drop("stale_claim")
        if isinstance(claim, Alive) and claim.by == self.node_id and \
                claim.incarnation == self._incarnation:
            return self._drop("own_frame")
        # Suspect / Dead / Left by someone else, or an Alive from a past life at an incarnation
        # we have not reached: announce a higher incarnation.
        self._incarnation = claim.incarnation + 1
        if not isinstance(claim, Alive):
            self._health(+1, now_s)
        log.info("%s: refuting %s by %s, incarnation now %d", self.node_id, claim.KIND,
                 claim.by, self._incarnation)
        self._next_heartbeat_s = now_s  # heartbeat at the new incarnation on the next tick
        return [Broadcast(Alive(self.node_id, self._incarnation, self.node_id))]

    # -- the one place state changes ------------------------------------------------------------

    def _transition(self, m: _Member, trigger: MemberTrigger, now_s: float, reason: str) -> bool:
        to = TRANSITIONS.get((m.state, trigger))
        if to is None:
            self.dropped[f"ignored:{trigger}@{m.state}"] += 1
            return False
        self.history.append(Transition(now_s, m.node_id, m.state, to, trigger, reason))
        log.debug("%s: %s %s -> %s (%s)", self.node_id, m.node_id, m.state, to, reason)
        m.state = to
        m.since_s = now_s
        if to is not MemberState.SUSPECT:
            m.suspicion = None
        self.events.put(MembershipEvent(EVENT_KINDS[to], m.node_id, m.site, m.incarnation,
                                        now_s, reason))
        return True

    def _health(self, delta: int, now_s: float) -> None:
        new = min(self.config.max_local_health, max(0, self._local_health + delta))
        if new != self._local_health:
            self._local_health = new
        if delta > 0:
            self._health_changed_s = now_s

    def _drop(self, reason: str) -> list[Action]:
        self.dropped[reason] += 1
        return []
