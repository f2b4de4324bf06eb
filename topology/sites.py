"""Site-level failover roles over the mesh: for each *resource* one site is active, the others
stand by. Generic (a resource is any name, e.g. a venue); the cluster layer says what
activating means through callbacks.

:class:`SiteRoles` runs on one agent per site (the site's *controller*). It hosts

* this site's :class:`~topology.lease.LeaseVoter` (node id = voter id), promises in
  ``promise_dir`` (:class:`~topology.lease.FilePromiseStore`), answering ``lease`` payloads like
  the witness (:mod:`topology.witness`);
* one :class:`~topology.lease.LeaseHolder` per resource, holder id ``"{site}/{node}#{inc}"``
  (unique per agent incarnation), whose ``wanted`` flag follows the campaign rule;
* a beacon (payload kind :data:`SITE_KIND`) sent to the other voters every
  ``renew_interval_s`` and at once on every activation, renewal and deactivation: per resource
  the holder id, state, epoch and the holder's own view of its lease's remaining time;
* one :class:`~topology.sites_log.ReplicatedLog` per resource opened with :meth:`open_log`
  (payload kind :data:`REPL_KIND`).

Campaign rule (:func:`~topology.sites_campaign.campaign_decision`, evaluated every tick for
every resource; the full list is in :mod:`topology.sites_campaign`): a standby campaigns when a
handoff names it, or when it is in the majority (own voter + voters membership holds ALIVE), no
other site's beacon announces a live lease (the announced ``lease_left_s``, widened by the drift
bound), and it has listened long enough (``preferred_listen_s`` for the preferred site, else
``standby_listen_s``); never within ``yield_s`` of handing the resource away.

So the preferred site takes the role at start; a standby takes over when the active site's
lease, as it last announced it, is over (that presumption ends ~one lease after its last renewal,
about when the voters' grants lapse, so the first campaign usually wins); nobody fails back
automatically (the same presumption keeps a healed preferred site quiet while another is
active): failback is
:meth:`SiteRoles.transfer`. Safety never rests on this rule: two holders can only act at once
if a majority of voters granted both, which :mod:`topology.lease` rules out (its docstring has
the argument); a campaign that the rule gets wrong is merely refused.

The site layer adds no state table of its own: the role of a resource *is* its holder's state
(:data:`topology.lease.TRANSITIONS`, every change recorded with its reason); what this module
adds is the campaign decision (recorded whenever it flips, with its reason) and the callbacks.

Callbacks, called from one delivery thread, in order: ``on_activate(resource, epoch,
until_s)`` when the holder becomes ACTIVE, ``on_renew(resource, epoch, until_s)`` on each
renewal, ``on_deactivate(resource, epoch, reason)`` when it stops (window closed, fenced,
transferred, stopped). ``until_s`` is the end of the acting window on the roles' clock. The
order path checks :meth:`SiteRoles.may_act` / :meth:`SiteRoles.epoch` synchronously; they turn
False at the window's end even if no tick ran, and the ticker wakes at that instant to deliver
``on_deactivate`` inside the ``stop_margin_s`` that remains before the lease ends.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topology.agent import MeshAgent
from topology.agent_types import AgentStoppedError, UnknownPeerError
from topology.clock import Clock
from topology.frames import FrameError
from topology.lease import (
    FilePromiseStore,
    HolderState,
    LeaseConfig,
    LeaseHandoff,
    LeaseHolder,
    LeaseMessageError,
    LeaseRelease,
    LeaseReply,
    LeaseRequest,
    LeaseStateChange,
    LeaseVoter,
    Outgoing,
    decode_lease_message,
)
from topology.membership import MemberState
from topology.replication import ReplicationConfig, decode_replication_message
from topology.sites_campaign import (
    ActiveElsewhere,
    Campaign,
    CampaignTiming,
    SiteBeacon,
    TransferResult,
    campaign_decision,
)
from topology.sites_log import AppendResult, ReplicatedLog
from topology.witness import LEASE_KIND

__all__ = [
    "REPL_KIND", "SITE_KIND", "ActiveElsewhere", "AppendResult", "Campaign", "CampaignTiming",
    "ReplicatedLog", "SiteBeacon", "SiteRoles", "TransferResult", "campaign_decision",
]  # the campaign rule and messages live in topology.sites_campaign, the log in sites_log

log = logging.getLogger(__name__)

#: Payload kind of the site beacons.
SITE_KIND = "site"
#: Payload kind of journal replication (batches and acks, each body tagged with its resource).
REPL_KIND = "repl"

_STOP = object()


# --------------------------------------------------------------------------------------------
# Per-resource and per-peer state
# --------------------------------------------------------------------------------------------


@dataclass
class _Role:
    resource: str
    holder: LeaseHolder
    preferred_site: str | None
    campaign: Campaign = Campaign(False, "not started")
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    pending: list[LeaseStateChange] = field(default_factory=list)
    told_epoch: int | None = None     # the epoch on_activate announced (None: not active)
    told_until_s: float = -math.inf   # the window end last announced
    elsewhere: dict[str, ActiveElsewhere] = field(default_factory=dict)  # by site
    known_epoch: int = 0              # highest epoch known granted (ours, ACTIVE beacons)
    handoff_until_s: float = -math.inf
    handoff_from: str = ""
    yielded_until_s: float = -math.inf
    yielded_to: str = ""


@dataclass
class _PeerSite:
    site: str
    node: str
    heard_s: float
    holders: dict[str, tuple[str, HolderState, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# SiteRoles
# --------------------------------------------------------------------------------------------


class SiteRoles:
    """The failover roles of one site, on its controller agent. See the module docstring.

    ``voters``: node ids of every voter agent (each site's controller, this one included, plus
    an optional witness); all holders and voters must share ``config``. ``preferred``: resource
    -> the site that should be active when all is well. ``clock``: default the agent's.

    Raises (constructor):
        ValueError: a field is invalid (the message names it and its value).
        topology.lease.PromiseStoreError: this voter's promise file is unreadable.
    """

    HISTORY_SHOWN = 20
    ERROR_LOG_INTERVAL_S = 5.0

    def __init__(self, agent: MeshAgent, site: str, resources: Sequence[str],
                 voters: Sequence[str], config: LeaseConfig, promise_dir: Path, *,
                 preferred: Mapping[str, str] | None = None, clock: Clock | None = None,
                 on_activate: Callable[[str, int, float], None] | None = None,
                 on_renew: Callable[[str, int, float], None] | None = None,
                 on_deactivate: Callable[[str, int, str], None] | None = None) -> None:
        resources, voters = list(resources), list(voters)
        preferred = dict(preferred or {})
        if site != agent.site:
            raise ValueError(f"site = {site!r}: must be the agent's site {agent.site!r}")
        if not resources or len(set(resources)) != len(resources) or not all(
                isinstance(r, str) and r for r in resources):
            raise ValueError(f"resources = {resources!r}: must be distinct non-empty names")
        if len(set(voters)) != len(voters) or agent.node_id not in voters:
            raise ValueError(f"voters = {voters!r}: must be distinct and include this agent "
                             f"{agent.node_id!r} (it hosts the site's voter)")
        unknown = sorted(set(preferred) - set(resources))
        if unknown or not all(isinstance(s, str) and s for s in preferred.values()):
            raise ValueError(f"preferred = {preferred!r}: keys must be resources ({unknown} "
                             f"are not), values site names")
        if not isinstance(config, LeaseConfig):
            raise ValueError(f"config = {config!r:.80}: must be a LeaseConfig")
        self.agent = agent
        self.site = site
        self.node_id = agent.node_id
        self.voters = tuple(voters)
        self.config = config
        self.timing = CampaignTiming.from_lease(config)
        self.clock: Clock = clock if clock is not None else agent.clock
        self.holder_id = f"{site}/{agent.node_id}#{agent.incarnation}"
        self._callbacks = {"activate": on_activate, "renew": on_renew,
                           "deactivate": on_deactivate}
        promise_dir = Path(promise_dir)
        promise_dir.mkdir(parents=True, exist_ok=True)
        self.promise_path = promise_dir / f"{agent.node_id}.promises.json"
        self._lock = threading.RLock()
        self._io_lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.voter = LeaseVoter(self.node_id, config, FilePromiseStore(self.promise_path),
                                self.clock.now_s())
        self._roles: dict[str, _Role] = {}
        for r in resources:
            holder = LeaseHolder(r, self.holder_id, self.voters, config, wanted=False,
                                 on_change=functools.partial(self._on_holder_change, r))
            self._roles[r] = _Role(r, holder, preferred.get(r))
        self._peers: dict[str, _PeerSite] = {}
        self._holder_nodes: dict[str, str] = {}
        self._logs: dict[str, ReplicatedLog] = {}
        self._listening_since_s: float | None = None
        self._voters_reached = 1
        self._next_beacon_s = -math.inf
        self._beacon_due = False
        self._started = False
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._error_logged: dict[str, float] = {}
        agent.on_payload(LEASE_KIND, self._on_lease_payload)
        agent.on_payload(SITE_KIND, self._on_beacon_payload)
        agent.on_payload(REPL_KIND, self._on_repl_payload)

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ticker and the callback delivery thread (idempotent)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._threads = [
                threading.Thread(target=self._run, name=f"sites-{self.node_id}", daemon=True),
                threading.Thread(target=self._deliver, name=f"sites-{self.node_id}-callbacks",
                                 daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, *, release: bool = True, timeout_s: float = 5.0) -> None:
        """Stop ticking (idempotent). ``release``: give up every lease held (``on_deactivate``
        with reason ``stopped``), so another site need not wait for it to lapse. After this the
        voter answers nothing (as if crashed; its promises stay on disk)."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            if release and self._started:
                now = self.clock.now_s()
                for role in self._roles.values():
                    self._route(role.holder.release(now, "stopped"), now)
                    self._after(role, now)
        self._wake.set()
        self._events.put(_STOP)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(timeout_s)

    # -- what the order path asks ---------------------------------------------------------------

    def may_act(self, resource: str) -> bool:
        """Whether this site may act for ``resource`` now. Lock-free (never waits on a voter's
        fsync): it reads the holder's state and window end, which the holder writes in an order
        that never shows an ACTIVE state with a stale window as open."""
        return self._role(resource).holder.may_act(self.clock.now_s())

    def epoch(self, resource: str) -> int | None:
        """The epoch to stamp on an action for ``resource`` now, or None if it may not act."""
        return self._role(resource).holder.acting_epoch(self.clock.now_s())

    def known_epoch(self, resource: str) -> int:
        """The highest epoch this site knows was granted for ``resource`` (its own, or one a
        beacon announced as ACTIVE): replication from any lower epoch is fenced."""
        with self._lock:
            return self._role(resource).known_epoch

    def peer_nodes(self) -> dict[str, str]:
        """Controllers of other sites heard from (node -> site)."""
        with self._lock:
            return {n: p.site for n, p in self._peers.items()}

    # -- failback and logs ----------------------------------------------------------------------

    def transfer(self, resource: str, to_site: str) -> TransferResult:
        """Hand ``resource``'s lease to ``to_site`` (failback / planned move): this site stops at
        once (``may_act`` False, ``on_deactivate``), the voters are told to reserve the lease
        for the target's holder, which gets a handoff and campaigns. Refusals are data.

        Raises:
            KeyError: ``resource`` is not one of this site's resources.
        """
        with self._lock:
            role = self._role(resource)
            now = self.clock.now_s()

            def refused(reason: str) -> TransferResult:
                self._count("transfer_refused")
                return TransferResult(False, resource, to_site, reason)
            if to_site == self.site:
                return refused("to_site is this site")
            if not role.holder.may_act(now):
                return refused(f"not active here (holder {role.holder.state.value})")
            target = next((p for p in self._peers.values() if p.site == to_site), None)
            if target is None or resource not in target.holders:
                return refused(f"no controller of site {to_site!r} heard (known: "
                               f"{sorted({p.site for p in self._peers.values()})})")
            age_s = now - target.heard_s
            to_holder, state, _ = target.holders[resource]
            if age_s > self.timing.target_fresh_s:
                return refused(f"site {to_site!r} last heard {age_s:.3g} s ago (> "
                               f"{self.timing.target_fresh_s:.3g} s)")
            if state is not HolderState.STANDBY:
                return refused(f"site {to_site!r} holder {to_holder} is {state.value}")
            epoch = role.holder.epoch
            self._holder_nodes[to_holder] = target.node
            out = role.holder.transfer(to_holder, now)
            role.yielded_until_s, role.yielded_to = now + self.timing.yield_s, to_site
            self._route(out, now)
            self._after(role, now)
            self._count("transfers")
        self._wake.set()
        return TransferResult(True, resource, to_site, "released for the target", to_holder,
                              epoch)

    def open_log(self, resource: str, apply: Callable[[str, int, Any], None], *,
                 config: ReplicationConfig | None = None,
                 on_truncate: Callable[[str, int], None] | None = None,
                 next_seqs: Mapping[str, int] | None = None,
                 histories: Mapping[str, Sequence[tuple[int, int]]] | None = None,
                 ) -> ReplicatedLog:
        """The replicated journal of ``resource`` (one per resource; see
        :class:`~topology.sites_log.ReplicatedLog`).

        Raises:
            KeyError: unknown resource. ValueError: a log is already open for it.
        """
        self._role(resource)
        with self._lock:
            if resource in self._logs:
                raise ValueError(f"resource = {resource!r}: a log is already open")
            rlog = ReplicatedLog(self, resource, apply, config or ReplicationConfig(),
                                 wake=self._wake.set, on_truncate=on_truncate,
                                 next_seqs=next_seqs, histories=histories)
            self._logs[resource] = rlog
        return rlog

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """JSON-able: per resource the holder's state, epoch, window left, campaign decision,
        recent changes and decisions with reasons, presumed actives elsewhere, this voter's
        grant; peers heard; counters; the logs."""
        with self._lock:
            now = self.clock.now_s()
            resources = {}
            for r, role in self._roles.items():
                h = role.holder
                grant = self.voter.grant(r, now)
                resources[r] = {
                    "state": h.state.value, "epoch": h.epoch, "may_act": h.may_act(now),
                    "window_left_s": max(0.0, h.safe_until_s - now),
                    "lease_left_s": (max(0.0, h.lease_end_s - now)
                                     if h.state in (HolderState.ACTIVE, HolderState.DRAINING)
                                     else 0.0),
                    "highest_epoch_seen": h.highest_epoch_seen, "known_epoch": role.known_epoch,
                    "preferred_site": role.preferred_site,
                    "campaign": {"wanted": role.campaign.wanted, "reason": role.campaign.reason},
                    "changes": [c.to_dict() for c in list(h.history)[-self.HISTORY_SHOWN:]],
                    "decisions": list(role.decisions)[-self.HISTORY_SHOWN:],
                    "active_elsewhere": [
                        {"site": a.site, "node": a.node, "holder": a.holder, "epoch": a.epoch,
                         "presumed_for_s": a.until_s - now}
                        for a in role.elsewhere.values() if now < a.until_s],
                    "voter": {"grant": list(grant) if grant else None,
                              "highest_epoch": self.voter.highest_epoch(r)},
                }
            peers = {n: {"site": p.site, "heard_ago_s": now - p.heard_s,
                         "holders": {r: {"holder": hid, "state": s.value, "epoch": e}
                                     for r, (hid, s, e) in p.holders.items()}}
                     for n, p in self._peers.items()}
            base = {
                "site": self.site, "node_id": self.node_id, "holder_id": self.holder_id,
                "voters": list(self.voters), "voters_reached": self._voters_reached,
                "majority": len(self.voters) // 2 + 1,
                "listening_s": (None if self._listening_since_s is None
                                else now - self._listening_since_s),
                "promise_file": str(self.promise_path), "resources": resources,
                "peers": peers, "counters": self._counts(),
                "running": self._started and not self._stopping.is_set()}
            logs = dict(self._logs)
        base["logs"] = {r: rlog.status() for r, rlog in logs.items()}
        return base

    def __repr__(self) -> str:
        return (f"SiteRoles(site={self.site!r}, node={self.node_id!r}, "
                f"resources={sorted(self._roles)}, voters={list(self.voters)})")

    # -- the ticker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = self.clock.now_s()
            deadline_s = now + self.timing.tick_s
            try:
                deadline_s = min(deadline_s, self._tick(now))
            except Exception as exc:   # survive: may_act stays clock-bounded meanwhile
                self._record_error("tick", exc)
            for rlog in list(self._logs.values()):
                try:
                    self._send_repl(rlog.resource, rlog.tick(now))
                    due = rlog.next_deadline_s()
                    if due is not None:
                        deadline_s = min(deadline_s, due)
                except Exception as exc:
                    self._record_error("log_tick", exc)
            self._wake.wait(max(0.0, deadline_s - self.clock.now_s()))
            self._wake.clear()

    def _tick(self, now_s: float) -> float:
        """One pass: decisions, holder timers, beacons. Returns the next deadline."""
        reached = 1 + sum(self.agent.member_state(v) is MemberState.ALIVE
                          for v in self.voters if v != self.node_id)
        with self._lock:
            if self._stopping.is_set():
                return math.inf
            self._voters_reached = reached
            if 2 * reached > len(self.voters):
                if self._listening_since_s is None:
                    self._listening_since_s = now_s
            else:
                self._listening_since_s = None
            deadline_s = math.inf
            for role in self._roles.values():
                self._decide(role, now_s)
                self._route(role.holder.tick(now_s), now_s)
                self._after(role, now_s)
                h = role.holder
                for t in (h.safe_until_s if h.state is HolderState.ACTIVE else math.inf,
                          h.lease_end_s if h.state is HolderState.DRAINING else math.inf,
                          *(a.until_s for a in role.elsewhere.values())):
                    if t > now_s:
                        deadline_s = min(deadline_s, t)
            if self._beacon_due or now_s >= self._next_beacon_s:
                self._send_beacon(now_s)
            return deadline_s

    def _decide(self, role: _Role, now_s: float) -> None:
        for s, a in list(role.elsewhere.items()):
            if now_s >= a.until_s:
                del role.elsewhere[s]
        c = campaign_decision(
            now_s, preferred=role.preferred_site == self.site,
            voters_reached=self._voters_reached, voters=len(self.voters),
            listening_since_s=self._listening_since_s,
            active_elsewhere=role.elsewhere.values(), handoff_until_s=role.handoff_until_s,
            handoff_from=role.handoff_from, yielded_until_s=role.yielded_until_s,
            yielded_to=role.yielded_to, timing=self.timing)
        if c.wanted != role.campaign.wanted:
            role.decisions.append({"ts_s": now_s, "wanted": c.wanted, "reason": c.reason})
            log.info("%s: %s campaign %s: %s", self.node_id, role.resource,
                     "on" if c.wanted else "off", c.reason)
        role.campaign = c
        if c.wanted and not role.holder.wanted:
            role.holder.acquire(now_s)
        elif not c.wanted:
            # Only a STANDBY holder reads ``wanted``: an ACTIVE one keeps renewing until it is
            # refused or its window closes; this just keeps it from campaigning again.
            role.holder.wanted = False

    # -- holder changes -> callbacks ------------------------------------------------------------

    def _on_holder_change(self, resource: str, change: LeaseStateChange) -> None:
        self._roles[resource].pending.append(change)   # called inside holder methods (locked)

    def _after(self, role: _Role, now_s: float) -> None:
        """Turn the holder's recorded changes (and renewals) into callbacks and beacons."""
        h = role.holder
        changes, role.pending = role.pending, []
        for c in changes:
            log.info("%s: %s %s -> %s (%s): %s", self.node_id, role.resource,
                     c.from_state.value, c.to_state.value, c.trigger.value, c.reason)
            if c.to_state is HolderState.ACTIVE:
                role.told_epoch, role.told_until_s = c.epoch, h.safe_until_s
                role.known_epoch = max(role.known_epoch, c.epoch)
                self._emit("activate", role.resource, c.epoch, h.safe_until_s)
                self._beacon_due = True
            elif c.from_state is HolderState.ACTIVE and role.told_epoch is not None:
                self._emit("deactivate", role.resource, role.told_epoch,
                           f"{c.trigger.value}: {c.reason}")
                role.told_epoch = None
                self._beacon_due = True
        if (role.told_epoch is not None and h.state is HolderState.ACTIVE
                and h.safe_until_s > role.told_until_s):
            role.told_until_s = h.safe_until_s
            self._emit("renew", role.resource, role.told_epoch, h.safe_until_s)
            self._beacon_due = True
        if self._beacon_due:
            self._send_beacon(now_s)

    def _emit(self, kind: str, *args: Any) -> None:
        self._count(kind)
        self._events.put((kind, args))

    def _deliver(self) -> None:
        while True:
            item = self._events.get()
            if item is _STOP:
                return
            kind, args = item  # type: ignore[misc]
            fn = self._callbacks[kind]
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as exc:
                self._record_error(f"on_{kind}", exc)

    # -- routing --------------------------------------------------------------------------------

    def _route(self, out: Iterable[Outgoing], now_s: float) -> None:
        """Deliver lease messages: to this node's own voter / holder in place, else as payloads
        (a handoff goes to the node whose beacon named the successor). Called locked."""
        work = deque(out)
        while work:
            o = work.popleft()
            msg = o.message
            if isinstance(msg, LeaseHandoff):
                node = self._holder_nodes.get(o.to)
                if node is None:
                    self._count("handoff_unroutable")
                    continue
                self._send(node, LEASE_KIND, msg.to_body())
            elif o.to != self.node_id:
                self._send(o.to, LEASE_KIND, msg.to_body())
            elif isinstance(msg, LeaseRequest | LeaseRelease):
                reply = self.voter.handle(msg, now_s)
                if reply is not None:
                    work.append(Outgoing(self.node_id, reply))
            elif isinstance(msg, LeaseReply):
                role = self._roles.get(msg.resource)
                if role is not None:
                    role.holder.handle(msg, now_s)

    def _send(self, node: str, kind: str, body: Mapping[str, Any]) -> None:
        try:
            self.agent.send_payload(node, kind, body)
        except (AgentStoppedError, UnknownPeerError, FrameError) as exc:
            self._count(f"send_failed_{type(exc).__name__}")
            self._record_error(f"send_{kind}", exc, level=logging.WARNING)
        else:
            self._count(f"sent_{kind}")

    def _send_beacon(self, now_s: float) -> None:
        self._beacon_due = False
        self._next_beacon_s = now_s + self.config.renew_interval_s
        entries = []
        for r, role in self._roles.items():
            h = role.holder
            left = max(0.0, h.lease_end_s - now_s) if h.may_act(now_s) else 0.0
            entries.append([r, self.holder_id, h.state.value, h.epoch, left])
        body = SiteBeacon(self.site, self.node_id, tuple(entries)).to_body()
        for v in self.voters:
            if v != self.node_id:
                self._send(v, SITE_KIND, body)
        for n in self._peers:
            if n not in self.voters:
                self._send(n, SITE_KIND, body)

    def _send_repl(self, resource: str, out: Iterable[Outgoing]) -> None:
        for o in out:
            self._send(o.to, REPL_KIND, {**o.message.to_body(), "resource": resource})

    # -- inbound --------------------------------------------------------------------------------

    def _on_lease_payload(self, from_node: str, body: Mapping[str, Any]) -> None:
        if self._stopping.is_set():
            return
        try:
            msg = decode_lease_message(body)
        except LeaseMessageError as exc:
            self._malformed(LEASE_KIND, from_node, exc)
            return
        with self._lock:
            now = self.clock.now_s()
            if isinstance(msg, LeaseRequest | LeaseRelease):
                reply = self.voter.handle(msg, now)
                if reply is not None:
                    self._route([Outgoing(from_node, reply)], now)
                return
            role = self._roles.get(msg.resource)
            if role is None or not self._started:
                self._count("lease_ignored")
                return
            if isinstance(msg, LeaseHandoff) and msg.to_holder == self.holder_id:
                role.handoff_until_s = now + self.timing.handoff_s
                role.handoff_from = msg.from_holder
                role.yielded_until_s = -math.inf
                role.elsewhere.clear()   # the old holder released: presume it no longer
                self._decide(role, now)
            role.holder.handle(msg, now)
            self._route(role.holder.tick(now), now)
            self._after(role, now)

    def _on_beacon_payload(self, from_node: str, body: Mapping[str, Any]) -> None:
        if self._stopping.is_set():
            return
        try:
            beacon = SiteBeacon.from_body(body)
            entries = beacon.entries()
        except LeaseMessageError as exc:
            self._malformed(SITE_KIND, from_node, exc)
            return
        if beacon.node != from_node or beacon.site == self.site:
            self._count("beacon_refused")
            self._record_error("beacon", ValueError(
                f"beacon from {from_node} claims node {beacon.node!r} site {beacon.site!r} "
                f"(this site is {self.site!r})"), level=logging.WARNING)
            return
        with self._lock:
            now = self.clock.now_s()
            peer = self._peers.setdefault(from_node, _PeerSite(beacon.site, from_node, now))
            peer.site, peer.heard_s = beacon.site, now
            self._count("beacons_received")
            for resource, holder_id, state, epoch, left_s in entries:
                peer.holders[resource] = (holder_id, state, epoch)
                self._holder_nodes[holder_id] = from_node
                role = self._roles.get(resource)
                if role is None:
                    continue
                if state is HolderState.ACTIVE and left_s > 0:
                    role.known_epoch = max(role.known_epoch, epoch)
                    # campaign above it when the time comes (a lower epoch would be refused)
                    role.holder.highest_epoch_seen = max(role.holder.highest_epoch_seen, epoch)
                    role.elsewhere[beacon.site] = ActiveElsewhere(
                        beacon.site, from_node, holder_id, epoch,
                        now + left_s + self.timing.presume_slack_s)
                elif state is HolderState.STANDBY and (
                        (a := role.elsewhere.get(beacon.site)) is not None
                        and (a.holder, a.epoch) == (holder_id, epoch)):
                    # it released (transfer, stop) or its lease lapsed: nothing left to wait on
                    del role.elsewhere[beacon.site]

    def _on_repl_payload(self, from_node: str, body: Mapping[str, Any]) -> None:
        if self._stopping.is_set():
            return
        resource = body.get("resource") if isinstance(body, Mapping) else None
        rlog = self._logs.get(resource) if isinstance(resource, str) else None
        if rlog is None:
            self._count("repl_no_log")
            return
        try:
            msg = decode_replication_message({k: v for k, v in body.items() if k != "resource"})
            out = rlog.handle(from_node, msg, self.clock.now_s())
        except LeaseMessageError as exc:
            self._malformed(REPL_KIND, from_node, exc)
            return
        self._send_repl(resource, out)  # type: ignore[arg-type]

    # -- helpers --------------------------------------------------------------------------------

    def _role(self, resource: str) -> _Role:
        try:
            return self._roles[resource]
        except KeyError:
            raise KeyError(f"resource = {resource!r}: not one of {sorted(self._roles)}") from None

    def _malformed(self, kind: str, from_node: str, exc: Exception) -> None:
        self._count(f"malformed_{kind}")
        self._record_error(f"malformed_{kind}", ValueError(f"from {from_node}: {exc}"),
                           level=logging.WARNING)

    def _counts(self) -> dict[str, int]:
        with self._io_lock:
            return dict(self.counters)

    def _count(self, key: str) -> None:
        with self._io_lock:
            self.counters[key] += 1

    def _record_error(self, stage: str, exc: Exception, level: int = logging.ERROR) -> None:
        with self._io_lock:
            self.counters[f"error_{stage}"] += 1
            now = time.monotonic()
            if now - self._error_logged.get(stage, -math.inf) < self.ERROR_LOG_INTERVAL_S:
                return
            self._error_logged[stage] = now
        log.log(level, "%s: %s failed: %s: %s", self.node_id, stage, type(exc).__name__, exc,
                exc_info=exc if level >= logging.ERROR else None)
