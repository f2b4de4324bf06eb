"""The one place the supervisor touches Ray: create, find, kill, watch actors; list nodes.

Everything else in ``supervisors`` is plain Python (policy, placement, bookkeeping).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._child import WATCH_GROUP, supervised_class
from ._policy import ABNORMAL, NORMAL
from .spec import ChildSpec, resolve_class

#: A child's long poll returns after this long and is re-issued (a death fails it at once).
WATCH_POLL_S = 30.0
HEAD_RESOURCE = "node:__internal_head__"
NODE_NAME_LABEL = "bastion-node"

_remote_classes: dict[Any, Any] = {}


@dataclass(frozen=True)
class NodeView:
    """A Ray node as placement sees it."""

    node_id: str
    name: str
    alive: bool
    is_head: bool
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Death:
    """How a child ended, as learnt from its failed watch call."""

    kind: str  # NORMAL or ABNORMAL
    reason: str
    node_died: bool = False


def list_nodes() -> list[NodeView]:
    views = []
    for n in ray.nodes():
        labels = dict(n.get("Labels") or {})
        resources = dict(n.get("Resources") or {})
        views.append(NodeView(
            node_id=n["NodeID"], name=labels.get(NODE_NAME_LABEL, n["NodeID"][:8]),
            alive=bool(n.get("Alive")), is_head=HEAD_RESOURCE in resources,
            labels=labels, resources=resources,
        ))
    return views


def remote_class(cls_ref: Any) -> Any:
    """The ``ray.remote`` form of a user's class with the supervision mixin (cached)."""
    key = cls_ref if isinstance(cls_ref, str) else id(cls_ref)
    remote = _remote_classes.get(key)
    if remote is None:
        user_cls = resolve_class(cls_ref)
        remote = ray.remote(concurrency_groups={WATCH_GROUP: 4})(supervised_class(user_cls))
        _remote_classes[key] = remote
    return remote


def scheduling(node_id: str | None, *, soft: bool = False) -> dict[str, Any]:
    if node_id is None:
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)}


def create_worker(spec: ChildSpec, name: str, namespace: str, ctx: Any,
                  node_id: str | None) -> Any:
    options: dict[str, Any] = dict(
        name=name, namespace=namespace, lifetime="detached", max_restarts=0,
        num_cpus=spec.num_cpus,
        **scheduling(node_id),
    )
    if spec.resources:
        options["resources"] = dict(spec.resources)
    if spec.max_concurrency:
        options["max_concurrency"] = spec.max_concurrency
    return remote_class(spec.cls).options(**options).remote(ctx, *spec.args, **dict(spec.kwargs))


def create_supervisor(actor_cls: Any, name: str, namespace: str, node_id: str | None,
                      *, root: bool, args: tuple[Any, ...]) -> Any:
    return actor_cls.options(
        name=name, namespace=namespace, lifetime="detached",
        # The root has no parent to restart it: Ray does, and it re-adopts its children.
        max_restarts=-1 if root else 0,
        # Pinned to the head: supervisors outlive the loss of any worker node (the head is
        # Ray's control plane; losing it loses the cluster anyway).
        num_cpus=0, **scheduling(node_id, soft=False),
    ).remote(*args)


def get_named(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def kill(handle: Any) -> None:
    with contextlib.suppress(Exception):  # already gone is fine
        ray.kill(handle, no_restart=True)


async def wait_name_free(name: str, namespace: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if get_named(name, namespace) is None:
            return True
        await asyncio.sleep(0.02)
    return False


async def call(ref: Any, timeout_s: float) -> Any:
    """Await an ObjectRef with a timeout (raises asyncio.TimeoutError)."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


def classify_death(exc: BaseException) -> Death:
    text = str(exc)
    if "INTENDED_USER_EXIT" in text or "exit_actor()" in text:
        return Death(NORMAL, "exited normally")
    node_died = "node" in text.lower() and ("died" in text.lower() or "dead" in text.lower()) \
        and "worker process has died" not in text
    first = next((ln.strip() for ln in text.splitlines()
                  if "exit detail" in ln.lower() or "because" in ln.lower()), "")
    reason = first or text.splitlines()[0] if text else type(exc).__name__
    return Death(ABNORMAL, reason[:300], node_died=node_died)


async def watch(handle: Any, *, poll_s: float = WATCH_POLL_S) -> Death:
    """Return when the actor behind ``handle`` is dead, saying how it died."""
    exiting = False
    transient_errors = 0
    while True:
        try:
            if exiting:  # let the exit complete: a pending call would hold it up
                await asyncio.sleep(0.05)
            ref = handle.__bastion_watch__.remote(poll_s if not exiting else 0.0)
            result = await ref
        except ActorDiedError as exc:
            death = classify_death(exc)
            if exiting and death.kind == ABNORMAL and not death.node_died:
                return Death(NORMAL, "exited normally")
            return death
        except RayActorError as exc:  # e.g. ActorUnavailableError: transient; retry a bit
            transient_errors += 1
            if transient_errors > 50:
                return Death(ABNORMAL, f"unreachable: {exc}"[:300])
            await asyncio.sleep(0.1)
            continue
        except Exception as exc:  # noqa: BLE001 - the watch itself failed; count and retry
            transient_errors += 1
            if transient_errors > 50:
                return Death(ABNORMAL, f"watch failed: {exc}"[:300])
            await asyncio.sleep(0.1)
            continue
        if result == "exiting":
            exiting = True


__all__ = [
    "ActorDiedError", "GetTimeoutError", "NodeView", "Death", "list_nodes", "create_worker",
    "create_supervisor", "get_named", "kill", "wait_name_free", "call", "watch",
]
