"""Supervision policy as data: child and supervisor specs, validated before anything starts.

As in OTP's ``supervisor.erl``, a spec is checked as a whole at start and a bad value fails with
a message naming the field and the value (``SpecError``). Specs are frozen and picklable: the
supervisor actors receive them as plain data.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]

STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")
BRUTAL_KILL = "brutal_kill"
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class SpecError(ValueError):
    """A child or supervisor spec is invalid. The message names the path, field and value."""

    def __init__(self, path: str, field_name: str, value: object, why: str) -> None:
        self.path = path
        self.field = field_name
        self.value = value
        super().__init__(f"{path}: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class Placement:
    """Where a child may run.

    ``site``: only nodes whose ``site`` label equals this (``None``: any site).
    ``labels``: further label equalities every candidate node must have.
    ``anti_affinity``: a group name; two children of one tree in the same group never share a
    node (a risk book's replica and its primary).
    ``preferred_nodes``: node names (label ``bastion-node``) or Ray node ids tried first.
    """

    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    anti_affinity: str | None = None
    preferred_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backoff:
    """Restart delay per child: the n-th quick consecutive restart waits
    ``min(max_s, initial_s * multiplier**(n-2)) * uniform(1 - jitter, 1 + jitter)`` for n >= 2;
    the first restart is immediate (as in OTP). A child that stays up for ``reset_after_s``
    starts again from n = 1."""

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0
    jitter: float = 0.2
    reset_after_s: float = 10.0


@dataclass(frozen=True)
class ChildSpec:
    """A worker child: one Ray actor made by the supervisor from ``cls``.

    ``cls`` is a class or ``"module:Class"``; ``shutdown_s`` is the grace for ``on_stop()``
    before the actor is killed, or ``"brutal_kill"`` (also ``0``) to kill at once.
    """

    id: str
    cls: Any
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    restart: RestartType = "permanent"
    shutdown_s: float | str = 5.0
    placement: Placement = field(default_factory=Placement)
    backoff: Backoff = field(default_factory=Backoff)
    num_cpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    max_concurrency: int | None = None

    @property
    def is_supervisor(self) -> bool:
        return False


@dataclass(frozen=True)
class SupervisorSpec:
    """A supervisor: a strategy, a restart intensity and its children (workers or supervisors).

    More than ``intensity`` restarts within ``period_s`` (a sliding window) make the supervisor
    give up: it stops its children in reverse order and fails, and its parent handles that.
    """

    id: str
    strategy: Strategy = "one_for_one"
    intensity: int = 1
    period_s: float = 5.0
    children: tuple[ChildSpec | SupervisorSpec, ...] = ()
    restart: RestartType = "permanent"
    shutdown_s: float | str = 30.0
    placement: Placement = field(default_factory=Placement)
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        # Accept a list for convenience; keep the frozen spec hashable-ish and immutable.
        object.__setattr__(self, "children", tuple(self.children))

    @property
    def is_supervisor(self) -> bool:
        return True


AnySpec = ChildSpec | SupervisorSpec


def resolve_class(cls: Any, path: str = "?") -> type:
    """Import ``"module:Class"`` (or accept a class); refuse anything that is not a class."""
    if isinstance(cls, str):
        module_name, sep, attr = cls.partition(":")
        if not sep or not module_name or not attr:
            raise SpecError(path, "cls", cls, "expected 'module:Class'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is a spec error
            raise SpecError(path, "cls", cls, f"cannot import module: {exc}") from exc
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            raise SpecError(path, "cls", cls, f"module has no attribute {attr!r}") from exc
        cls = obj
    # A class already wrapped by @ray.remote: take the user class back out of it.
    inner = getattr(cls, "__ray_metadata__", None)
    if inner is not None and hasattr(inner, "modified_class"):
        cls = inner.modified_class.__bases__[0] if inner.modified_class.__bases__ else cls
    if not inspect.isclass(cls):
        raise SpecError(path, "cls", cls, "is not a class; an actor must be a class")
    return cls


def class_ref(cls: Any) -> str | Any:
    """A picklable reference to an actor class: ``"module:Class"`` when importable."""
    if isinstance(cls, str):
        return cls
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", "")
    if module and module != "__main__" and "<locals>" not in qualname:
        return f"{module}:{qualname}"
    return cls


def _check_number(path: str, name: str, value: object, *, positive: bool, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
            math.isinf(value):
        raise SpecError(path, name, value, "must be a finite number")
    if value < 0 or (value == 0 and not allow_zero) or (positive and value <= 0 and not allow_zero):
        raise SpecError(path, name, value, "must be > 0" if not allow_zero else "must be >= 0")


def _check_shutdown(path: str, value: object) -> None:
    if value == BRUTAL_KILL:
        return
    _check_number(path, "shutdown_s", value, positive=False, allow_zero=True)


def _check_backoff(path: str, b: Backoff) -> None:
    for name in ("initial_s", "max_s", "reset_after_s"):
        _check_number(path, f"backoff.{name}", getattr(b, name), positive=False, allow_zero=True)
    _check_number(path, "backoff.multiplier", b.multiplier, positive=True, allow_zero=False)
    if b.multiplier < 1:
        raise SpecError(path, "backoff.multiplier", b.multiplier, "must be >= 1")
    if not 0 <= b.jitter <= 1:
        raise SpecError(path, "backoff.jitter", b.jitter, "must be within [0, 1]")


def _check_common(path: str, spec: AnySpec) -> None:
    if not isinstance(spec.id, str) or not _ID_RE.match(spec.id):
        raise SpecError(path, "id", spec.id, "must be a non-empty string of [A-Za-z0-9_.-]")
    if spec.restart not in RESTART_TYPES:
        raise SpecError(path, "restart", spec.restart, f"must be one of {RESTART_TYPES}")
    _check_shutdown(path, spec.shutdown_s)
    if not isinstance(spec.placement, Placement):
        raise SpecError(path, "placement", spec.placement, "must be a Placement")
    if not isinstance(spec.backoff, Backoff):
        raise SpecError(path, "backoff", spec.backoff, "must be a Backoff")
    _check_backoff(path, spec.backoff)


def validate(spec: AnySpec, parent_path: str = "", *, check_classes: bool = True) -> None:
    """Check a whole tree; raise :class:`SpecError` on the first bad field."""
    if not isinstance(spec, (ChildSpec, SupervisorSpec)):
        raise SpecError(parent_path or "<root>", "spec", spec,
                        "must be a ChildSpec or SupervisorSpec")
    path = f"{parent_path}/{spec.id}" if parent_path else str(spec.id)
    _check_common(path, spec)
    if isinstance(spec, ChildSpec):
        validate_child_class(spec, path, check_classes=check_classes)
        _check_number(path, "num_cpus", spec.num_cpus, positive=False, allow_zero=True)
        if not isinstance(spec.args, tuple):
            raise SpecError(path, "args", spec.args, "must be a tuple")
        if not isinstance(spec.kwargs, Mapping):
            raise SpecError(path, "kwargs", spec.kwargs, "must be a mapping")
        return
    if spec.strategy not in STRATEGIES:
        raise SpecError(path, "strategy", spec.strategy, f"must be one of {STRATEGIES}")
    if isinstance(spec.intensity, bool) or not isinstance(spec.intensity, int) or \
            spec.intensity < 0:
        raise SpecError(path, "intensity", spec.intensity, "must be an integer >= 0")
    _check_number(path, "period_s", spec.period_s, positive=True, allow_zero=False)
    seen: set[str] = set()
    for child in spec.children:
        cid = getattr(child, "id", None)
        if cid in seen:
            raise SpecError(f"{path}/{cid}", "id", cid, "duplicate child id")
        seen.add(cid)
        validate(child, path, check_classes=check_classes)


def validate_child_class(spec: ChildSpec, path: str, *, check_classes: bool = True) -> None:
    if not check_classes:
        return
    cls = resolve_class(spec.cls, path)
    if cls.__init__ is object.__init__ and (spec.args or spec.kwargs):
        raise SpecError(path, "args", spec.args, f"{cls.__name__} takes no constructor arguments")
    try:
        inspect.signature(cls).bind(*spec.args, **dict(spec.kwargs))
    except TypeError as exc:
        raise SpecError(path, "args/kwargs", (spec.args, dict(spec.kwargs)),
                        f"do not fit {cls.__name__}{inspect.signature(cls)}: {exc}") from exc
    except ValueError:
        pass  # no introspectable signature (builtins): let the constructor decide


def join_path(parent: str, child_id: str) -> str:
    return f"{parent}/{child_id}" if parent else child_id
