"""Chaos scenarios: faults scheduled over time with a seed, Jepsen-nemesis style.

    name: mixed
    seed: 7
    duration_s: 60
    steps:
      - {at_s: 5, fault: kill-actor, target: {select: one, among: actors, match: "site-*/risk/*"},
         recovery_bound_s: 20}
      - {at_s: [10, 20], fault: pause, target: {among: actors}, hold_s: 3,
         repeat: 2, every_s: [5, 10]}
      - {at_s: 30, fault: venue-outage, target: {among: venues}, hold_s: 5}

A step: ``at_s`` (seconds from the start, or ``[lo, hi]``: a seeded draw), ``fault`` (a kind of
:data:`cluster.chaos.faults.FAULT_KINDS`), ``target`` — ``select`` one | minority (``max(1,
(n-1)//2)`` of n) | majority (``n//2 + 1``) | all | site (every candidate in one site: ``site``,
or a seeded pick), ``among`` actors | supervisors | nodes | sites | venues | streams, ``match``
(a glob on the candidate's name, or a list of globs) — ``params`` (the kind's, validated),
``hold_s`` (undo after this long; none: held to the end of the scenario, then undone),
``recovery_bound_s`` (the target must be back within this long of the injection; default the
hold plus the kind's ``recovery_s``), ``repeat`` and ``every_s`` (a number or ``[lo, hi]``).

Reproducible: :func:`plan` draws every time and target from ``random.Random(f"{seed}:{step}:
{rep}")`` over the sorted candidates, so the same seed and the same system give the same plan
(and adding a step changes no other step's draws). :class:`Runner` executes a plan against a
:class:`~cluster.chaos.context.ChaosContext`, in one loop: each injection at its time (a
verification delays the ones after it), each undo after its hold, and every recovery probe
polled until the target is back; it records ``fault``, ``fault_end`` and ``recovered`` events
into a :class:`~cluster.history.HistoryWriter` for ``bastion check``. Whatever happens (an
error, Ctrl-C), every undo still due runs before it returns. It refuses, before anything is
done, a context not marked non-production.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .context import AMONG, ChaosContext, ChaosError, require_non_production
from .faults import FAULT_KINDS, VERIFY_TIMEOUT_S, Injected, inject, params_of, units

log = logging.getLogger("bastion.chaos")

#: A recovery watch gives up this long after the bound (a late recovery is still recorded, so
#: the checker says ``recovered_late`` rather than ``not_recovered``).
WATCH_GRACE_S = 10.0
POLL_S = 0.05

Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Span = Seconds | tuple[Seconds, Seconds]


class ScenarioError(ValueError):
    """The scenario is invalid; the message names the field and the value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TargetSpec(_Frozen):
    select: Literal["one", "minority", "majority", "all", "site"] = "one"
    among: Literal["actors", "supervisors", "nodes", "sites", "venues", "streams"]
    match: str | tuple[str, ...] = "*"
    #: with ``select: site``: that site (default: a seeded pick among the candidates' sites)
    site: str | None = None

    @model_validator(mode="after")
    def _site_only_with_site(self) -> TargetSpec:
        if self.site is not None and self.select != "site":
            raise ValueError("site: only with select: site")
        return self

    def globs(self) -> tuple[str, ...]:
        return (self.match,) if isinstance(self.match, str) else self.match


class StepSpec(_Frozen):
    name: str | None = None
    at_s: Span
    fault: str
    target: TargetSpec
    params: dict[str, Any] = Field(default_factory=dict)
    hold_s: PositiveSeconds | None = None
    recovery_bound_s: PositiveSeconds | None = None
    repeat: int = Field(default=1, ge=1, le=1000)
    every_s: PositiveSeconds | tuple[PositiveSeconds, PositiveSeconds] | None = None


class Scenario(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    seed: int
    #: faults held to the end are undone then; the run ends once every watch is over
    duration_s: Seconds
    #: how long an injection may take to show its effect
    verify_timeout_s: PositiveSeconds = VERIFY_TIMEOUT_S
    steps: tuple[StepSpec, ...] = Field(min_length=1)


def _problems(exc: ValidationError, prefix: str = "") -> str:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg} (got {err.get('input')!r})" if loc else msg)
    return "; ".join(out)


