"""Faults that really happen, each verified by its effect, with an undo where one exists.

Every fault kind is a :class:`FaultKind` in :data:`FAULT_KINDS`: the targets it takes
(``among``), whether it acts on each selected target alone or on the selection as one group,
its parameters (a frozen pydantic model: a bad value names the field) and its injector.
:func:`inject` acts through a :class:`~cluster.chaos.context.ChaosContext`, waits for the
effect to show (or raises :class:`FaultNotVerified` with the last thing seen) and returns an
:class:`Injected`: the :class:`FaultRecord` of what was done, the undo (None when there is
none; it verifies too) and a recovery probe (the target is back) for the runner's watch.

=====================  =================  ==============================  =======================  =================================
kind                   among              verified by                     undo                     recovered when
=====================  =================  ==============================  =======================  =================================
kill-actor             actors             the worker pid is gone          -                        running again under a new pid
kill-supervisor        supervisors        its pid is gone                 -                        running again under a new pid
kill-node              nodes              every process of the node gone  restart (``restart``)    its children run again (new pids)
pause                  actors, superv.    the process is in state T       SIGCONT (not T)          running and not stopped
pause-node             nodes              all its processes in state T    SIGCONT                  its children running, none stopped
partition              nodes, sites       receivers count dropped msgs    heal                     all members see each other alive
partition-one-way      nodes, sites       (the selection's sends dropped) heal                     as partition
partition-bridge       nodes, sites       (the rest split in two halves   heal                     as partition
                                          that reach only the selection)
link-loss              nodes, sites       drops counted (``probability``) heal                     as partition
link-delay             nodes, sites       delayed frames counted          heal                     as partition
clock-skew             nodes              the node's clock reads ahead    clock set back           the offset is back
venue-*                venues             the simulator reports it        the fields cleared       the simulator reports it clear
corrupt-journal        streams, actors    the store refuses that record   the bytes written back   the record reads again
=====================  =================  ==============================  =======================  =================================

Venue kinds: ``venue-outage``, ``venue-stale-feed``, ``venue-price-spike`` (``pct``,
``ticks``, ``instrument``), ``venue-reject-storm`` / ``venue-md-drop`` / ``venue-md-duplicate``
/ ``venue-md-reorder`` (``probability``), ``venue-withdrawals-suspended``, ``venue-latency``
(``latency_s``). Link faults compose: each is a rule of a :class:`LinkModel`, an undo removes
only its own rule. Signals go to this machine's PIDs (never to this process or PID 1).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .context import ChaosContext, ChaosError, ProcessInfo, require_non_production
from .links import LinkFault

VERIFY_TIMEOUT_S = 10.0
POLL_S = 0.02
#: A skew reading may differ from the offset by the call's half round trip plus this.
SKEW_TOLERANCE_S = 0.05
MIN_SKEW_S = 0.1
#: Bytes before an entry's payload (supervisors.journal.base: magic, version, kind, seq,
#: epoch, length) and the crc after it.
ENTRY_HEADER_BYTES = 24
ENTRY_CRC_BYTES = 4


class FaultNotVerified(ChaosError):
    """The fault was applied but its effect did not show within the verify timeout."""

    def __init__(self, kind: str, target: str, what: str, last: object) -> None:
        self.kind, self.target, self.what, self.last = kind, target, what, last
        super().__init__(f"{kind} on {target}: {what} not seen; last seen {last!r}")


@dataclass(frozen=True)
class FaultRecord:
    """What was done (``action``: ``inject`` or ``undo``), to what, when (wall seconds), and
    the evidence that it took effect."""

    kind: str
    target: str
    action: str
    wall_s: float
    pids: tuple[int, ...] = ()
    nodes: tuple[str, ...] = ()
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "action": self.action,
                "wall_s": self.wall_s, "pids": list(self.pids), "nodes": list(self.nodes),
                "evidence": dict(self.evidence)}


@dataclass
class Injected:
    """An applied fault: its record, its undo (verifying; None when there is none) and a
    recovery probe (True once the target is back; the runner polls it)."""

    record: FaultRecord
    undo: Callable[[], FaultRecord] | None = None
    recovered: Callable[[], bool] | None = None


# ---------------------------------------------------------------------------------- params
class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NoParams(_Params):
    pass


class KillNodeParams(_Params):
    #: the undo starts the node again (same name, labels, resources)
    restart: bool = False


class ProbabilityParams(_Params):
    probability: float = Field(gt=0.0, le=1.0)


class DelayParams(_Params):
    delay_s: float = Field(gt=0.0, le=30.0)


class SkewParams(_Params):
    #: how far the node's clock reads from the machine's (positive: ahead); the undo sets
    #: back the offset it had before
    offset_s: float = Field(ge=-3600.0, le=3600.0)

    @field_validator("offset_s")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if abs(v) < MIN_SKEW_S:
            raise ValueError(f"must be at least {MIN_SKEW_S:g} s either way (a smaller skew "
                             f"cannot be told from the reading's own error)")
        return v


class SpikeParams(_Params):
    pct: float = Field(gt=-100.0, le=1000.0)
    ticks: int = Field(default=1, ge=1, le=10_000)
    instrument: str | None = None


class LatencyParams(_Params):
    latency_s: float = Field(gt=0.0, lt=60.0)


class CorruptParams(_Params):
    #: which record: its seq, ``last`` (the newest) or ``snapshot`` (the newest one the newest
    #: snapshot covers: recovery does not read it)
    seq: int | Literal["last", "snapshot"] = "last"

    @field_validator("seq")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, 'last' or 'snapshot'")
        return v


# ---------------------------------------------------------------------------------- helpers
def _wait(kind: str, target: str, what: str, probe: Callable[[], Any],
          timeout_s: float) -> Any:
    """Poll ``probe`` until truthy; :class:`FaultNotVerified` with the last value otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
        except ChaosError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise FaultNotVerified(kind, target, what, last)
        time.sleep(POLL_S)


