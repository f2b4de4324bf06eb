"""A user-space TCP proxy that adds latency, jitter and connection cuts (no netem here, no root).

Clients connect to the listen address; each connection is forwarded to the target. Every chunk
read in either direction is held until ``received + delay`` (``delay_s`` client->target,
``reverse_delay_s`` target->client, each plus a uniform ``[0, jitter_s]``), then written. Due
times never decrease within a direction, so jitter delays bytes but never reorders them. With
``cut_probability`` each chunk may instead cut its connection (both sides aborted): on a TCP
stream "loss" can only be a cut, since dropping bytes would corrupt the stream.

Buffers are bounded: per connection and direction at most ``max_buffer_bytes`` are read and not
yet written; past that the proxy stops reading, so TCP flow control pushes back on the sender.

In-process (asyncio)::

    proxy = DelayProxy(DelayProxyConfig(target_port=5555, delay_s=0.05))
    host, port = await proxy.start()
    ...
    await proxy.close()

From synchronous code, ``with ThreadedDelayProxy(config) as proxy:`` runs it on a loop thread.
As a process (prints one JSON line ``{"listening": "HOST:PORT"}``, and its counters at exit)::

    python -m cluster.chaos.delay_proxy --listen 10.213.5.2:7000 --target 10.213.5.3:7000 --delay-s 0.05

Faults can be changed while running with :meth:`DelayProxy.set_faults`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import signal
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DelayProxyConfig:
    """How one proxy listens, where it forwards, and what it does to the traffic."""

    target_host: str = "127.0.0.1"
    #: Port of the target; required (> 0).
    target_port: int = 0
    listen_host: str = "127.0.0.1"
    #: 0 picks a free port (see :attr:`DelayProxy.listen_address`).
    listen_port: int = 0
    #: Added one-way latency client -> target, per chunk, in seconds.
    delay_s: float = 0.0
    #: Added one-way latency target -> client; None means the same as ``delay_s``.
    reverse_delay_s: float | None = None
    #: Extra latency drawn uniformly from [0, jitter_s] per chunk (order is kept).
    jitter_s: float = 0.0
    #: Probability that a forwarded chunk cuts its connection instead (both sides aborted).
    cut_probability: float = 0.0
    #: Per connection and direction: bytes read but not yet written, at most.
    max_buffer_bytes: int = 1 << 20
    #: Largest single read; must not exceed ``max_buffer_bytes``.
    read_chunk_bytes: int = 64 << 10
    #: How long to wait for the target to accept a connection before closing the client's.
    connect_timeout_s: float = 5.0
    #: Seed for jitter and cuts (None: from the OS).
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("target_port", "listen_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"DelayProxyConfig.{name} must be a port 0..65535, got {value!r}")
        if self.target_port == 0:
            raise ValueError("DelayProxyConfig.target_port must be set (> 0), got 0")
        _check_faults("DelayProxyConfig", self.delay_s, self.reverse_delay_s, self.jitter_s,
                      self.cut_probability)
        if not self.connect_timeout_s > 0:
            raise ValueError("DelayProxyConfig.connect_timeout_s must be > 0, "
                             f"got {self.connect_timeout_s!r}")
        if not 0 < self.read_chunk_bytes <= self.max_buffer_bytes:
            raise ValueError("DelayProxyConfig.read_chunk_bytes must be in (0, max_buffer_bytes="
                             f"{self.max_buffer_bytes}], got {self.read_chunk_bytes!r}")


def _check_faults(owner: str, delay_s: float, reverse_delay_s: float | None, jitter_s: float,
                  cut_probability: float) -> None:
    for name, value in (("delay_s", delay_s), ("reverse_delay_s", reverse_delay_s),
                        ("jitter_s", jitter_s)):
        if value is not None and not value >= 0:
            raise ValueError(f"{owner}.{name} must be >= 0 seconds, got {value!r}")
    if not 0.0 <= cut_probability <= 1.0:
        raise ValueError(f"{owner}.cut_probability must be in [0, 1], got {cut_probability!r}")


COUNTER_NAMES = (
    "accepted",           # client connections accepted
    "active",             # connections open now
    "connect_failures",   # target refused or timed out; the client's connection was closed
    "cut",                # connections cut by cut_probability
    "reset",              # connections that ended with an error from either side
    "bytes_up", "bytes_down",      # bytes written to target / to client
    "chunks_up", "chunks_down",
    "backpressure_waits",  # reads that waited because a direction's buffer was full
    "buffered_high_water",  # most bytes ever held in one direction of one connection
)


class _Cut(Exception):
    """A chunk drew a cut: abort both sides of its connection."""


class _Direction:
    """One direction of one connection: a bounded FIFO of (due time, bytes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.last_due = 0.0
        self.changed = asyncio.Condition()

    def fits(self, size: int) -> bool:
        return self.buffered + size <= self.max_bytes


class DelayProxy:
    """The asyncio proxy. :meth:`start` binds and serves; :meth:`close` stops it and aborts
    open connections. Counters are plain ints (:meth:`counters`)."""

    def __init__(self, config: DelayProxyConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._delay_s = config.delay_s
        self._reverse_delay_s = config.reverse_delay_s
        self._jitter_s = config.jitter_s
        self._cut_probability = config.cut_probability
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.listen_address: tuple[str, int] | None = None

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def set_faults(self, *, delay_s: float | None = None, reverse_delay_s: float | None = None,
                   jitter_s: float | None = None, cut_probability: float | None = None) -> None:
        """Change the faults of a running proxy (given fields only); applies to chunks read
        from now on. Safe to call from another thread (plain attribute writes)."""
        new_delay = self._delay_s if delay_s is None else delay_s
        new_reverse = self._reverse_delay_s if reverse_delay_s is None else reverse_delay_s
        new_jitter = self._jitter_s if jitter_s is None else jitter_s
        new_cut = self._cut_probability if cut_probability is None else cut_probability
        _check_faults("DelayProxy.set_faults", new_delay, new_reverse, new_jitter, new_cut)
        self._delay_s, self._reverse_delay_s = new_delay, new_reverse
        self._jitter_s, self._cut_probability = new_jitter, new_cut

    async def start(self) -> tuple[str, int]:
        cfg = self.config
        self._server = await asyncio.start_server(self._on_client, cfg.listen_host,
                                                  cfg.listen_port, limit=cfg.read_chunk_bytes)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.listen_address = (host, port)
        return self.listen_address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_client(self, client_r: asyncio.StreamReader,
                         client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._counters["accepted"] += 1
        self._writers.add(client_w)
        cfg = self.config
        try:
            try:
                target_r, target_w = await asyncio.wait_for(
                    asyncio.open_connection(cfg.target_host, cfg.target_port,
                                            limit=cfg.read_chunk_bytes),
                    cfg.connect_timeout_s)
            except (OSError, TimeoutError):
                self._counters["connect_failures"] += 1
                client_w.transport.abort()
                return
            self._writers.add(target_w)
            self._counters["active"] += 1
            try:
                await self._relay(client_r, client_w, target_r, target_w)
            finally:
                self._counters["active"] -= 1
                self._writers.discard(target_w)
                target_w.transport.abort()
        finally:
            self._writers.discard(client_w)
            client_w.transport.abort()
            self._tasks.discard(task)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                     target_r: asyncio.StreamReader, target_w: asyncio.StreamWriter) -> None:
        cfg = self.config
        up, down = _Direction(cfg.max_buffer_bytes), _Direction(cfg.max_buffer_bytes)
        pumps = [
            asyncio.create_task(self._read(client_r, up, reverse=False)),
            asyncio.create_task(self._write(up, target_w, "up")),
            asyncio.create_task(self._read(target_r, down, reverse=True)),
            asyncio.create_task(self._write(down, client_w, "down")),
        ]
        try:
            for done in asyncio.as_completed(pumps):
                await done  # the first error (a reset or a cut) ends the connection
        except _Cut:
            self._counters["cut"] += 1
        except (OSError, asyncio.IncompleteReadError):
            self._counters["reset"] += 1
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader, direction: _Direction,
                    reverse: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(self.config.read_chunk_bytes)
            if data and self._cut_probability and self._rng.random() < self._cut_probability:
                raise _Cut
            async with direction.changed:
                if not direction.fits(len(data)):
                    self._counters["backpressure_waits"] += 1
                    await direction.changed.wait_for(functools.partial(direction.fits, len(data)))
                base = self._delay_s
                if reverse and self._reverse_delay_s is not None:
                    base = self._reverse_delay_s
                jitter = self._rng.uniform(0.0, self._jitter_s) if self._jitter_s else 0.0
                due = max(direction.last_due, loop.time() + base + jitter)
                direction.last_due = due
                direction.items.append((due, data))
                direction.buffered += len(data)
                self._counters["buffered_high_water"] = max(
                    self._counters["buffered_high_water"], direction.buffered)
                direction.changed.notify_all()
            if not data:
                return

    async def _write(self, direction: _Direction, writer: asyncio.StreamWriter,
                     name: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with direction.changed:
                await direction.changed.wait_for(lambda: bool(direction.items))
                due, data = direction.items[0]
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not data:  # end of stream: pass the half-close on
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self._counters[f"bytes_{name}"] += len(data)
            self._counters[f"chunks_{name}"] += 1
            async with direction.changed:
                direction.items.popleft()
                direction.buffered -= len(data)
                direction.changed.notify_all()


class ThreadedDelayProxy:
    """A :class:`DelayProxy` on its own event-loop thread, for synchronous code and tests."""

    def __init__(self, config: DelayProxyConfig, start_timeout_s: float = 10.0) -> None:
        self.proxy = DelayProxy(config)
        self._start_timeout_s = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy",
                                        daemon=True)
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop)
        self.address = future.result(self._start_timeout_s)
        return self.address

    def close(self, timeout_s: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()

    def counters(self) -> dict[str, int]:
        return self.proxy.counters()

    def set_faults(self, **faults: float | None) -> None:
        self.proxy.set_faults(**faults)

    def __enter__(self) -> ThreadedDelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.chaos.delay_proxy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=parse_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=parse_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--reverse-delay-s", type=float, default=None)
    parser.add_argument("--jitter-s", type=float, default=0.0)
    parser.add_argument("--cut-probability", type=float, default=0.0)
    parser.add_argument("--max-buffer-bytes", type=int, default=DelayProxyConfig.max_buffer_bytes)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        config = DelayProxyConfig(
            listen_host=args.listen[0], listen_port=args.listen[1],
            target_host=args.target[0], target_port=args.target[1], delay_s=args.delay_s,
            reverse_delay_s=args.reverse_delay_s, jitter_s=args.jitter_s,
            cut_probability=args.cut_probability, max_buffer_bytes=args.max_buffer_bytes,
            read_chunk_bytes=min(DelayProxyConfig.read_chunk_bytes, args.max_buffer_bytes),
            seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    return asyncio.run(_serve(config))


async def _serve(config: DelayProxyConfig) -> int:
    proxy = DelayProxy(config)
    host, port = await proxy.start()
    print(json.dumps({"listening": f"{host}:{port}", "config": asdict(config)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    print(json.dumps({"counters": proxy.counters()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
