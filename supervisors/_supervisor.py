"""The supervisor: one async Ray actor per SupervisorSpec, OTP semantics.

One control loop per supervisor takes events off one queue, one at a time, in order: child
exits (from the per-child watch tasks), delayed restarts, and commands (start, start_child,
terminate_child, stop, node_down). Nothing else changes the children, so there is exactly one
party restarting a child and no two decisions race.

Bookkeeping (children's incarnations, statuses, restart counts, dynamic children, the restart
history) is written to the store's key/value area after every change. A supervisor whose
process was SIGKILLed is restarted (by its parent, or by Ray for the root), finds that record,
and re-adopts its living children by name instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import cloudpickle

from . import _ray
from ._child import SupervisedContext
from ._policy import (
    ABNORMAL,
    NORMAL,
    BackoffState,
    RestartIntensity,
    restart_plan,
    should_restart,
    status_after_exit,
)
from .journal import open_store
from .metrics import TreeMetrics
from .placement import Candidate, PlacementError, choose_node
from .spec import BRUTAL_KILL, AnySpec, SupervisorSpec, join_path

log = logging.getLogger("bastion.supervisor")

START_TIMEOUT_S = 120.0
KILL_CONFIRM_S = 30.0


class StartError(RuntimeError):
    """A child could not be started at the tree's (or a dynamic child's) first start."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: failed to start: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (StartError, (self.path, self.reason))


@dataclass
class _Child:
    spec: AnySpec
    path: str
    dynamic: bool = False
    status: str = "stopped"
    incarnation: int = 0
    restarts: int = 0
    handle: Any = None
    node_id: str | None = None
    pid: int | None = None
    started_at: float | None = None
    last_failure: str | None = None
    expected_exit: bool = False
    watch_task: asyncio.Task | None = None
    backoff: BackoffState | None = None
    pending_restart: bool = False
    start_task: asyncio.Task | None = None
    migrations: int = 0  # planned moves (drain, rebalance): not restarts, not failures
    exited_at: float | None = None  # wall time this supervisor learned of its last death

    def info(self) -> dict[str, Any]:
        # "starting" is internal: to users a child not yet up is "restarting".
        status = "restarting" if self.status == "starting" else self.status
        return {
            "id": self.spec.id, "status": status, "restarts": self.restarts,
            "actor_name": self.path, "node_id": self.node_id, "pid": self.pid,
            "incarnation": self.incarnation, "last_failure": self.last_failure,
            "started_at": self.started_at, "is_supervisor": self.spec.is_supervisor,
            "dynamic": self.dynamic, "restart": self.spec.restart,
            "migrations": self.migrations, "exited_at": self.exited_at,
        }


@dataclass
class _Event:
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    future: asyncio.Future | None = None