def _state(pid: int) -> str:
    """``gone`` | a psutil status (``stopped`` for state T)."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"
    return "gone" if status == psutil.STATUS_ZOMBIE else status


def _stopped(pid: int) -> bool:
    return _state(pid) in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _signal(pid: int, sig: int) -> None:
    if pid <= 1 or pid == os.getpid():
        raise ChaosError(f"refusing to send signal {sig} to pid {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _running(ctx: ChaosContext, path: str) -> ProcessInfo:
    info = ctx.process(path)
    if info.status != "running" or info.pid is None or _state(info.pid) == "gone":
        raise ChaosError(f"{path}: not running here (status {info.status}, pid {info.pid})")
    return info


def _back(ctx: ChaosContext, path: str, old_pid: int | None) -> bool:
    """``path`` runs again: status running, a live pid (a new one when ``old_pid`` is given),
    not stopped."""
    info = ctx.process(path)
    if info.status != "running" or info.pid is None or (old_pid is not None and
                                                       info.pid == old_pid):
        return False
    return _state(info.pid) not in ("gone", psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


# ------------------------------------------------------------------------------ processes
def kill_process(ctx: ChaosContext, targets: tuple[str, ...], params: _Params,
                 timeout_s: float, kind: str = "kill-actor") -> Injected:
    """SIGKILL the worker of an actor (or a supervisor) at a tree path."""
    (path,) = targets
    proc = _running(ctx, path)
    assert proc.pid is not None
    wall = time.time()
    _signal(proc.pid, signal.SIGKILL)
    _wait(kind, path, f"pid {proc.pid} gone", lambda: _state(proc.pid) == "gone", timeout_s)
    record = FaultRecord(kind, path, "inject", wall, (proc.pid,),
                         (proc.node,) if proc.node else (),
                         {"pid_gone": proc.pid, "incarnation": proc.incarnation})
    return Injected(record, None, lambda: _back(ctx, path, proc.pid))


def pause_process(ctx: ChaosContext, targets: tuple[str, ...], params: _Params,
                  timeout_s: float) -> Injected:
    """SIGSTOP an actor's (or supervisor's) worker; the undo is SIGCONT."""
    (path,) = targets
    proc = _running(ctx, path)
    pid = proc.pid
    assert pid is not None
    wall = time.time()
    _signal(pid, signal.SIGSTOP)
    _wait("pause", path, f"pid {pid} in state T", lambda: _stopped(pid), timeout_s)
    nodes = (proc.node,) if proc.node else ()

    def undo() -> FaultRecord:
        at = time.time()
        _signal(pid, signal.SIGCONT)
        state = _wait("pause", path, f"pid {pid} resumed",
                      lambda: (s := _state(pid)) not in (psutil.STATUS_STOPPED,
                                                         psutil.STATUS_TRACING_STOP) and s,
                      timeout_s)
        return FaultRecord("pause", path, "undo", at, (pid,), nodes, {"state": state})

    record = FaultRecord("pause", path, "inject", wall, (pid,), nodes, {"state": "stopped"})
    return Injected(record, undo, lambda: _back(ctx, path, None))


def kill_node(ctx: ChaosContext, targets: tuple[str, ...], params: KillNodeParams,
              timeout_s: float) -> Injected:
    """Crash a node: SIGKILL its raylet and every process under it at once."""
    (node,) = targets
    before = ctx.children_on(node)
    wall = time.time()
    pids = ctx.kill_node(node)
    _wait("kill-node", node, "every process of the node gone",
          lambda: all(_state(p) == "gone" for p in pids), timeout_s)
    record = FaultRecord("kill-node", node, "inject", wall, tuple(pids), (node,),
                         {"processes_gone": len(pids), "children": sorted(before)})
    undo = None
    if params.restart:
        def undo() -> FaultRecord:
            at = time.time()
            ctx.restart_node(node)
            return FaultRecord("kill-node", node, "undo", at, tuple(ctx.node_pids(node)),
                               (node,), {"restarted": True})
    return Injected(record, undo, lambda: all(_back(ctx, p, pid) for p, pid in before.items()))


def pause_node(ctx: ChaosContext, targets: tuple[str, ...], params: _Params,
               timeout_s: float) -> Injected:
    """Hang a node: SIGSTOP its whole process tree; the undo is SIGCONT to all of it."""
    (node,) = targets
    before = ctx.children_on(node)
    pids = ctx.node_pids(node)
    wall = time.time()
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    _wait("pause-node", node, "every process of the node in state T",
          lambda: all(_stopped(p) or _state(p) == "gone" for p in pids)
          and any(_stopped(p) for p in pids), timeout_s)

    def undo() -> FaultRecord:
        at = time.time()
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        _wait("pause-node", node, "the node's processes resumed",
              lambda: not any(_stopped(p) for p in pids), timeout_s)
        return FaultRecord("pause-node", node, "undo", at, tuple(pids), (node,), {})

    def recovered() -> bool:
        return not any(_stopped(p) for p in pids) and all(
            _back(ctx, path, None) for path in before)

    record = FaultRecord("pause-node", node, "inject", wall, tuple(pids), (node,),
                         {"stopped": len(pids), "children": sorted(before)})
    return Injected(record, undo, recovered)


# ---------------------------------------------------------------------------------- links
class LinkModel:
    """The link faults in force, as rules by fault id; :meth:`composed` folds them per
    directed link (drops combine as independent losses, the longest delay wins)."""

    def __init__(self) -> None:
        self.rules: dict[str, dict[tuple[str, str], LinkFault]] = {}

    def add(self, rule_id: str, links: Mapping[tuple[str, str], LinkFault]) -> None:
        self.rules[rule_id] = dict(links)

    def remove(self, rule_id: str) -> None:
        self.rules.pop(rule_id, None)

    def composed(self) -> dict[tuple[str, str], LinkFault]:
        out: dict[tuple[str, str], LinkFault] = {}
        for links in self.rules.values():
            for pair, f in links.items():
                prev = out.get(pair, LinkFault())
                out[pair] = LinkFault(1.0 - (1.0 - prev.drop) * (1.0 - f.drop),
                                      max(prev.delay_s, f.delay_s))
        return out


_MODELS: weakref.WeakKeyDictionary[object, LinkModel] = weakref.WeakKeyDictionary()


def _model_of(links: object) -> LinkModel:
    """One model per link controller (a context caches its controller)."""
    return _MODELS.setdefault(links, LinkModel())


def _group(members: Mapping[str, str | None], targets: Collection[str]) -> set[str]:
    """Members named by ``targets``: a member by its name, or every member of a site."""
    out: set[str] = set()
    for t in targets:
        if t in members:
            out.add(t)
            continue
        site_members = {m for m, s in members.items() if s == t}
        if not site_members:
            raise ChaosError(f"{t!r}: neither a member nor a site of the network; members "
                             f"are {sorted(members)}")
        out |= site_members
    return out


def _link_fault(kind: str) -> Callable[..., Injected]:
    def inject(ctx: ChaosContext, targets: tuple[str, ...], params: _Params,
               timeout_s: float) -> Injected:
        links = ctx.links()
        members = links.members()
        group = _group(members, targets)
        rest = sorted(set(members) - group)
        cut, fault = _shape(kind, sorted(group), rest, params)
        if not cut:
            raise ChaosError(f"{kind} on {sorted(group)}: no link to fault (members "
                             f"{sorted(members)})")
        model = _model_of(links)
        rule = uuid.uuid4().hex[:8]
        target = ",".join(sorted(targets))
        wall = time.time()
        model.add(rule, {pair: fault for pair in cut})
        try:
            links.apply(model.composed())
            evidence = _see_links(kind, target, links, cut, fault, timeout_s)
        except BaseException:
            model.remove(rule)
            links.apply(model.composed())
            raise
        involved = sorted({m for pair in cut for m in pair})

        def undo() -> FaultRecord:
            at = time.time()
            model.remove(rule)
            links.apply(model.composed())
            seen: dict[str, Any] = {}
            still = model.composed()  # other faults' rules may still hold some of our links
            clear = [(s, d) for s, d in cut if not still.get((s, d), LinkFault()).drop
                     and not still.get((d, s), LinkFault()).drop]
            if clear and links.probe(*clear[0]) is not None:
                src, dst = clear[0]
                seen["probe"] = _wait(kind, target, f"{src}<->{dst} passing again",
                                      lambda: links.probe(src, dst), timeout_s)
            return FaultRecord(kind, target, "undo", at, (), tuple(involved), seen)

        record = FaultRecord(kind, target, "inject", wall, (), tuple(sorted(group)),
                             {"links": len(cut), **evidence})
        return Injected(record, undo, lambda: links.healthy(involved))

    return inject


def _shape(kind: str, group: list[str], rest: list[str], params: _Params
           ) -> tuple[list[tuple[str, str]], LinkFault]:
    """The directed links a link fault cuts, and how."""
    both = [(a, b) for a in group for b in rest] + [(b, a) for a in group for b in rest]
    if kind == "partition":
        return both, LinkFault(drop=1.0)
    if kind == "partition-one-way":
        return [(a, b) for a in group for b in rest], LinkFault(drop=1.0)
    if kind == "partition-bridge":
        if len(rest) < 2:
            raise ChaosError(f"partition-bridge via {group}: needs two others to split, got "
                             f"{rest}")
        half = (len(rest) + 1) // 2
        left, right = rest[:half], rest[half:]
        return ([(a, b) for a in left for b in right] + [(b, a) for a in left for b in right],
                LinkFault(drop=1.0))
    if kind == "link-loss":
        assert isinstance(params, ProbabilityParams)
        return both, LinkFault(drop=params.probability)
    assert kind == "link-delay" and isinstance(params, DelayParams)
    return both, LinkFault(delay_s=params.delay_s)


def _see_links(kind: str, target: str, links: Any, cut: list[tuple[str, str]],
               fault: LinkFault, timeout_s: float) -> dict[str, Any]:
    """Wait until the receivers of ``cut`` count dropped (or senders delayed) messages."""
    key = "delayed" if fault.delay_s else "drop_in"
    ends = sorted({(s if fault.delay_s else d) for s, d in cut})
    base = links.counters()
    src, dst = cut[0]
    probes: list[bool] = []

    def seen() -> dict[str, Any] | None:
        if not fault.delay_s:
            arrived = links.probe(src, dst)
            if arrived is not None:
                probes.append(arrived)
        now = links.counters()
        grew = {m: now[m][key] - base.get(m, {}).get(key, 0) for m in ends if m in now}
        if sum(v for v in grew.values() if v > 0) > 0 and (
                not probes or fault.drop < 1.0 or not probes[-1]):
            return {key: grew, **({"probe_arrived": probes[-1]} if probes else {})}
        return None

    return _wait(kind, target, f"{key} counted at {ends}", seen, timeout_s)


# ---------------------------------------------------------------------------------- clocks
def clock_skew(ctx: ChaosContext, targets: tuple[str, ...], params: SkewParams,
               timeout_s: float) -> Injected:
    """Make a node's clock (as its mesh agent and site roles read it) read ``offset_s`` from
    the machine's monotonic clock: a jump ahead (or back)."""
    (node,) = targets
    wall = time.time()
    previous = ctx.set_clock_offset(node, params.offset_s)
    wanted = params.offset_s

    def reads(offset: float) -> Callable[[], Any]:
        def probe() -> Any:
            skew, uncertainty = ctx.clock_skew_seen(node)
            return abs(skew - offset) <= uncertainty + SKEW_TOLERANCE_S and round(skew, 4)
        return probe

    seen = _wait("clock-skew", node, f"the clock reading {wanted:+.3f} s", reads(wanted),
                 timeout_s)

    def undo() -> FaultRecord:
        at = time.time()
        ctx.set_clock_offset(node, previous)
        back = _wait("clock-skew", node, f"the clock back at {previous:+.3f} s",
                     reads(previous), timeout_s)
        return FaultRecord("clock-skew", node, "undo", at, (), (node,), {"skew_seen_s": back})

    def recovered() -> bool:
        return bool(reads(previous)())

    record = FaultRecord("clock-skew", node, "inject", wall, (), (node,),
                         {"offset_s": wanted, "skew_seen_s": seen})
    return Injected(record, undo, recovered)


