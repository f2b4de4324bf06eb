"""A throwaway ``redis-server`` for tests and benchmarks.

    with redis_server() as server:          # free loopback port, temp dir, AOF fsync always
        store = open_store(server.url)

The server runs as a child process in the foreground; leaving the ``with`` block stops it
(SIGTERM, then SIGKILL after ``stop_timeout_s``) and waits for it, so no process is left behind.
Pass ``data_dir`` (and ``port``) to restart a server on the same data, e.g. after killing it
with ``server.stop(signal.SIGKILL)`` to test a crash.

In pytest, call :func:`redis_server_binary_or_skip` first: it skips the test when the binary is
missing, unless ``BASTION_REQUIRE_REDIS=1`` is set, in which case it fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRE_REDIS_ENV = "BASTION_REQUIRE_REDIS"
_FALLBACK_BINARY = "/usr/bin/redis-server"
_PORT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class RedisServerConfig:
    """How the throwaway server runs."""

    #: Persist every write to the AOF (needed for durability across a server crash).
    appendonly: bool = True
    #: ``always`` (fsync before each reply), ``everysec`` or ``no``.
    appendfsync: str = "always"
    #: How long to wait for the server to answer PING.
    startup_timeout_s: float = 10.0
    #: How long to wait for exit after SIGTERM before SIGKILL.
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ValueError(
                "RedisServerConfig.appendfsync must be always/everysec/no, "
                f"got {self.appendfsync!r}"
            )
        for name in ("startup_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"RedisServerConfig.{name} must be > 0, got {value!r}")


def find_redis_server() -> str | None:
    """Path of the ``redis-server`` binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return _FALLBACK_BINARY if os.access(_FALLBACK_BINARY, os.X_OK) else None


def redis_server_binary_or_skip() -> str:
    """The binary; else ``pytest.skip`` (or ``pytest.fail`` when BASTION_REQUIRE_REDIS=1)."""
    import pytest

    binary = find_redis_server()
    if binary is None:
        message = "redis-server binary not found"
        if os.environ.get(REQUIRE_REDIS_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_REDIS_ENV}=1 requires it")
        pytest.skip(message)
    return binary


class RedisServer:
    """A running ``redis-server`` child process."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, data_dir: Path, config: RedisServerConfig
    ):
        self.proc = proc
        self.host = "127.0.0.1"
        self.port = port
        self.data_dir = data_dir
        self.config = config

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the exit (SIGKILL after ``stop_timeout_s``); returns the code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> str:
    """'' if the server answered PONG, else what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if reply.startswith(b"+PONG") else f"reply {reply!r}"


def _start(binary: str, port: int, data_dir: Path, config: RedisServerConfig) -> RedisServer:
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--logfile", "redis.log",
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "yes" if config.appendonly else "no",
        "--appendfsync", config.appendfsync,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    server = RedisServer(proc, port, data_dir, config)
    deadline = time.monotonic() + config.startup_timeout_s
    last_error = "not tried"
    while time.monotonic() < deadline:
        last_error = _ping(port)
        if not last_error:
            return server
        try:
            proc.wait(timeout=0.02)  # returns only if the server died
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"redis-server exited with {proc.returncode}: {server.log_tail()}")
    server.stop(signal.SIGKILL)
    raise TimeoutError(
        f"redis-server on port {port} did not answer PING within {config.startup_timeout_s} s "
        f"(last: {last_error}); log: {server.log_tail()}"
    )


@contextlib.contextmanager
def redis_server(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    port: int | None = None,
    config: RedisServerConfig | None = None,
    binary: str | None = None,
) -> Iterator[RedisServer]:
    """Run a ``redis-server`` on loopback for the duration of the block.

    ``data_dir`` defaults to a temp dir removed afterwards; ``port`` to a free one (retried if
    another process grabs it first).
    """
    config = config or RedisServerConfig()
    binary = binary or find_redis_server()
    if binary is None:
        raise FileNotFoundError("redis-server binary not found")
    own_dir = data_dir is None
    path = Path(tempfile.mkdtemp(prefix="bastion-redis-")) if own_dir else Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    server: RedisServer | None = None
    try:
        for attempt in range(1 if port is not None else _PORT_ATTEMPTS):
            try:
                server = _start(binary, port if port is not None else _free_port(), path, config)
                break
            except RuntimeError:
                if port is not None or attempt == _PORT_ATTEMPTS - 1:
                    raise
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