class SupervisorActor:
    """A supervisor. Created by ``start_tree`` (the root) or by its parent supervisor."""

    def __init__(self, spec: SupervisorSpec, path: str, namespace: str, store_url: str,
                 tree: str, root: bool) -> None:
        self.spec = spec
        self.path = path
        self.namespace = namespace
        self.store_url = store_url
        self.tree = tree
        self.root = root
        self._store = open_store(store_url)
        self._key = f"sup/{namespace}/{path}"
        self._state = "idle"
        self._children: dict[str, _Child] = {}
        self._order: list[str] = []
        self._intensity = RestartIntensity(spec.intensity, spec.period_s)
        self._queue: asyncio.Queue[_Event] | None = None
        self._loop_task: asyncio.Task | None = None
        self._down_nodes: dict[str, float] = {}
        self._draining: set[str] = set()  # nodes being removed: nothing placed there
        self._avoid: set[str] = set()     # nodes the child being moved must not go back to
        self._failure: str | None = None
        self._transitions: list[tuple[float, str, str, str]] = []
        self._pid = os.getpid()
        self._metrics = TreeMetrics(tree, path)  # Ray metrics, updated on every change
        for child_spec in spec.children:
            self._add(child_spec, dynamic=False)
        saved = self._load()
        if saved is not None and saved.get("state") == "running":
            # This process replaces a crashed one: re-adopt the children it left running.
            self._state = "recovering"
            ray.get_runtime_context().current_actor._recover.remote(saved)

    # ================================================================ remote API
    async def start(self) -> list[dict[str, Any]]:
        """Start all children in order; raise StartError (with nothing left running) if one
        fails to start."""
        await self._submit("start")
        return self.children()

    async def _recover(self, saved: dict[str, Any]) -> None:
        await self._submit("recover", saved=saved)

    def status(self) -> str:
        return {"idle": "stopped", "recovering": "running", "starting": "running",
                "stopping": "running"}.get(self._state, self._state)

    def state(self) -> str:
        return self._state

    def children(self) -> list[dict[str, Any]]:
        return [self._children[cid].info() for cid in self._order]

    async def start_child(self, spec: AnySpec) -> dict[str, Any]:
        return await self._submit("start_child", spec=spec)

    async def terminate_child(self, child_id: str) -> None:
        await self._submit("terminate_child", child_id=child_id)

    async def stop(self) -> None:
        await self._submit("stop")

    async def node_down(self, node_id: str, reason: str = "reported down") -> list[str]:
        """A node-death signal (Ray's own, or the mesh's): migrate the children on it now."""
        return await self._submit("node_down", node_id=node_id, reason=reason)

    def node_up(self, node_id: str) -> None:
        self._down_nodes.pop(node_id, None)
        self._draining.discard(node_id)

    async def drain_node(self, node_id: str) -> list[str]:
        """Move this supervisor's children off ``node_id`` in an orderly way (a planned
        migration, not a fault: each is stopped gracefully and started elsewhere with its
        state, restarts and last failure unchanged), and place nothing there again until
        ``node_up``. Returns the paths moved; sub-supervisors are not descended into (the
        tree does that, see ``Tree.drain_node``)."""
        return await self._submit("drain_node", node_id=node_id)

    async def move_child(self, child_id: str, avoid: list[str] | None = None) -> dict[str, Any]:
        """Move one running child to another node (not ``avoid``, nor its current one),
        gracefully, as :meth:`drain_node` does; returns its new info."""
        return await self._submit("move_child", child_id=child_id, avoid=list(avoid or []))

    async def on_node_event(self, event: dict[str, Any]) -> list[str]:
        """A membership event from an outside failure detector (the ZeroMQ mesh subscribes
        the roots of its site's trees): ``{"kind": "down" | "up" | ..., "node_id": ...}``.
        ``down`` migrates this subtree's children off the node at once (sub-supervisors are
        told in turn); ``up`` makes the node placeable again; other kinds are ignored. Returns
        the paths of the children moved."""
        kind, node_id = event.get("kind"), event.get("node_id")
        if not isinstance(node_id, str) or kind not in ("down", "up"):
            return []
        moved: list[str] = []
        if kind == "down":
            moved += await self.node_down(node_id, f"mesh: {event.get('reason') or 'down'}")
        else:
            self.node_up(node_id)
        for cid in list(self._order):
            child = self._children[cid]
            if child.spec.is_supervisor and child.handle is not None and \
                    child.status == "running":
                try:
                    moved += await _ray.call(child.handle.on_node_event.remote(event), 30.0)
                except Exception as exc:  # noqa: BLE001 - its own watch will see a death
                    log.warning("%s: node event to %s failed: %r", self.path, child.path, exc)
        return moved

    async def describe(self) -> dict[str, Any]:
        """This supervisor and its subtree, for ``bastion status``."""
        out = {"path": self.path, "status": self.status(), "pid": self._pid,
               "node_id": ray.get_runtime_context().get_node_id(),
               "restart_history": self._intensity.history(), "failure": self._failure,
               "children": []}
        for cid in self._order:
            child = self._children[cid]
            entry = child.info()
            if child.spec.is_supervisor and child.handle is not None and \
                    child.status == "running":
                try:
                    entry["tree"] = await _ray.call(child.handle.describe.remote(), 10.0)
                except Exception as exc:  # noqa: BLE001
                    entry["tree"] = {"error": str(exc)[:200]}
            out["children"].append(entry)
        return out

    def transitions(self) -> list[tuple[float, str, str, str]]:
        return list(self._transitions)

    def __bastion_info__(self) -> dict[str, Any]:
        return {"pid": self._pid, "node_id": ray.get_runtime_context().get_node_id(),
                "incarnation": 0, "started_at": None}

    async def __bastion_watch__(self, timeout_s: float) -> str:
        await asyncio.sleep(timeout_s)
        return "alive"

    def __repr__(self) -> str:
        running = sum(1 for c in self._children.values() if c.status == "running")
        return (f"Supervisor({self.path} {self.spec.strategy} {self._state} "
                f"{running}/{len(self._children)} running)")

    # ================================================================ the control loop
    async def _submit(self, kind: str, **payload: Any) -> Any:
        self._ensure_loop()
        future = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        await self._queue.put(_Event(kind, payload, future))
        return await future

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _post(self, kind: str, **payload: Any) -> None:
        if self._queue is not None:
            self._queue.put_nowait(_Event(kind, payload))

    async def _run(self) -> None:
        assert self._queue is not None
        handlers = {
            "start": self._do_start, "recover": self._do_recover, "exit": self._on_exit,
            "restart": self._do_delayed_restart, "start_child": self._do_start_child,
            "terminate_child": self._do_terminate_child, "stop": self._do_stop,
            "node_down": self._do_node_down, "drain_node": self._do_drain_node,
            "move_child": self._do_move_child,
        }
        while True:
            event = await self._queue.get()
            try:
                result = await handlers[event.kind](**event.payload)
            except Exception as exc:  # noqa: BLE001 - the loop never dies; callers get errors
                if event.future is not None and not event.future.done():
                    event.future.set_exception(exc)
                else:
                    log.exception("%s: %s handler failed", self.path, event.kind)
                continue
            if event.future is not None and not event.future.done():
                event.future.set_result(result)

    # ================================================================ handlers
    async def _do_start(self) -> None:
        if self._state not in ("idle", "stopped"):
            return
        self._transition("starting", "start")
        started: list[_Child] = []
        for cid in list(self._order):
            child = self._children[cid]
            try:
                await self._start_child(child)
            except Exception as exc:  # noqa: BLE001
                for done in reversed(started):
                    await self._stop_child(done)
                await self._shutdown_rest()
                self._transition("idle", f"start failed: {child.path}")
                self._wipe()
                if isinstance(exc, StartError):
                    raise
                raise StartError(child.path, f"{type(exc).__name__}: {exc}") from None
            started.append(child)
        self._transition("running", "all children started")
        self._save()

    async def _do_recover(self, saved: dict[str, Any]) -> None:
        """Re-adopt the children a crashed incarnation left running; restart the dead ones."""
        self._intensity = RestartIntensity(self.spec.intensity, self.spec.period_s,
                                           saved.get("restart_history", ()))
        for spec_blob in saved.get("dynamic", []):
            spec = cloudpickle.loads(spec_blob)
            if spec.id not in self._children:
                self._add(spec, dynamic=True)
        for cid, record in saved.get("children", {}).items():
            child = self._children.get(cid)
            if child is None:
                continue
            child.incarnation = record["incarnation"]
            child.restarts = record["restarts"]
            child.migrations = record.get("migrations", 0)
            # Not "running" until seen alive: until then it reads as restarting (no pid).
            status = record["status"]
            child.status = "restarting" if status in ("running", "restarting") else status
            child.last_failure = record.get("last_failure")
        missing = []
        for cid in self._order:
            child = self._children[cid]
            if child.status != "restarting":
                continue
            handle = _ray.get_named(child.path, self.namespace)
            info = None
            if handle is not None:
                try:
                    info = await _ray.call(handle.__bastion_info__.remote(), 30.0)
                except Exception:  # noqa: BLE001 - it died meanwhile
                    info = None
            if info is None:
                missing.append(child)
                continue
            self._adopted(child, handle, info)
        self._transition("running", "recovered after a crash")
        self._save()
        for child in missing:
            self._post("exit", child_id=child.spec.id, incarnation=child.incarnation,
                       exit_kind=ABNORMAL, reason="died while its supervisor was down",
                       node_died=False)

    async def _on_exit(self, child_id: str, incarnation: int, exit_kind: str, reason: str,
                       node_died: bool) -> None:
        kind = exit_kind
        child = self._children.get(child_id)
        if child is None or child.incarnation != incarnation or child.expected_exit:
            return  # a child we stopped ourselves, or an older incarnation
        if self._state not in ("running",):
            return
        child.handle = None
        child.watch_task = None
        child.exited_at = time.time()
        if node_died and child.node_id:
            self._down_nodes.setdefault(child.node_id, time.time())
        if kind == ABNORMAL:
            child.last_failure = reason
            if child.spec.is_supervisor:
                why = self._store.kv_get(f"supexit/{self.namespace}/{child.path}")
                if why:
                    child.last_failure = why.decode()
        if not should_restart(child.spec.restart, kind):
            child.status = status_after_exit(kind)
            if child.spec.is_supervisor:
                await self._kill_orphans(child.path)
            self._save()
            return
        now = time.monotonic()
        if self._intensity.record(time.time()):
            await self._give_up(f"restart intensity {self.spec.intensity} in "
                                f"{self.spec.period_s:g} s exceeded after {child.path}: {reason}")
            return
        running = {cid for cid, c in self._children.items()
                   if c.status in ("running", "restarting") and cid != child_id}
        plan = restart_plan(self.spec.strategy, self._order, child_id, running,
                            {cid: c.spec.restart for cid, c in self._children.items()})
        for cid in plan.stop:
            await self._stop_child(self._children[cid])
        for cid in plan.drop:
            self._children[cid].status = "stopped"
        assert child.backoff is not None
        delay_s = child.backoff.next_delay_s(now, _mono_started(child))
        group = [self._children[cid] for cid in plan.start]
        for member in group:
            member.status = "restarting"
            member.pending_restart = True
        self._save()
        if delay_s > 0:
            ids = list(plan.start)
            asyncio.get_running_loop().call_later(
                delay_s, lambda: self._post("restart", ids=ids))
            return
        await self._launch_restart(group)

    async def _do_delayed_restart(self, ids: list[str]) -> None:
        if self._state != "running":
            return
        await self._launch_restart([self._children[cid] for cid in ids if cid in self._children])

    async def _launch_restart(self, group: list[_Child]) -> None:
        """one_for_one: restart in the background, so that children lost together (a node's
        worth) come back in parallel while the loop goes on; other strategies restart their
        group in order, inside the loop."""
        if self.spec.strategy == "one_for_one" and len(group) == 1:
            member = group[0]
            member.start_task = asyncio.get_running_loop().create_task(
                self._restart_group(group))
            return
        await self._restart_group(group)

    async def _restart_group(self, group: list[_Child]) -> None:
        for member in group:
            if not member.pending_restart:
                continue
            member.pending_restart = False
            try:
                await self._start_child(member, restart=True)
            except Exception as exc:  # noqa: BLE001 - a failed restart is a crash of the child
                reason = f"restart failed: {type(exc).__name__}: {exc}"[:300]
                member.status = "restarting"
                self._post("exit", child_id=member.spec.id, incarnation=member.incarnation,
                           exit_kind=ABNORMAL, reason=reason, node_died=False)
                for rest in group[group.index(member) + 1:]:
                    rest.pending_restart = False
                return

    async def _do_start_child(self, spec: AnySpec) -> dict[str, Any]:
        if spec.id in self._children and self._children[spec.id].status in (
                "running", "restarting"):
            raise ValueError(f"{join_path(self.path, spec.id)}: a child with id {spec.id!r} "
                             "is already running")
        child = self._add(spec, dynamic=True)
        try:
            await self._start_child(child)
        except Exception as exc:  # noqa: BLE001
            self._remove(spec.id)
            self._save()
            if isinstance(exc, StartError):
                raise
            raise StartError(child.path, f"{type(exc).__name__}: {exc}") from None
        self._save()
        return child.info()

    async def _do_terminate_child(self, child_id: str) -> None:
        child = self._children.get(child_id)
        if child is None:
            raise KeyError(f"{join_path(self.path, child_id)}: no such child; children are "
                           f"{self._order}")
        await self._stop_child(child)
        child.pending_restart = False
        if child.dynamic:
            self._remove(child_id)
        self._save()

    async def _do_stop(self) -> None:
        self._transition("stopping", "stop requested")
        await self._shutdown_rest()
        self._transition("stopped", "stopped")
        self._wipe()

    async def _do_drain_node(self, node_id: str) -> list[str]:
        self._draining.add(node_id)
        moved = []
        for cid in list(self._order):
            child = self._children[cid]
            if child.node_id == node_id and child.status == "running":
                await self._move(child, {node_id})
                moved.append(child.path)
        return moved

    async def _do_move_child(self, child_id: str, avoid: list[str]) -> dict[str, Any]:
        child = self._children.get(child_id)
        if child is None or child.status != "running":
            raise KeyError(f"{join_path(self.path, child_id)}: no running child with that id")
        await self._move(child, {*avoid, *([child.node_id] if child.node_id else [])})
        return child.info()

    async def _move(self, child: _Child, avoid: set[str]) -> None:
        """Stop gracefully, start elsewhere: a migration, so neither a restart nor a failure
        is recorded (``migrations`` counts it)."""
        await self._stop_child(child)
        self._avoid = avoid
        try:
            await self._start_child(child)
        except Exception as exc:  # noqa: BLE001 - it is down now: restart it as a crash would
            reason = f"move failed: {type(exc).__name__}: {exc}"[:300]
            child.status = "restarting"
            self._post("exit", child_id=child.spec.id, incarnation=child.incarnation,
                       exit_kind=ABNORMAL, reason=reason, node_died=False)
        finally:
            self._avoid = set()
        child.migrations += 1
        self._save()

    async def _do_node_down(self, node_id: str, reason: str) -> list[str]:
        self._down_nodes[node_id] = time.time()
        moved = []
        for cid in list(self._order):
            child = self._children[cid]
            if child.node_id == node_id and child.status == "running" and child.handle:
                _ray.kill(child.handle)  # frees the name in GCS at once
                moved.append(child.path)
        return moved

    # ================================================================ child lifecycle
    async def _start_child(self, child: _Child, *, restart: bool = False) -> None:
        child.incarnation += 1
        child.expected_exit = False
        child.status = "starting" if not restart else "restarting"
        self._save()  # the incarnation is durable before the actor exists
        stale = _ray.get_named(child.path, self.namespace)
        if stale is not None:  # a leftover (e.g. from a crash mid-restart): never two
            _ray.kill(stale)
            if not await _ray.wait_name_free(child.path, self.namespace, KILL_CONFIRM_S):
                raise StartError(child.path, "an older actor still holds the name")
        node_id = self._place(child)
        spec = child.spec
        if isinstance(spec, SupervisorSpec):
            from .tree import supervisor_remote_class

            handle = _ray.create_supervisor(
                supervisor_remote_class(), child.path, self.namespace, node_id, root=False,
                args=(spec, child.path, self.namespace, self.store_url, self.tree, False))
            try:
                await _ray.call(handle.start.remote(), START_TIMEOUT_S)
            except Exception:
                _ray.kill(handle)
                raise
            info = await _ray.call(handle.__bastion_info__.remote(), START_TIMEOUT_S)
        else:
            ctx = SupervisedContext(path=child.path, namespace=self.namespace,
                                    incarnation=child.incarnation, store_url=self.store_url,
                                    tree=self.tree)
            handle = _ray.create_worker(spec, child.path, self.namespace, ctx, node_id)
            try:
                info = await _ray.call(handle.__bastion_info__.remote(), START_TIMEOUT_S)
            except TimeoutError:
                _ray.kill(handle)
                raise StartError(child.path, f"not running after {START_TIMEOUT_S:g} s "
                                 "(no node with the resources it asks for?)") from None
            except Exception as exc:
                _ray.kill(handle)
                raise StartError(child.path, _init_error(exc)) from None
            handle.__bastion_started__.remote()  # fire and forget: on_started() if defined
        if restart:
            child.restarts += 1
        self._adopted(child, handle, info)
        self._save()

    def _adopted(self, child: _Child, handle: Any, info: dict[str, Any]) -> None:
        child.handle = handle
        child.pid = info.get("pid")
        child.node_id = info.get("node_id")
        child.started_at = time.time()
        child.status = "running"
        if child.spec.placement.anti_affinity and child.node_id:
            self._store.kv_put(self._group_key(child), child.node_id.encode())
        incarnation = child.incarnation
        child.watch_task = asyncio.get_running_loop().create_task(
            self._watch(child.spec.id, handle, incarnation))

    async def _watch(self, child_id: str, handle: Any, incarnation: int) -> None:
        try:
            death = await _ray.watch(handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never lose a death: report it as a crash
            log.exception("%s/%s: watch failed", self.path, child_id)
            death = _ray.Death(ABNORMAL, f"watch failed: {exc}"[:300])
        self._post("exit", child_id=child_id, incarnation=incarnation, exit_kind=death.kind,
                   reason=death.reason, node_died=death.node_died)

    async def _stop_child(self, child: _Child) -> None:
        """Graceful stop: ``on_stop()`` within ``shutdown_s`` (or a sub-supervisor's own
        orderly stop), then kill and wait until Ray confirms the death."""
        if child.start_task is not None and not child.start_task.done():
            # A restart in flight: let it land first, then stop what it started.
            with contextlib.suppress(Exception):
                await asyncio.shield(child.start_task)
        child.expected_exit = True
        child.pending_restart = False
        handle, watch_task = child.handle, child.watch_task
        if handle is not None:
            grace = child.spec.shutdown_s
            brutal = grace == BRUTAL_KILL or grace == 0
            if not brutal:
                method = handle.stop if child.spec.is_supervisor else handle.__bastion_stop__
                with contextlib.suppress(Exception):  # timeout or already dead: kill it
                    await _ray.call(method.remote(), float(grace))
            _ray.kill(handle)
            if watch_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(watch_task), KILL_CONFIRM_S)
        elif child.spec.is_supervisor:
            await self._kill_orphans(child.path)
        if child.spec.placement.anti_affinity:
            self._store.kv_delete(self._group_key(child))
        child.handle = None
        child.watch_task = None
        child.status = "stopped"

    async def _shutdown_rest(self) -> None:
        for cid in reversed(self._order):
            child = self._children[cid]
            if child.status in ("running", "restarting", "starting") or child.handle:
                await self._stop_child(child)

    async def _give_up(self, reason: str) -> None:
        """Too many restarts: stop all children in reverse order, then fail (escalate)."""
        log.error("%s: giving up: %s", self.path, reason)
        self._failure = reason
        self._transition("stopping", reason)
        await self._shutdown_rest()
        self._transition("failed", reason)
        self._wipe()
        self._store.kv_put(f"supexit/{self.namespace}/{self.path}", reason.encode())
        if not self.root:
            os._exit(1)  # an abnormal exit: the parent applies its own strategy to us

    async def _kill_orphans(self, path: str) -> None:
        """Kill what a dead sub-supervisor left running (it will not be restarted)."""
        blob = self._store.kv_get(f"sup/{self.namespace}/{path}")
        if blob is None:
            return
        saved = cloudpickle.loads(blob)
        for cid in saved.get("children", {}):
            child_path = join_path(path, cid)
            await self._kill_orphans(child_path)
            handle = _ray.get_named(child_path, self.namespace)
            if handle is not None:
                _ray.kill(handle)
        self._store.kv_delete(f"sup/{self.namespace}/{path}")

    # ================================================================ placement
    def _place(self, child: _Child) -> str | None:
        placement = child.spec.placement
        nodes = [n for n in _ray.list_nodes() if n.alive]
        if child.spec.is_supervisor and placement.site is None:
            head = next((n.node_id for n in nodes if n.is_head), None)
            return head  # supervisors live on the head, beside Ray's control plane
        group_nodes: set[str] = set()
        if placement.anti_affinity:
            prefix = f"place/{self.namespace}/{placement.anti_affinity}/"
            for key in self._store.kv_keys(prefix):
                if key == self._group_key(child):
                    continue
                value = self._store.kv_get(key)
                if value:
                    group_nodes.add(value.decode())
        load: dict[str, int] = {}
        for other in self._children.values():
            if other.node_id and other.status == "running":
                load[other.node_id] = load.get(other.node_id, 0) + 1
        need: dict[str, float] = {}
        if not child.spec.is_supervisor:
            need = {"CPU": child.spec.num_cpus, **dict(child.spec.resources)}
        candidates = [Candidate(n.node_id, n.name, n.is_head, n.labels, n.resources)
                      for n in nodes]
        try:
            node_id = choose_node(child.path, placement, candidates,
                                  excluded={*self._down_nodes, *self._draining,
                                            *self._avoid}, group_nodes=group_nodes,
                                  load=load, need=need)
        except PlacementError as exc:
            raise StartError(child.path, str(exc)) from None
        if placement.anti_affinity:  # claim the node now: restarts may run in parallel
            self._store.kv_put(self._group_key(child), node_id.encode())
        return node_id

    def _group_key(self, child: _Child) -> str:
        return f"place/{self.namespace}/{child.spec.placement.anti_affinity}/{child.path}"

    # ================================================================ bookkeeping
    def _add(self, spec: AnySpec, *, dynamic: bool) -> _Child:
        child = _Child(spec=spec, path=join_path(self.path, spec.id), dynamic=dynamic,
                       backoff=BackoffState(spec.backoff))
        if spec.id not in self._children:
            self._order.append(spec.id)
        self._children[spec.id] = child
        return child

    def _remove(self, child_id: str) -> None:
        self._children.pop(child_id, None)
        if child_id in self._order:
            self._order.remove(child_id)

    def _transition(self, to: str, reason: str) -> None:
        self._transitions.append((time.time(), self._state, to, reason))
        del self._transitions[:-200]
        self._state = to

    def _save(self) -> None:
        if self._state in ("idle", "stopped", "failed"):
            return
        record = {
            "state": "running",
            "restart_history": self._intensity.history(),
            "dynamic": [cloudpickle.dumps(self._children[cid].spec) for cid in self._order
                        if self._children[cid].dynamic],
            "children": {
                cid: {"incarnation": c.incarnation, "restarts": c.restarts,
                      "status": c.status, "last_failure": c.last_failure,
                      "migrations": c.migrations}
                for cid, c in self._children.items()
            },
        }
        self._store.kv_put(self._key, cloudpickle.dumps(record))
        self._metrics.update((self._children[cid].info() for cid in self._order),
                             self._intensity.count(time.time()), self.spec.intensity)

    def _load(self) -> dict[str, Any] | None:
        blob = self._store.kv_get(self._key)
        return cloudpickle.loads(blob) if blob else None

    def _wipe(self) -> None:
        self._store.kv_delete(self._key)


def _mono_started(child: _Child) -> float | None:
    if child.started_at is None:
        return None
    return time.monotonic() - (time.time() - child.started_at)


def _init_error(exc: BaseException) -> str:
    text = str(exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # The user's exception is the last line of the remote traceback.
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


__all__ = ["SupervisorActor", "StartError", "NORMAL", "ABNORMAL"]
