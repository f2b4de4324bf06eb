"""Invariant checks over a run history (``cluster.history``): ``bastion check HISTORY.jsonl``.

``check(history)`` runs every check in :data:`CHECKS` and returns a :class:`Verdict`; each
:class:`CheckResult` has counts, the number of violations and the first few with where they
are (the history line, and the venue/account/label/site they concern):

* ``history`` — every line is a valid event (a malformed line is a violation, by line number).
* ``positions`` — per venue, account and instrument, the venue's fills summed equal every
  position claimed for it (the venue's own report, the connector's, the risk book's) within
  ``POSITION_TOLERANCE``. The latest claim of a source counts; an instrument a source does not
  mention is a claim of zero. A risk book over several accounts claims ``account: "*"``.
* ``unique_labels`` — a client order id names one order. At the venue (its order log is the
  witness) a label answered twice is fine when it is a resend of the same order (counted in
  ``resends``) and a violation when the second request differs (instrument, direction, amount,
  price, type): the venue answered with an order the client did not mean. On our side a
  label journaled by two intents was minted twice.
* ``lease`` — every order the venue accepted with a site's stamped label (``e<epoch>.site-…``)
  arrived while that site held the lease on the resource (the venue, unless the event names a
  ``resource``) under that same epoch. Active intervals come from ``role`` events (or
  ``from_ts``/``to_ts``), each cut short by the last ``lease`` renewal's ``valid_until_ts``.
  Orders the venue fenced (``fenced_epoch``) are counted, not violations. And no instant has two
  sites active for one resource: ``overlap_s`` must be exactly 0.
* ``recovery`` — every ``fault`` has a ``recovered`` event (or a ``restart``/``migration`` of
  its target) within ``bound_s``; p50/p99/max of the recovery times.
* ``journal`` — every venue fill of our accounts (those a connector journal covers) is in a
  connector journal with the same signed amount, no journaled fill is unknown to the venue,
  each journal's seqs run without a gap from its compaction point to ``last_seq`` with no
  corrupt record, and every limit change names who made it and why (the audit).

Plain Python over event dicts: no Ray, no sockets.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .history import History, label_epoch, label_site

#: Violations kept per check (all are counted).
MAX_SHOWN = 5
#: Positions agree when they differ by at most this much (amount units).
POSITION_TOLERANCE = 1e-9
#: Fields that make two orders the same order (a resend, not a reuse of the label).
ORDER_FIELDS = ("instrument", "direction", "amount", "price", "type")


@dataclass(frozen=True)
class Violation:
    """One broken invariant: a stable ``code``, a sentence, and where (line, keys)."""

    code: str
    detail: str
    where: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, "where": self.where}


@dataclass(frozen=True)
class CheckResult:
    name: str
    counts: dict[str, Any]
    violation_count: int
    violations: tuple[Violation, ...]  # the first MAX_SHOWN

    @property
    def passed(self) -> bool:
        return self.violation_count == 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "counts": self.counts,
                "violation_count": self.violation_count,
                "violations": [v.to_dict() for v in self.violations]}


@dataclass(frozen=True)
class Verdict:
    checks: tuple[CheckResult, ...]
    path: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "failed": self.failed,
                "checks": [c.to_dict() for c in self.checks]}


class _Tally:
    """Counts and violations of one check while it runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self.shown: list[Violation] = []
        self.violations = 0

    def violate(self, code: str, detail: str, **where: Any) -> None:
        self.violations += 1
        self.counts[code] += 1
        if len(self.shown) < MAX_SHOWN:
            self.shown.append(Violation(code, detail, {k: v for k, v in where.items()
                                                       if v is not None}))

    def result(self) -> CheckResult:
        return CheckResult(self.name, {**dict(self.counts), **self.extra}, self.violations,
                           tuple(self.shown))


def _key(*parts: object) -> str:
    return "/".join(str(p) for p in parts)