# ---------------------------------------------------------------------------------- venues
#: kind -> (params, the fields that switch it on, the fields that switch it off)
VENUE_FAULTS: dict[str, tuple[type[_Params], Callable[[Any], dict[str, Any]],
                              Callable[[Any], dict[str, Any]]]] = {
    "venue-outage": (NoParams, lambda p: {"outage": True}, lambda p: {"outage": False}),
    "venue-stale-feed": (NoParams, lambda p: {"stale_feed": True},
                         lambda p: {"stale_feed": False}),
    "venue-price-spike": (SpikeParams,
                          lambda p: {"price_spike_pct": p.pct, "price_spike_ticks": p.ticks,
                                     "price_spike_instrument": p.instrument or ""},
                          lambda p: {"price_spike_pct": 0.0}),
    "venue-reject-storm": (ProbabilityParams,
                           lambda p: {"reject_storm_probability": p.probability},
                           lambda p: {"reject_storm_probability": 0.0}),
    "venue-md-drop": (ProbabilityParams, lambda p: {"md_drop_probability": p.probability},
                      lambda p: {"md_drop_probability": 0.0}),
    "venue-md-duplicate": (ProbabilityParams,
                           lambda p: {"md_duplicate_probability": p.probability},
                           lambda p: {"md_duplicate_probability": 0.0}),
    "venue-md-reorder": (ProbabilityParams,
                         lambda p: {"md_reorder_probability": p.probability},
                         lambda p: {"md_reorder_probability": 0.0}),
    "venue-withdrawals-suspended": (NoParams, lambda p: {"withdrawals_suspended": True},
                                    lambda p: {"withdrawals_suspended": False}),
    "venue-latency": (LatencyParams, lambda p: {"latency_s": p.latency_s},
                      lambda p: {"latency_s": 0.0}),
}


