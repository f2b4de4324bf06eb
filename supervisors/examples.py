"""Small generic actors for the demo, the benchmarks and the tests.

They live in the package (not in ``tests/``) because Ray workers import actor classes by
reference, and every node has the package installed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray

from ._child import current_context
from .stateful import EventSourced


def _log(path: str | None, line: str) -> None:
    """Append one line to a shared file (tests read start/stop order from it)."""
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class Worker:
    """A stateless child that records its start and graceful stop in ``log_path``."""

    def __init__(self, name: str = "", log_path: str | None = None,
                 stop_delay_s: float = 0.0) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_delay_s = stop_delay_s
        _log(log_path, f"start {name}")

    def ping(self) -> str:
        return "pong"

    def pid(self) -> int:
        return os.getpid()

    def incarnation(self) -> int:
        ctx = current_context()
        return ctx.incarnation if ctx else 0

    def exit_normally(self) -> None:
        ray.actor.exit_actor()

    def crash(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_stop(self) -> None:
        if self.stop_delay_s:
            time.sleep(self.stop_delay_s)
        _log(self.log_path, f"stop {self.name}")


class AsyncWorker:
    """An async child (Ray runs its methods on an event loop)."""

    def __init__(self, name: str = "", log_path: str | None = None) -> None:
        self.name = name
        self.log_path = log_path
        _log(log_path, f"start {name}")

    async def ping(self) -> str:
        await asyncio.sleep(0)
        return "pong"

    async def pid(self) -> int:
        return os.getpid()

    async def exit_normally(self) -> None:
        ray.actor.exit_actor()

    async def on_stop(self) -> None:
        _log(self.log_path, f"stop {self.name}")


class FailingInit:
    """A child whose constructor always raises."""

    def __init__(self, message: str = "constructor failed on purpose") -> None:
        raise ValueError(message)


class FailAfterFirst:
    """Starts the first time; every later start raises (a child that cannot come back)."""

    def __init__(self, marker_path: str) -> None:
        marker = Path(marker_path)
        if marker.exists():
            raise RuntimeError("second start refused on purpose")
        marker.write_text("started")

    def pid(self) -> int:
        return os.getpid()


class Counter(EventSourced):
    """An event-sourced counter: every acknowledged ``add`` survives any crash."""

    def __init__(self, snapshot_every: int = 1000) -> None:
        self.snapshot_every = snapshot_every
        self.total = 0
        self.count = 0

    # EventSourced
    def apply(self, event: Any) -> None:
        self.total += event["n"]
        self.count += 1

    def snapshot_state(self) -> Any:
        return {"total": self.total, "count": self.count}

    def restore_state(self, state: Any) -> None:
        self.total = state["total"]
        self.count = state["count"]

    # API
    def add(self, n: int = 1) -> int:
        """Add ``n``; returns the journal sequence number (the acknowledgement)."""
        return self.emit({"n": int(n)})

    def add_many(self, values: list[int]) -> int:
        return self.emit_many({"n": int(v)} for v in values)

    def value(self) -> dict[str, int]:
        return {"total": self.total, "count": self.count, "seq": self.journal_seq,
                "epoch": self.journal_epoch}

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def recovery(self) -> dict[str, Any]:
        return self.recovery_stats()

    def exit_normally(self) -> None:
        ray.actor.exit_actor()

    def __repr__(self) -> str:
        ctx = current_context()
        where = ctx.path if ctx else "?"
        return f"Counter({where} total={self.total} seq={getattr(self, '_es_seq', 0)})"


class BareCounter:
    """The same counter without Bastion (for the benchmark's Ray-only baseline)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int = 1) -> int:
        self.total += n
        return self.total

    def pid(self) -> int:
        return os.getpid()

    def value(self) -> int:
        return self.total
