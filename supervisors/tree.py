"""The driver-side API: ``start_tree`` and the :class:`Tree` handle.

A tree is a set of named, detached Ray actors in one namespace: the supervisors (named by their
paths, the root by its id) and their children (named by their paths, e.g. ``root/sub/x``).
The tree therefore outlives the driver that started it; :func:`attach_tree` finds it again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from . import _ray
from ._supervisor import StartError, SupervisorActor
from .spec import AnySpec, SpecError, SupervisorSpec, validate

DEFAULT_CALL_TIMEOUT_S = 120.0
STORE_URL_ENV = "BASTION_STORE_URL"

_supervisor_remote: Any = None


def supervisor_remote_class() -> Any:
    global _supervisor_remote
    if _supervisor_remote is None:
        _supervisor_remote = ray.remote(SupervisorActor)
    return _supervisor_remote


def default_store_url() -> str:
    """``$BASTION_STORE_URL``, else SQLite under ``~/.bastion/journal`` (shared by local nodes).

    For a cluster that spans machines, point every node at Redis with one line:
    ``BASTION_STORE_URL=redis://host:6379/0``.
    """
    url = os.environ.get(STORE_URL_ENV)
    if url:
        return url
    return f"sqlite://{Path.home() / '.bastion' / 'journal'}"


@dataclass(frozen=True)
class ChildInfo:
    """One child as its supervisor sees it. ``actor_name`` resolves with ``ray.get_actor``."""

    id: str
    status: str  # "running" | "restarting" | "stopped" | "failed" (also "starting")
    restarts: int
    actor_name: str
    node_id: str | None
    pid: int | None
    incarnation: int = 0
    last_failure: str | None = None
    started_at: float | None = None
    is_supervisor: bool = False
    dynamic: bool = False
    restart: str = "permanent"
    migrations: int = 0  # planned moves off a node (drain / rebalance); not restarts
    exited_at: float | None = None  # when its supervisor learned of its last death


class TreeError(RuntimeError):
    """A tree operation failed; the message names the path."""


class Tree:
    """A handle on a running supervision tree (cheap; holds only names)."""

    def __init__(self, root_id: str, namespace: str, store_url: str) -> None:
        self.root_id = root_id
        self.namespace = namespace
        self.store_url = store_url

    def __repr__(self) -> str:
        return f"Tree({self.root_id!r}, namespace={self.namespace!r})"

    # ---------------------------------------------------------------- queries
    def status(self, timeout_s: float = 30.0) -> str:
        """``"running"`` | ``"failed"`` | ``"stopped"``."""
        root = _ray.get_named(self.root_id, self.namespace)
        if root is None:
            return "stopped"
        return ray.get(root.status.remote(), timeout=timeout_s)

    def children(self, supervisor_path: str | None = None,
                 timeout_s: float = 30.0) -> list[ChildInfo]:
        """The children of a supervisor (default: the root), in spec order."""
        sup = self._supervisor(supervisor_path or self.root_id)
        return [ChildInfo(**c) for c in ray.get(sup.children.remote(), timeout=timeout_s)]

    def child(self, path: str, timeout_s: float = 30.0) -> ChildInfo:
        parent, _, cid = path.rpartition("/")
        for info in self.children(parent, timeout_s=timeout_s):
            if info.id == cid:
                return info
        raise TreeError(f"{path}: no such child")

    def actor(self, path: str, timeout_s: float = 30.0) -> Any:
        """The current Ray actor handle of the child at ``path`` (waits while it restarts)."""
        deadline = time.monotonic() + timeout_s
        while True:
            handle = _ray.get_named(path, self.namespace)
            if handle is not None:
                return handle
            if time.monotonic() > deadline:
                raise TreeError(f"{path}: no running actor after {timeout_s:g} s")
            time.sleep(0.02)

    def describe(self, timeout_s: float = 30.0) -> dict[str, Any]:
        root = self._supervisor(self.root_id)
        return ray.get(root.describe.remote(), timeout=timeout_s)

    # ---------------------------------------------------------------- changes
    def start_child(self, supervisor_path: str, spec: AnySpec,
                    timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> ChildInfo:
        """Add a dynamic child under ``supervisor_path``; returns once it is running."""
        validate(spec, supervisor_path)
        sup = self._supervisor(supervisor_path)
        return ChildInfo(**ray.get(sup.start_child.remote(spec), timeout=timeout_s))

    def terminate_child(self, path: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        """Stop the child at ``path`` (orderly); it stays stopped, whatever its restart type."""
        parent, _, cid = path.rpartition("/")
        if not parent:
            raise TreeError(f"{path}: the root cannot be terminated; use stop()")
        ray.get(self._supervisor(parent).terminate_child.remote(cid), timeout=timeout_s)

    def node_down(self, node_id: str, reason: str = "reported down") -> list[str]:
        """Tell every supervisor of the tree that a node is gone (a node-death signal)."""
        moved: list[str] = []
        for path in self._supervisor_paths():
            sup = _ray.get_named(path, self.namespace)
            if sup is not None:
                moved += ray.get(sup.node_down.remote(node_id, reason), timeout=30.0)
        return moved

    def drain_node(self, node_id: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> list[str]:
        """Move every child of the tree off ``node_id`` (orderly: graceful stop, start
        elsewhere with its state; no restart and no failure recorded) and place nothing there
        until ``node_up``: what a node being removed needs. Returns the paths moved."""
        moved: list[str] = []
        for path in self._supervisor_paths():
            sup = _ray.get_named(path, self.namespace)
            if sup is not None:
                moved += ray.get(sup.drain_node.remote(node_id), timeout=timeout_s)
        return moved

    def move_child(self, path: str, avoid: list[str] | None = None,
                   timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> ChildInfo:
        """Move the child at ``path`` to another node (a rebalance), as ``drain_node`` does."""
        parent, _, cid = path.rpartition("/")
        return ChildInfo(**ray.get(self._supervisor(parent).move_child.remote(cid, avoid),
                                   timeout=timeout_s))

    def node_up(self, node_id: str) -> None:
        """Make ``node_id`` placeable again for every supervisor of the tree."""
        for path in self._supervisor_paths():
            sup = _ray.get_named(path, self.namespace)
            if sup is not None:
                ray.get(sup.node_up.remote(node_id), timeout=30.0)

    def stop(self, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        """Orderly shutdown: children stop in reverse start order, depth first."""
        root = _ray.get_named(self.root_id, self.namespace)
        if root is None:
            return
        try:
            ray.get(root.stop.remote(), timeout=timeout_s)
        finally:
            _ray.kill(root)
            _wait_gone(self.root_id, self.namespace, 30.0)

    # ---------------------------------------------------------------- internals
    def _supervisor(self, path: str) -> Any:
        sup = _ray.get_named(path, self.namespace)
        if sup is None:
            raise TreeError(f"{path}: no running supervisor in namespace {self.namespace!r}")
        return sup

    def _supervisor_paths(self) -> list[str]:
        paths = []

        def walk(node: dict[str, Any]) -> None:
            paths.append(node["path"])
            for child in node.get("children", []):
                if "tree" in child and "path" in child["tree"]:
                    walk(child["tree"])

        walk(self.describe())
        return paths


def start_tree(spec: SupervisorSpec, namespace: str = "bastion", *,
               store_url: str | None = None,
               timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> Tree:
    """Start a supervision tree after ``ray.init()``; returns once every child is up.

    Raises :class:`SpecError` for an invalid spec (nothing starts) and :class:`StartError`
    when a child's constructor fails at first start (everything started is stopped again).
    """
    if not isinstance(spec, SupervisorSpec):
        raise SpecError("<root>", "spec", spec, "the root must be a SupervisorSpec")
    validate(spec)
    if not ray.is_initialized():
        raise TreeError("call ray.init() before start_tree()")
    store_url = store_url or default_store_url()
    from .journal import open_store

    open_store(store_url).close()  # a bad URL fails here, before any actor exists
    if _ray.get_named(spec.id, namespace) is not None:
        raise TreeError(f"a tree with root {spec.id!r} is already running in namespace "
                        f"{namespace!r}; attach_tree() it or stop it first")
    head = next((n.node_id for n in _ray.list_nodes() if n.alive and n.is_head), None)
    root = _ray.create_supervisor(
        supervisor_remote_class(), spec.id, namespace, head, root=True,
        args=(spec, spec.id, namespace, store_url, spec.id, True))
    try:
        ray.get(root.start.remote(), timeout=timeout_s)
    except BaseException as exc:
        _ray.kill(root)
        _wait_gone(spec.id, namespace, 30.0)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, StartError):
            raise StartError(cause.path, cause.reason) from None
        if isinstance(exc, ray.exceptions.RayTaskError) and "StartError" in str(exc):
            raise StartError(spec.id, _last_line(str(exc))) from None
        raise
    return Tree(spec.id, namespace, store_url)


def attach_tree(root_id: str, namespace: str = "bastion", *,
                store_url: str | None = None) -> Tree:
    """A handle on a tree started elsewhere (e.g. by ``bastion`` in another process)."""
    if _ray.get_named(root_id, namespace) is None:
        raise TreeError(f"no tree with root {root_id!r} in namespace {namespace!r}")
    return Tree(root_id, namespace, store_url or default_store_url())


def _wait_gone(name: str, namespace: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _ray.get_named(name, namespace) is not None:
        time.sleep(0.02)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text