def _shows(state: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    """The venue's answer (``faults`` and ``latency_s``) has every one of ``fields``."""
    faults = state.get("faults", {})
    for k, v in fields.items():
        got = state.get("latency_s") if k == "latency_s" else faults.get(k)
        if k == "price_spike_instrument" and v == "":
            v = None
        if isinstance(v, float) and isinstance(got, int | float):
            if not math.isclose(got, v, abs_tol=1e-9):
                return False
        elif got != v:
            return False
    return True


def _status_showing(venue: Any, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    state = venue.status()
    return state if _shows(state, fields) else None


def _venue_fault(kind: str) -> Callable[..., Injected]:
    _, on, off = VENUE_FAULTS[kind]

    def inject(ctx: ChaosContext, targets: tuple[str, ...], params: _Params,
               timeout_s: float) -> Injected:
        (name,) = targets
        venue = ctx.venue(name)
        fields_on = on(params)
        wall = time.time()
        answer = venue.set_faults(**fields_on)
        if kind == "venue-price-spike":
            # one-off: the engine clears it once consumed, so its own answer is the evidence
            if not _shows(answer, fields_on):
                raise FaultNotVerified(kind, name, "the spike armed", answer)
            evidence = {"faults": answer.get("faults")}
        else:
            got = _wait(kind, name, f"{fields_on} in the simulator's status",
                        lambda: _status_showing(venue, fields_on),
                        timeout_s)
            evidence = {"faults": got.get("faults"), "latency_s": got.get("latency_s")}
        fields_off = off(params)

        def undo() -> FaultRecord:
            at = time.time()
            venue.set_faults(**fields_off)
            got = _wait(kind, name, f"{fields_off} in the simulator's status",
                        lambda: _status_showing(venue, fields_off),
                        timeout_s)
            return FaultRecord(kind, name, "undo", at, (), (),
                               {"faults": got.get("faults"), "latency_s": got.get("latency_s")})

        record = FaultRecord(kind, name, "inject", wall, (), (), evidence)
        return Injected(record, undo, lambda: _shows(venue.status(), fields_off))

    return inject


# ---------------------------------------------------------------------------------- journal
def corrupt_journal(ctx: ChaosContext, targets: tuple[str, ...], params: CorruptParams,
                    timeout_s: float) -> Injected:
    """Flip a byte of one stored record of a journal stream in its SQLite file (beneath the
    store's codec: what a bad sector under the record looks like to the store). Verified by a
    fresh store refusing that record on read (``CorruptRecordError`` at its seq); the undo
    writes the original bytes back."""
    from supervisors.journal import CorruptRecordError, open_store
    from supervisors.journal.sqlite import SqliteJournalStore

    (name,) = targets
    url, stream = ctx.journal(name)
    store = open_store(url)
    try:
        if not isinstance(store, SqliteJournalStore):
            raise ChaosError(f"corrupt-journal {stream}: only SQLite stores (got {store!r})")
        info = store.stream_info(stream)
        if info is None or info.last_seq == 0:
            raise ChaosError(f"corrupt-journal: stream {stream!r} has no records in {store!r}")
        seq = _pick_seq(store, stream, info, params.seq)
        path = store.stream_path(stream)
    finally:
        store.close()
    wall = time.time()
    original = _rewrite(path, seq, None)

    def refused() -> Any:
        fresh = open_store(url)
        try:
            fresh.read(stream, after_seq=seq - 1, limit=1)
        except CorruptRecordError as exc:
            return exc.seq == seq and exc.reason
        finally:
            fresh.close()
        return False

    reason = _wait("corrupt-journal", stream, f"seq {seq} refused on read", refused, timeout_s)

    def undo() -> FaultRecord:
        at = time.time()
        _rewrite(path, seq, original)
        _wait("corrupt-journal", stream, f"seq {seq} reading again", lambda: not refused(),
              timeout_s)
        return FaultRecord("corrupt-journal", stream, "undo", at, (), (), {"seq": seq})

    record = FaultRecord("corrupt-journal", stream, "inject", wall, (), (),
                         {"seq": seq, "refused": reason, "file": str(path)})
    return Injected(record, undo, lambda: not refused())


def _pick_seq(store: Any, stream: str, info: Any, which: int | str) -> int:
    if which == "last":
        return int(info.last_seq)
    if which == "snapshot":
        snap = store.latest_snapshot(stream)
        if snap is None or snap.seq <= info.compacted_upto:
            raise ChaosError(f"corrupt-journal: stream {stream!r} has no stored record under "
                             f"a snapshot (snapshot {snap and snap.seq}, compacted to "
                             f"{info.compacted_upto})")
        return int(snap.seq)
    assert isinstance(which, int)
    if not info.compacted_upto < which <= info.last_seq:
        raise ChaosError(f"corrupt-journal: seq {which} is not stored in {stream!r} (records "
                         f"{info.compacted_upto + 1}..{info.last_seq})")
    return which


def _rewrite(path: Any, seq: int, entry: bytes | None) -> bytes:
    """Replace record ``seq``'s stored entry with ``entry`` (None: itself with one payload
    byte flipped, or a crc byte when the payload is empty); returns the entry before."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT entry FROM records WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            raise ChaosError(f"corrupt-journal: seq {seq} is not in {path}")
        before = bytes(row[0])
        if entry is None:
            at = ENTRY_HEADER_BYTES if len(before) > ENTRY_HEADER_BYTES + ENTRY_CRC_BYTES \
                else len(before) - 1
            entry = before[:at] + bytes([before[at] ^ 0xFF]) + before[at + 1:]
        conn.execute("UPDATE records SET entry = ? WHERE seq = ?", (entry, seq))
        conn.execute("COMMIT")
        return before
    finally:
        conn.close()


# ---------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class FaultKind:
    """One kind of fault. ``group``: one fault over the whole selection (a partition's side);
    else one per selected target. ``recovery_s``: the default recovery bound after the hold."""

    name: str
    among: tuple[str, ...]
    group: bool
    params: type[_Params]
    inject: Callable[..., Injected]
    recovery_s: float
    summary: str
    #: whether a fault of these params has an undo
    undoable: Callable[[Any], bool] = lambda params: True
    #: watch recovery only from the undo on: before it the target can still look healthy
    #: (a partition takes a moment to be noticed); otherwise from the injection
    watch_from_undo: bool = False


def _kinds() -> dict[str, FaultKind]:
    link = ("nodes", "sites")
    kinds = [
        FaultKind("kill-actor", ("actors",), False, NoParams,
                  lambda c, t, p, s: kill_process(c, t, p, s, "kill-actor"), 30.0,
                  "SIGKILL an actor's worker", lambda p: False),
        FaultKind("kill-supervisor", ("supervisors",), False, NoParams,
                  lambda c, t, p, s: kill_process(c, t, p, s, "kill-supervisor"), 30.0,
                  "SIGKILL a supervisor's worker", lambda p: False),
        FaultKind("kill-node", ("nodes",), False, KillNodeParams, kill_node, 60.0,
                  "SIGKILL a node's raylet and every process under it",
                  lambda p: p.restart),
        FaultKind("pause", ("actors", "supervisors"), False, NoParams, pause_process, 30.0,
                  "SIGSTOP a worker (SIGCONT to undo)"),
        FaultKind("pause-node", ("nodes",), False, NoParams, pause_node, 60.0,
                  "SIGSTOP a node's whole process tree (SIGCONT to undo)"),
        FaultKind("partition", link, True, NoParams, _link_fault("partition"), 30.0,
                  "cut the selection off from the rest, both ways", watch_from_undo=True),
        FaultKind("partition-one-way", link, True, NoParams,
                  _link_fault("partition-one-way"), 30.0,
                  "drop what the selection sends to the rest (it still hears them)", watch_from_undo=True),
        FaultKind("partition-bridge", link, True, NoParams, _link_fault("partition-bridge"),
                  30.0, "split the rest in two halves that reach only the selection", watch_from_undo=True),
        FaultKind("link-loss", link, True, ProbabilityParams, _link_fault("link-loss"), 30.0,
                  "drop messages between the selection and the rest with a probability", watch_from_undo=True),
        FaultKind("link-delay", link, True, DelayParams, _link_fault("link-delay"), 30.0,
                  "delay messages between the selection and the rest (mesh links)", watch_from_undo=True),
        FaultKind("clock-skew", ("nodes",), False, SkewParams, clock_skew, 10.0,
                  "jump a node's clock as its mesh agent reads it"),
        FaultKind("corrupt-journal", ("streams", "actors"), False, CorruptParams,
                  corrupt_journal, 10.0, "flip a byte of one journal record on disk"),
    ]
    for name, (params, _, _) in VENUE_FAULTS.items():
        kinds.append(FaultKind(name, ("venues",), False, params, _venue_fault(name), 10.0,
                               f"the venue simulator's {name[6:]} fault"))
    return {k.name: k for k in kinds}


FAULT_KINDS: dict[str, FaultKind] = _kinds()


def fault_kind(name: str) -> FaultKind:
    try:
        return FAULT_KINDS[name]
    except KeyError:
        raise ChaosError(f"unknown fault {name!r}; known: {', '.join(FAULT_KINDS)}") from None


def params_of(kind: str, params: Mapping[str, Any] | None) -> _Params:
    """``params`` validated for ``kind``; ChaosError naming the field otherwise."""
    fk = fault_kind(kind)
    try:
        return fk.params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise ChaosError(f"{kind}: " + "; ".join(
            f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} "
            f"(got {e.get('input')!r})" for e in exc.errors())) from None


def units(kind: str, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The faults a selection makes: one for the group, or one per target."""
    if not targets:
        return []
    return [targets] if fault_kind(kind).group else [(t,) for t in targets]


def inject(ctx: ChaosContext, kind: str, targets: tuple[str, ...],
           params: Mapping[str, Any] | _Params | None = None, *,
           verify_timeout_s: float = VERIFY_TIMEOUT_S) -> Injected:
    """Apply one fault (one unit of :func:`units`) and wait for its effect. Refuses (before
    anything is done) unless the context is marked non-production."""
    require_non_production(ctx.environment, getattr(ctx, "source", "the system"))
    fk = fault_kind(kind)
    p = params if isinstance(params, _Params) else params_of(kind, params)
    if not fk.group and len(targets) != 1:
        raise ChaosError(f"{kind}: one target at a time, got {list(targets)}")
    return fk.inject(ctx, tuple(targets), p, verify_timeout_s)