# --------------------------------------------------------------------------------------------
# history
# --------------------------------------------------------------------------------------------
def check_history(h: History) -> CheckResult:
    t = _Tally("history")
    t.extra.update(lines=h.lines, events=len(h.events),
                   kinds=dict(Counter(e["t"] for e in h.events)))
    for bad in h.malformed:
        t.violate("malformed", f"line {bad.line}: {bad.reason}", line=bad.line, text=bad.text)
    return t.result()


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------
def venue_fills(h: History) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The venue's fills by ``(venue, account, trade_id)`` (a repeated report counts once)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in h.of("fill"):
        if e["source"] == "venue":
            out.setdefault((e["venue"], e["account"], e["trade_id"]), e)
    return out


def check_positions(h: History) -> CheckResult:
    t = _Tally("positions")
    truth: dict[tuple[str, str, str], float] = defaultdict(float)
    fills = venue_fills(h)
    for (venue, account, _), e in fills.items():
        truth[(venue, account, e["instrument"])] += float(e["amount"])
    latest: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for e in h.of("position"):
        key = (e["source"], e["venue"], e["account"], e["instrument"])
        if key not in latest or (e["ts"], e["_line"]) >= (latest[key]["ts"],
                                                           latest[key]["_line"]):
            latest[key] = e
    covered = {(s, v, a) for s, v, a, _ in latest}
    t.extra.update(venue_fills=len(fills), compared=0, max_abs_diff=0.0)
    for source, venue, account in sorted(covered):
        t.counts[f"claims_{source}"] += 1
        matching = {k: x for k, x in truth.items()
                    if k[0] == venue and (account == "*" or k[1] == account)}
        instruments = {i for s, v, a, i in latest if (s, v, a) == (source, venue, account)}
        instruments |= {k[2] for k in matching}
        for inst in sorted(instruments):
            expected = sum(x for k, x in matching.items() if k[2] == inst)
            claim = latest.get((source, venue, account, inst))
            got = float(claim["value"]) if claim is not None else 0.0
            diff = got - expected
            t.extra["compared"] += 1
            t.extra["max_abs_diff"] = max(t.extra["max_abs_diff"], abs(diff))
            if abs(diff) > POSITION_TOLERANCE:
                t.violate("position_mismatch",
                          f"{_key(venue, account, inst)}: {source} says {got:g}, the venue's "
                          f"fills sum to {expected:g} (off by {diff:+g})",
                          source=source, venue=venue, account=account, instrument=inst,
                          value=got, expected=expected,
                          line=claim["_line"] if claim is not None else None)
    return t.result()


