"""What the supervisor adds to a user's actor class: a context, a death watch, a stop hook.

The supervisor never changes the user's class; it makes a subclass that mixes in three methods,
all in their own concurrency group so they run beside the user's calls:

* ``__bastion_info__`` — pid, node id and incarnation (also the readiness check).
* ``__bastion_watch__`` — a long poll the supervisor keeps outstanding on every child. When the
  worker dies the pending call fails at once with ``ActorDiedError`` (7–11 ms after SIGKILL),
  which is how the supervisor learns of a death without polling. It returns early when the
  actor has called ``exit_actor()``: a pending call that never returns would block that exit
  (RAY_ZMQ_NOTES.md).
* ``__bastion_stop__`` — calls the user's ``on_stop()`` for a graceful shutdown.
* ``__bastion_started__`` — calls the user's ``on_started()`` once the child is up (OTP's
  ``handle_continue``): background work starts on the actor's own event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

WATCH_GROUP = "bastion"
EXIT_POLL_S = 0.02

_CONTEXT: SupervisedContext | None = None


@dataclass(frozen=True)
class SupervisedContext:
    """Who this actor is in its tree; handed to the actor by its supervisor."""

    path: str
    namespace: str
    incarnation: int
    store_url: str
    tree: str

    @property
    def stream(self) -> str:
        """The journal stream of a stateful child."""
        return f"{self.namespace}/{self.path}"


def current_context() -> SupervisedContext | None:
    """The context of the supervised actor running in this process (None elsewhere)."""
    return importlib.import_module("supervisors._child")._CONTEXT


def _should_exit() -> bool:
    import ray

    worker = ray._private.worker.global_worker
    return bool(worker.core_worker.get_current_actor_should_exit())


def _info(self: Any) -> dict[str, Any]:
    import ray

    ctx = current_context()
    return {
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "incarnation": ctx.incarnation if ctx else 0,
        "started_at": getattr(self, "_bastion_started_at", None),
    }


class _SyncMixin:
    def __bastion_info__(self) -> dict[str, Any]:
        return _info(self)

    def __bastion_watch__(self, timeout_s: float) -> str:
        event = self.__dict__.setdefault("_bastion_exit_event", threading.Event())
        deadline = time.monotonic() + timeout_s
        while True:
            if _should_exit() or event.is_set():
                return "exiting"
            if time.monotonic() >= deadline:
                return "alive"
            event.wait(EXIT_POLL_S)

    def __bastion_stop__(self) -> bool:
        hook = getattr(self, "on_stop", None)
        if hook is None:
            return False
        result = hook()
        if inspect.isawaitable(result):  # an async on_stop on a sync actor: run it here
            asyncio.run(result)  # pragma: no cover - unusual
        return True


def _started_sync(self: Any) -> None:
    hook = getattr(self, "on_started", None)
    if hook is not None:
        result = hook()
        if inspect.isawaitable(result):
            asyncio.run(result)  # pragma: no cover - unusual


async def _started_async(self: Any) -> None:
    hook = getattr(self, "on_started", None)
    if hook is not None:
        result = hook()
        if inspect.isawaitable(result):
            await result


class _AsyncMixin:
    async def __bastion_info__(self) -> dict[str, Any]:
        return _info(self)

    async def __bastion_watch__(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            if _should_exit():
                return "exiting"
            if time.monotonic() >= deadline:
                return "alive"
            await asyncio.sleep(EXIT_POLL_S)

    async def __bastion_stop__(self) -> bool:
        hook = getattr(self, "on_stop", None)
        if hook is None:
            return False
        result = hook()
        if inspect.isawaitable(result):
            await result
        return True


def is_async_class(cls: type) -> bool:
    return any(
        inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
        for _, member in inspect.getmembers(cls, predicate=inspect.isfunction)
    )


def supervised_class(user_cls: type) -> type:
    """A subclass of ``user_cls`` with the context, watch and stop methods mixed in."""
    import ray

    from .stateful import EventSourced

    mixin = _AsyncMixin if is_async_class(user_cls) else _SyncMixin

    def __init__(self: Any, __bastion_ctx: SupervisedContext, *args: Any, **kwargs: Any) -> None:
        # This function travels to the worker by value (cloudpickle), with a copy of this
        # module's globals: set the context on the real module, imported there.
        importlib.import_module("supervisors._child")._CONTEXT = __bastion_ctx
        self._bastion_started_at = time.time()
        user_cls.__init__(self, *args, **kwargs)
        if isinstance(self, EventSourced):
            # Rebuilt from snapshot + journal tail before the actor answers any call.
            self._bastion_recover(__bastion_ctx)

    namespace: dict[str, Any] = {"__init__": __init__, "__module__": user_cls.__module__,
                                 "__qualname__": user_cls.__qualname__}
    for name in ("__bastion_info__", "__bastion_watch__", "__bastion_stop__"):
        namespace[name] = ray.method(concurrency_group=WATCH_GROUP)(mixin.__dict__[name])
    # In the default group, like the user's methods: OTP's handle_continue, called by the
    # supervisor once the child is up, so an actor can start background work on its own loop.
    namespace["__bastion_started__"] = (_started_async if mixin is _AsyncMixin
                                        else _started_sync)
    if user_cls.__repr__ is object.__repr__:
        def __repr__(self: Any) -> str:
            ctx = current_context()
            where = f"{ctx.path}#{ctx.incarnation}" if ctx else "?"
            return f"{user_cls.__name__}({where})"
        namespace["__repr__"] = __repr__
    return type(user_cls.__name__, (user_cls,), namespace)