def parse(raw: Any, source: str = "<scenario>") -> Scenario:
    """A validated scenario; :class:`ScenarioError` naming ``steps.N.field`` otherwise."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top, got "
                            f"{type(raw).__name__}")
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_problems(exc)}") from None
    for i, step in enumerate(scenario.steps):
        at = f"steps.{i}"
        kind = FAULT_KINDS.get(step.fault)
        if kind is None:
            raise ScenarioError(f"{source}: {at}.fault: unknown fault {step.fault!r}; known: "
                                f"{', '.join(FAULT_KINDS)}")
        if step.target.among not in kind.among:
            raise ScenarioError(f"{source}: {at}.target.among: {step.target.among!r} is not a "
                                f"target of {step.fault} (it takes {', '.join(kind.among)})")
        try:
            kind.params.model_validate(step.params)
        except ValidationError as exc:
            raise ScenarioError(f"{source}: {_problems(exc, f'{at}.params')}") from None
        for name in ("at_s", "every_s"):
            span = getattr(step, name)
            if isinstance(span, tuple) and span[0] > span[1]:
                raise ScenarioError(f"{source}: {at}.{name}: [lo, hi] needs lo <= hi, got "
                                    f"{list(span)}")
        if _lo(step.at_s) > scenario.duration_s:
            raise ScenarioError(f"{source}: {at}.at_s: {step.at_s} is after duration_s = "
                                f"{scenario.duration_s:g}")
        if step.repeat > 1 and step.every_s is None:
            raise ScenarioError(f"{source}: {at}.every_s: needed when repeat > 1 (repeat = "
                                f"{step.repeat})")
        if step.hold_s is not None and step.recovery_bound_s is not None and \
                step.recovery_bound_s < step.hold_s:
            raise ScenarioError(f"{source}: {at}.recovery_bound_s: {step.recovery_bound_s:g} "
                                f"is shorter than hold_s = {step.hold_s:g} (nothing comes back "
                                f"before the fault is undone)")
    return scenario


def load(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw, source=str(path))


def _lo(span: float | tuple[float, float]) -> float:
    return span[0] if isinstance(span, tuple) else span


def _draw(rng: random.Random, span: float | tuple[float, float]) -> float:
    return rng.uniform(*span) if isinstance(span, tuple) else float(span)


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class PlannedFault:
    """One scheduled injection: when, what, on which targets (resolved), for how long."""

    step: int
    rep: int
    at_s: float
    kind: str
    targets: tuple[str, ...]
    params: Mapping[str, Any]
    hold_s: float | None
    bound_s: float
    candidates: int  # of the step's kind (``among``), before ``match``
    name: str | None = None
    site: str | None = None
    among: str = ""
    match: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rep": self.rep, "at_s": round(self.at_s, 6),
                "fault": self.kind, "targets": list(self.targets), "params": dict(self.params),
                "hold_s": self.hold_s, "bound_s": self.bound_s, "candidates": self.candidates,
                "name": self.name, "site": self.site}

    def no_target(self) -> str:
        return (f"none of {self.candidates} {self.among} match {', '.join(self.match)}"
                + (f" in site {self.site}" if self.site else ""))


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    faults: tuple[PlannedFault, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "seed": self.scenario.seed,
                "duration_s": self.scenario.duration_s,
                "faults": [f.to_dict() for f in self.faults]}

    def render(self) -> str:
        s = self.scenario
        lines = [f"scenario {s.name} (seed {s.seed}, {s.duration_s:g} s, "
                 f"{len(self.faults)} injection(s))"]
        for f in self.faults:
            kind = FAULT_KINDS[f.kind]
            hold = ("no undo" if not kind.undoable(kind.params.model_validate(f.params)) else
                    "held to the end" if f.hold_s is None else f"hold {f.hold_s:g} s")
            who = ", ".join(f.targets) if f.targets else f"NO TARGET ({f.no_target()})"
            params = f" {dict(f.params)}" if f.params else ""
            lines.append(f"  t={f.at_s:8.3f} s  {f.kind:<26} {who}{params}  [{hold}, "
                         f"recovery within {f.bound_s:g} s]")
        return "\n".join(lines)


def select_count(select: str, n: int) -> int:
    """How many of ``n`` candidates a selection takes."""
    if n == 0:
        return 0
    return {"one": 1, "minority": max(1, (n - 1) // 2), "majority": n // 2 + 1,
            "all": n}[select]


def plan(scenario: Scenario, candidates: Callable[[str], Mapping[str, str | None]]) -> Plan:
    """Resolve every step's times and targets (see the module docstring). ``candidates(among)``
    gives the live targets, name -> site."""
    cache: dict[str, Mapping[str, str | None]] = {}
    out: list[PlannedFault] = []
    for i, step in enumerate(scenario.steps):
        among = step.target.among
        if among not in cache:
            cache[among] = dict(candidates(among))
        pool = sorted(n for n in cache[among]
                      if any(fnmatch.fnmatchcase(n, g) for g in step.target.globs()))
        kind = FAULT_KINDS[step.fault]
        at = 0.0
        for rep in range(step.repeat):
            rng = random.Random(f"{scenario.seed}:{i}:{rep}")
            at = _draw(rng, step.at_s) if rep == 0 else at + _draw(rng, step.every_s or 0.0)
            if at > scenario.duration_s:
                break
            chosen, site = _select(rng, step.target.select, step.target.site, pool,
                                   cache[among])
            bound = step.recovery_bound_s or (step.hold_s or 0.0) + kind.recovery_s
            out.append(PlannedFault(i, rep, at, step.fault, chosen, dict(step.params),
                                    step.hold_s, bound, len(cache[among]), step.name, site,
                                    among, step.target.globs()))
    out.sort(key=lambda f: (f.at_s, f.step, f.rep))
    return Plan(scenario, tuple(out))


def _select(rng: random.Random, select: str, site: str | None, pool: list[str],
            sites: Mapping[str, str | None]) -> tuple[tuple[str, ...], str | None]:
    if select == "site":
        known = sorted({s for n in pool if (s := sites.get(n)) is not None})
        if site is None:
            site = rng.choice(known) if known else None
        return tuple(n for n in pool if sites.get(n) == site and site is not None), site
    return tuple(sorted(rng.sample(pool, select_count(select, len(pool))))), None


# ---------------------------------------------------------------------------------- runner
@dataclass
class _Active:
    fault_id: str
    planned: PlannedFault
    injected: Injected
    started_mono: float
    undone: bool = False


@dataclass
class RunReport:
    """What a run did: every injection, undo and recovery (as recorded), and every error."""

    plan: Plan
    injected: list[dict[str, Any]] = field(default_factory=list)
    undone: list[dict[str, Any]] = field(default_factory=list)
    recovered: list[dict[str, Any]] = field(default_factory=list)
    not_recovered: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.not_recovered

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "injected": self.injected, "undone": self.undone,
                "recovered": self.recovered, "not_recovered": self.not_recovered,
                "errors": self.errors, "ok": self.ok}


class Runner:
    """Executes a plan against a context (see the module docstring). ``history``: where the
    ``fault`` / ``fault_end`` / ``recovered`` events go; ``watch``: poll recovery probes;
    ``clock`` / ``sleep``: monotonic seconds and the wait (tests pass fakes); ``say``: one
    line per action (default: the log)."""

    def __init__(self, ctx: ChaosContext, *, history: Any = None, watch: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = POLL_S,
                 say: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.history = history
        self.watch = watch
        self._clock = clock
        self._sleep = sleep
        self._poll_s = poll_s
        self._say = say or log.info
        self._ids = itertools.count(1)

    def run(self, what: Scenario | Plan) -> RunReport:
        require_non_production(self.ctx.environment, getattr(self.ctx, "source", "the system"))
        the_plan = what if isinstance(what, Plan) else plan(what, self.ctx.candidates)
        scenario = the_plan.scenario
        report = RunReport(the_plan)
        queue: list[tuple[float, int, str, Any]] = []
        seq = itertools.count()
        for pf in the_plan.faults:
            heapq.heappush(queue, (pf.at_s, next(seq), "inject", pf))
        active: list[_Active] = []
        watches: list[_Active] = []
        t0 = self._clock()
        ended = False
        try:
            while True:
                now = self._clock() - t0
                while queue and queue[0][0] <= now:
                    _, _, action, item = heapq.heappop(queue)
                    if action == "inject":
                        for a in self._inject(item, scenario, report):
                            active.append(a)
                            if a.injected.undo is not None and a.planned.hold_s is not None:
                                heapq.heappush(queue, (self._clock() - t0 + a.planned.hold_s,
                                                       next(seq), "undo", a))
                            if self.watch and a.injected.recovered is not None:
                                watches.append(a)
                    else:
                        self._undo(item, report)
                    now = self._clock() - t0
                watches = [w for w in watches if not self._poll(w, report)]
                if not queue and now >= scenario.duration_s and not ended:
                    ended = True
                    for a in active:  # held to the end
                        self._undo(a, report)
                if ended and not watches:
                    return report
                wait = self._poll_s if not queue else min(self._poll_s, queue[0][0] - now)
                if not queue and not ended:
                    wait = min(wait, scenario.duration_s - now)
                self._sleep(max(0.0, wait))
        finally:
            for a in active:  # an error or Ctrl-C: leave nothing broken behind
                self._undo(a, report)
            if self.history is not None:
                self.history.flush()

    # -- actions ------------------------------------------------------------------------------
    def _inject(self, pf: PlannedFault, scenario: Scenario, report: RunReport) -> list[_Active]:
        if not pf.targets:
            report.errors.append(f"step {pf.step} ({pf.kind}) at {pf.at_s:.3f} s: no target "
                                 f"({pf.no_target()})")
            self._say(report.errors[-1])
            return []
        out = []
        for unit in units(pf.kind, pf.targets):
            target = ",".join(unit)
            try:
                injected = inject(self.ctx, pf.kind, unit, params_of(pf.kind, pf.params),
                                  verify_timeout_s=scenario.verify_timeout_s)
            except ChaosError as exc:
                report.errors.append(f"step {pf.step} ({pf.kind}) on {target}: {exc}")
                self._say(report.errors[-1])
                continue
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the error is reported
                report.errors.append(f"step {pf.step} ({pf.kind}) on {target}: "
                                     f"{type(exc).__name__}: {exc}")
                self._say(report.errors[-1])
                continue
            rec = injected.record
            fault_id = f"{scenario.name}-{next(self._ids):03d}-{pf.kind}-{_token()}"
            if self.history is not None:
                self.history.fault(pf.kind, rec.target, pf.bound_s, id=fault_id, ts=rec.wall_s,
                                   scenario=scenario.name, seed=scenario.seed, step=pf.step,
                                   rep=pf.rep, targets=list(unit), params=dict(pf.params),
                                   hold_s=pf.hold_s, pids=list(rec.pids), nodes=list(rec.nodes),
                                   evidence=dict(rec.evidence))
            report.injected.append({"id": fault_id, **rec.to_dict(), "bound_s": pf.bound_s})
            self._say(f"inject {pf.kind} on {rec.target}: {dict(rec.evidence)}")
            out.append(_Active(fault_id, pf, injected, self._clock(),
                               undone=injected.undo is None))
        return out

    def _undo(self, a: _Active, report: RunReport) -> None:
        if a.undone:
            return
        a.undone = True
        assert a.injected.undo is not None
        try:
            rec = a.injected.undo()
        except Exception as exc:  # noqa: BLE001 - reported; the other undos still run
            report.errors.append(f"undo of {a.fault_id} on {a.injected.record.target}: "
                                 f"{type(exc).__name__}: {exc}")
            self._say(report.errors[-1])
            return
        if self.history is not None:
            self.history.append("fault_end", fault_id=a.fault_id, ts=rec.wall_s,
                                kind=rec.kind, target=rec.target, evidence=dict(rec.evidence))
        report.undone.append({"id": a.fault_id, **rec.to_dict()})
        self._say(f"undo {rec.kind} on {rec.target}: {dict(rec.evidence)}")

    def _poll(self, a: _Active, report: RunReport) -> bool:
        """True when the watch is over (recovered, or given up). A link fault is watched from
        its undo on (``FaultKind.watch_from_undo``): before it the links may still look fine,
        a partition takes a moment to be noticed."""
        assert a.injected.recovered is not None
        if not a.undone and FAULT_KINDS[a.planned.kind].watch_from_undo:
            return False
        try:
            back = a.injected.recovered()
        except Exception:  # noqa: BLE001 - not back yet (the target may be restarting)
            back = False
        now = self._clock()
        if back:
            wall = time.time()
            took = wall - a.injected.record.wall_s
            if self.history is not None:
                self.history.recovered(a.fault_id, ts=wall, took_s=took,
                                       target=a.injected.record.target)
            report.recovered.append({"id": a.fault_id, "target": a.injected.record.target,
                                     "took_s": took, "bound_s": a.planned.bound_s})
            self._say(f"recovered {a.planned.kind} on {a.injected.record.target} after "
                      f"{took:.3f} s (bound {a.planned.bound_s:g} s)")
            return True
        if now - a.started_mono > a.planned.bound_s + WATCH_GRACE_S:
            report.not_recovered.append(f"{a.fault_id} ({a.planned.kind} on "
                                        f"{a.injected.record.target}): not back within "
                                        f"{a.planned.bound_s:g} s")
            self._say(report.not_recovered[-1])
            return True
        return False


def _token() -> str:
    import uuid

    return uuid.uuid4().hex[:6]


def one_shot(kind: str, among: str, names: list[str], *, params: Mapping[str, Any] | None = None,
             hold_s: float | None = None, bound_s: float | None = None) -> Scenario:
    """A one-step scenario that hits exactly ``names`` (``bastion chaos kill-actor PATH``):
    the fault at once, undone after ``hold_s`` (none: at once when there is an undo)."""
    if among not in AMONG:
        raise ScenarioError(f"among = {among!r}: must be one of {', '.join(AMONG)}")
    step = {"at_s": 0.0, "fault": kind, "params": dict(params or {}),
            "target": {"select": "all", "among": among,
                       "match": [_literal(n) for n in names]}}
    if hold_s is not None:
        step["hold_s"] = hold_s
    if bound_s is not None:
        step["recovery_bound_s"] = bound_s
    return parse({"name": f"oneshot-{kind}", "seed": 0, "steps": [step],
                  "duration_s": hold_s if hold_s is not None else 0.0},
                 source=f"bastion chaos {kind}")


def _literal(name: str) -> str:
    """A glob that matches ``name`` only."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