# --------------------------------------------------------------------------------------------
# unique client order ids
# --------------------------------------------------------------------------------------------
def _order_of(e: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(e.get(f) for f in ORDER_FIELDS)


def check_unique_labels(h: History) -> CheckResult:
    t = _Tally("unique_labels")
    first: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in h.of("venue_order"):
        if not e["label"]:
            t.counts["unlabelled"] += 1
            continue
        key = (e["venue"], e["account"], e["label"])
        if e["outcome"] == "rejected":
            t.counts["rejected"] += 1  # created nothing: the label stays free for a retry
            continue
        t.counts["venue_requests"] += 1
        original = first.get(key)
        if original is None:
            first[key] = e
            continue
        where = dict(venue=e["venue"], account=e["account"], label=e["label"],
                     line=e["_line"], first_line=original["_line"])
        if e["outcome"] == "created":
            t.violate("created_twice", f"{_key(*key)}: the venue created a second order "
                      f"for one label (lines {original['_line']} and {e['_line']})", **where)
        elif _order_of(e) != _order_of(original):
            t.violate("label_reused",
                      f"{_key(*key)}: label reused for another order "
                      f"{dict(zip(ORDER_FIELDS, _order_of(e), strict=True))}, the venue "
                      f"answered with the first {dict(zip(ORDER_FIELDS, _order_of(original), strict=True))}",
                      **where)
        else:
            t.counts["resends"] += 1
    t.extra["venue_labels"] = len(first)
    minted: dict[tuple[str, str], dict[str, Any]] = {}
    for e in h.of("order_sent"):
        key = (e["venue"], e["label"])
        t.counts["sent"] += 1
        if key in minted:
            t.violate("minted_twice", f"{_key(*key)}: journaled by two intents (lines "
                      f"{minted[key]['_line']} and {e['_line']})", venue=e["venue"],
                      label=e["label"], line=e["_line"], first_line=minted[key]["_line"])
        else:
            minted[key] = e
    return t.result()


# --------------------------------------------------------------------------------------------
# lease
# --------------------------------------------------------------------------------------------
@dataclass
class Interval:
    """A site active on a resource under ``epoch`` for ``[start, end]`` (wall seconds)."""

    resource: str
    site: str
    epoch: int
    start: float
    end: float
    line: int
    open_ended: bool = False

    def covers(self, ts: float) -> bool:
        return self.start <= ts <= self.end


def role_intervals(h: History) -> dict[str, list[Interval]]:
    """Active intervals per resource, from ``role`` events and capped by ``lease`` events."""
    end_of_run = max((e["ts"] for e in h.events), default=0.0)
    by_holder: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    out: dict[str, list[Interval]] = defaultdict(list)
    for e in h.of("role"):
        if "from_ts" in e and "to_ts" in e:
            if e["state"] == "active":
                out[e["resource"]].append(Interval(e["resource"], e["site"], e["epoch"],
                                                   e["from_ts"], e["to_ts"], e["_line"]))
        else:
            by_holder[(e["resource"], e["site"])].append(e)
    for (resource, site), events in by_holder.items():
        current: Interval | None = None
        for e in sorted(events, key=lambda x: (x["ts"], x["_line"])):
            if current is not None and (e["state"] == "standby" or e["epoch"] != current.epoch):
                current.end = e["ts"]
                out[resource].append(current)
                current = None
            if e["state"] == "active" and current is None:
                current = Interval(resource, site, e["epoch"], e["ts"], math.inf, e["_line"])
        if current is not None:
            current.end, current.open_ended = end_of_run, True
            out[resource].append(current)
    leases: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in h.of("lease"):
        leases[(e["resource"], e["site"], e["epoch"])].append(e)
    for intervals in out.values():
        for iv in intervals:
            grants = [g["valid_until_ts"] for g in leases.get((iv.resource, iv.site, iv.epoch), ())
                      if iv.start <= g["ts"] <= iv.end]
            if grants:
                iv.end = min(iv.end, max(grants))
        intervals.sort(key=lambda iv: (iv.start, iv.end))
    return dict(out)


def _held(site_intervals: tuple[list[float], list[Interval]], ts: float, epoch: int
          ) -> list[Interval]:
    """The site's intervals covering ``ts``, newest first, stopping at one under ``epoch``
    (the usual case: one look)."""
    starts, ivs = site_intervals
    out = []
    for i in range(bisect.bisect_right(starts, ts) - 1, -1, -1):
        if ivs[i].covers(ts):
            out.append(ivs[i])
            if ivs[i].epoch == epoch:
                break
    return out


def check_lease(h: History) -> CheckResult:
    t = _Tally("lease")
    intervals = role_intervals(h)
    overlap_s = 0.0
    for resource, ivs in sorted(intervals.items()):
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if b.start >= a.end:
                    break
                both = min(a.end, b.end) - max(a.start, b.start)
                if b.site != a.site and both > 0:
                    overlap_s += both
                    t.violate("overlap", f"{resource}: {a.site} (epoch {a.epoch}) and {b.site} "
                              f"(epoch {b.epoch}) both active for {both:.3f} s from "
                              f"{max(a.start, b.start):.3f}", resource=resource,
                              sites=[a.site, b.site], epochs=[a.epoch, b.epoch],
                              overlap_s=both, lines=[a.line, b.line])
    by_site: dict[tuple[str, str], tuple[list[float], list[Interval]]] = {}
    for resource, ivs in intervals.items():
        for iv in ivs:  # sorted by start already
            starts, held = by_site.setdefault((resource, iv.site), ([], []))
            starts.append(iv.start)
            held.append(iv)
    t.extra.update(resources=len(intervals),
                   intervals=sum(len(v) for v in intervals.values()), overlap_s=overlap_s,
                   checked=0)
    for e in h.of("venue_order"):
        resource = e.get("resource") or e["venue"]
        ivs = intervals.get(resource)
        if ivs is None:
            continue  # not a leased resource
        if e["outcome"] == "rejected":
            t.counts["fenced" if e.get("reason") == "fenced_epoch" else "refused"] += 1
            continue
        if e["outcome"] == "duplicate":
            t.counts["resends"] += 1
            continue
        site = e.get("site") or label_site(e["label"])
        epoch = e.get("epoch")
        epoch = label_epoch(e["label"]) if epoch is None else epoch
        if site is None or epoch is None:
            t.counts["unattributed"] += 1
            continue
        t.extra["checked"] += 1
        held = _held(by_site.get((resource, site), ([], [])), e["ts"], epoch)
        if held and held[-1].epoch == epoch:
            continue
        where = dict(resource=resource, site=site, epoch=epoch, label=e["label"],
                     account=e["account"], ts=e["ts"], line=e["_line"])
        if not held:
            near = [iv for iv in ivs if iv.site == site]
            last = max((iv for iv in near if iv.end <= e["ts"]), key=lambda iv: iv.end,
                       default=None)
            since = f"; its lease ended {e['ts'] - last.end:.3f} s before" if last else ""
            t.violate("outside_lease", f"{resource}: {site} sent {e['label']} at "
                      f"{e['ts']:.3f} without the lease{since}", **where)
        else:
            t.violate("stale_epoch", f"{resource}: {site} sent {e['label']} with epoch {epoch} "
                      f"while holding epoch {held[0].epoch}", **where)
    return t.result()


# --------------------------------------------------------------------------------------------
# recovery
# --------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def check_recovery(h: History) -> CheckResult:
    t = _Tally("recovery")
    marks: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for e in h.of("recovered"):
        marks[e["fault_id"]].append((e["ts"], e["_line"]))
    comebacks: dict[str, list[float]] = defaultdict(list)
    for e in h.of("restart") + h.of("migration"):
        comebacks[e["child"]].append(e["ts"])
    faults = h.of("fault")
    ids = Counter(f["id"] for f in faults)
    times: list[float] = []
    for f in faults:
        where = dict(fault=f["id"], kind=f["kind"], target=f["target"], line=f["_line"])
        if ids[f["id"]] > 1:
            t.violate("fault_id_repeated", f"fault id {f['id']} is used {ids[f['id']]} times",
                      **where)
        back = [ts for ts, _ in marks.get(f["id"], ()) if ts >= f["ts"]]
        back += [ts for ts in comebacks.get(f["target"], ()) if ts >= f["ts"]]
        if not back:
            t.violate("not_recovered", f"{f['kind']} on {f['target']} at {f['ts']:.3f}: no "
                      f"recovery recorded (bound {f['bound_s']:g} s)", **where)
            continue
        took = min(back) - f["ts"]
        times.append(took)
        if took > f["bound_s"]:
            t.violate("recovered_late", f"{f['kind']} on {f['target']}: recovered after "
                      f"{took:.3f} s, bound {f['bound_s']:g} s", took_s=took, **where)
    known = set(ids)
    t.extra.update(faults=len(faults), recovered=len(times),
                   orphan_recoveries=sum(len(v) for k, v in marks.items() if k not in known),
                   p50_s=percentile(times, 50), p99_s=percentile(times, 99),
                   max_s=max(times) if times else None)
    return t.result()


# --------------------------------------------------------------------------------------------
# journal and audit
# --------------------------------------------------------------------------------------------
def _gaps(ranges: Iterable[Any], first: int, last: int) -> list[tuple[int, int]]:
    """The ``[a, b]`` seq runs missing from ``first..last`` given the present runs."""
    gaps, expected = [], first
    for a, b in sorted((int(r[0]), int(r[1])) for r in ranges):
        if a > expected:
            gaps.append((expected, a - 1))
        expected = max(expected, b + 1)
    if expected <= last:
        gaps.append((expected, last))
    return gaps


def check_journal(h: History) -> CheckResult:
    t = _Tally("journal")
    ours: set[tuple[str, str]] = set()
    journaled: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in h.of("fill"):
        if e["source"] == "connector":
            ours.add((e["venue"], e["account"]))
            journaled.setdefault((e["venue"], e["account"], e["trade_id"]), e)
    for e in h.of("journal"):
        if isinstance(e.get("venue"), str) and isinstance(e.get("account"), str):
            ours.add((e["venue"], e["account"]))
    at_venue = venue_fills(h)
    seen_venue = {(v, a) for v, a, _ in at_venue} | {
        (e["venue"], e["account"]) for e in h.of("venue_order")}
    t.extra.update(accounts=len(ours), venue_fills=0, journaled_fills=len(journaled))
    for key, e in at_venue.items():
        if key[:2] not in ours:
            t.counts["foreign_fills"] += 1
            continue
        t.extra["venue_fills"] += 1
        mine = journaled.get(key)
        where = dict(venue=key[0], account=key[1], trade_id=key[2], label=e.get("label"),
                     line=e["_line"])
        if mine is None:
            t.violate("fill_not_journaled", f"{_key(*key)} ({e['instrument']} "
                      f"{float(e['amount']):+g}) is at the venue but in no connector journal",
                      **where)
        elif abs(float(mine["amount"]) - float(e["amount"])) > POSITION_TOLERANCE:
            t.violate("fill_mismatch", f"{_key(*key)}: journaled {float(mine['amount']):+g}, "
                      f"the venue says {float(e['amount']):+g}", **where)
    for key, e in journaled.items():
        if key[:2] in seen_venue and key not in at_venue:
            t.violate("fill_unknown_at_venue", f"{_key(*key)} is journaled but the venue "
                      f"has no such trade", venue=key[0], account=key[1], trade_id=key[2],
                      line=e["_line"])
    for e in h.of("journal"):
        t.counts["streams"] += 1
        first = int(e.get("compacted_upto") or 0) + 1
        corrupt = [[s, s] for s in e.get("corrupt") or ()]  # there, reported below
        for a, b in _gaps([*e["ranges"], *corrupt], first, e["last_seq"]):
            t.violate("seq_gap", f"journal {e['stream']}: seqs {a}..{b} missing "
                      f"(of {first}..{e['last_seq']})", stream=e["stream"], missing=[a, b],
                      line=e["_line"])
        for seq in e.get("corrupt") or ():
            t.violate("corrupt_record", f"journal {e['stream']}: seq {seq} fails "
                      f"verification", stream=e["stream"], seq=seq, line=e["_line"])
    for e in h.of("limit_change"):
        t.counts["limit_changes"] += 1
        missing = [k for k in ("who", "why")
                   if not isinstance(e.get(k), str) or not e[k].strip()]
        if missing:
            t.violate("audit_incomplete", f"limit change at {e['ts']:.3f} without "
                      f"{' and '.join(missing)}", line=e["_line"], book=e.get("book"))
    return t.result()


#: Every check, in the order they are reported.
CHECKS: tuple[tuple[str, Callable[[History], CheckResult]], ...] = (
    ("history", check_history),
    ("positions", check_positions),
    ("unique_labels", check_unique_labels),
    ("lease", check_lease),
    ("recovery", check_recovery),
    ("journal", check_journal),
)


def check(history: History) -> Verdict:
    """Run every check over ``history``."""
    return Verdict(tuple(fn(history) for _, fn in CHECKS), history.path)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def render_verdict(verdict: Verdict, console: Any = None) -> None:
    """A table of the checks (PASS/FAIL, counts) and the first violations of each failure."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"bastion check {verdict.path or ''}".strip())
    for col in ("check", "result", "violations", "counts"):
        table.add_column(col)
    for c in verdict.checks:
        result = "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]"
        counts = ", ".join(f"{k}={_fmt(v)}" for k, v in c.counts.items()
                           if not isinstance(v, dict))  # nested ones: --json
        table.add_row(c.name, result, str(c.violation_count), counts)
    console.print(table)
    for c in verdict.checks:
        for v in c.violations:
            console.print(f"[red]{c.name}[/red] {v.code}: {v.detail}", highlight=False)
        if c.violation_count > len(c.violations):
            console.print(f"[red]{c.name}[/red] ... and {c.violation_count - len(c.violations)}"
                          " more")
    console.print("[green]PASS[/green]" if verdict.passed else
                  f"[red]FAIL[/red]: {', '.join(verdict.failed)}")
